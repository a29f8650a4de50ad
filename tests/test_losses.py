"""Tests for kdjax.losses against a float64 NumPy reference.

Every known distillation bug of other libraries has a named regression test
(``test_regression_*``): a missing T^2 factor, KL averaged instead of summed
over classes, swapped KL arguments, a bf16 softmax, and NaN values/gradients
from masked (-inf) logits. Values are compared with a float64 reference
computed from the *same rounded inputs*; tolerances follow the float32 error
model of each quantity (see ``_kl_atol``), never a hard-coded result.
"""

import math

from absl.testing import parameterized
import chex
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import losses

EPS32 = float(np.finfo(np.float32).eps)
SHAPES = ((10,), (4, 10), (2, 3, 7))
TEMPERATURES = (0.5, 1.0, 4.0, 20.0)
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# Most tests share one shape, so that eager-mode ops compile once.
SHAPE = (4, 10)


# -----------------------------------------------------------------------------
# float64 NumPy reference.
# -----------------------------------------------------------------------------


def _f64(x):
  """The exact values of a (possibly bf16/f16) array, as float64."""
  return np.asarray(jnp.asarray(x).astype(jnp.float32), dtype=np.float64)


def _mask(where, shape):
  if where is None:
    return np.ones(shape, dtype=bool)
  return np.broadcast_to(np.asarray(where, dtype=bool), shape)


def ref_log_softmax(logits, temperature=1.0, where=None):
  x = _f64(logits) / temperature
  x = np.where(_mask(where, x.shape), x, -np.inf)
  shifted = x - np.max(x, axis=-1, keepdims=True)
  return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def ref_softmax(logits, temperature=1.0, where=None):
  return np.exp(ref_log_softmax(logits, temperature, where))


def _sum_over_support(p, x):
  """sum_i p_i x_i with 0 * (anything) = 0 where p_i = 0."""
  with np.errstate(invalid="ignore"):
    return np.sum(np.where(p > 0, p * x, 0.0), axis=-1)


def ref_kl(student, teacher, temperature, where=None):
  """KL(softmax(teacher/T) || softmax(student/T)), summed over classes."""
  log_p = ref_log_softmax(teacher, temperature, where)
  log_q = ref_log_softmax(student, temperature, where)
  with np.errstate(invalid="ignore"):  # -inf - -inf on masked classes.
    log_ratio = log_p - log_q
  return _sum_over_support(np.exp(log_p), log_ratio)


def ref_kl_class_mean(student, teacher, temperature):
  """The buggy variant: KL averaged (not summed) over classes."""
  return ref_kl(student, teacher, temperature) / np.shape(student)[-1]


def ref_soft_ce(student, teacher, temperature, where=None):
  p = ref_softmax(teacher, temperature, where)
  return -_sum_over_support(p, ref_log_softmax(student, temperature, where))


def ref_distillation(student, teacher, temperature, where=None):
  return temperature**2 * ref_kl(student, teacher, temperature, where)


def ref_logit_matching(student, teacher, zero_mean=True, where=None):
  z, v = _f64(student), _f64(teacher)
  mask = _mask(where, z.shape)
  n = mask.sum(axis=-1)
  d = np.where(mask, z - v, 0.0)
  if zero_mean:
    d = d - np.sum(d, axis=-1, keepdims=True) / n[..., None]
  d = np.where(mask, d, 0.0)
  return 0.5 * np.sum(d**2, axis=-1) / n


def ref_hard(student, labels, where=None):
  log_q = ref_log_softmax(student, 1.0, where)
  labels = np.asarray(labels)
  return -np.take_along_axis(log_q, labels[..., None], axis=-1)[..., 0]


def ref_kd(student, teacher, labels, temperature, alpha, where=None):
  return (alpha * ref_hard(student, labels, where) + (1.0 - alpha) *
          ref_distillation(student, teacher, temperature, where))


def _kl_atol(temperature, num_classes, max_abs_logit):
  """Absolute float32 error bound of ``distillation_loss`` (= T^2 KL).

  Below T = 8 the KL is ``sum p (h - g) - log(s_v/s_z)``: its rounding error
  is ~eps (log C + |logits|/T), times T^2. From T = 8 on, the value is
  computed without that cancellation; its error is ~eps |d| T^2, with
  ``|d| <~ 2 max|logit| / T``.
  """
  t = float(temperature)
  err = 8.0 * t * max_abs_logit
  if t < 8.0:
    err += 4.0 * t * t * (1.0 + math.log(num_classes))
  return 2.0 * EPS32 * err


# -----------------------------------------------------------------------------
# Inputs.
# -----------------------------------------------------------------------------


def _logits(seed, shape, dtype=jnp.float32, scale=3.0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(scale * rng.standard_normal(shape), dtype=dtype)


def _labels(seed, shape):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, shape[-1], size=shape[:-1]), jnp.int32)


def _all_losses(s, t, y, temperature, alpha):
  return {
      "softmax": losses.tempered_softmax(s, temperature),
      "log_softmax": losses.tempered_log_softmax(s, temperature),
      "soft_ce": losses.soft_target_cross_entropy(s, t, temperature),
      "distillation": losses.distillation_loss(s, t, temperature),
      "logit_matching": losses.logit_matching_loss(s, t),
      "logit_matching_raw": losses.logit_matching_loss(s, t, zero_mean=False),
      "hard": losses.hard_label_loss(s, y),
      "kd": losses.kd_objective(s, t, y, temperature=temperature,
                                alpha=alpha),
  }


def _all_refs(s, t, y, temperature, alpha):
  return {
      "softmax": ref_softmax(s, temperature),
      "log_softmax": ref_log_softmax(s, temperature),
      "soft_ce": ref_soft_ce(s, t, temperature),
      "distillation": ref_distillation(s, t, temperature),
      "logit_matching": ref_logit_matching(s, t),
      "logit_matching_raw": ref_logit_matching(s, t, zero_mean=False),
      "hard": ref_hard(s, y),
      "kd": ref_kd(s, t, y, temperature, alpha),
  }


# -----------------------------------------------------------------------------
# Values against the reference: shapes x temperatures x dtypes x jit.
# -----------------------------------------------------------------------------


class ValuesTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(shape=SHAPES, temperature=TEMPERATURES,
                         dtype=DTYPES)
  def test_values_match_float64_reference(self, shape, temperature, dtype):
    s = _logits(0, shape, dtype)
    t = _logits(1, shape, dtype)
    y = _labels(2, shape)
    alpha = 0.3
    # Under jit, temperature and alpha are traced arrays (the run-time
    # paths); without jit they are Python numbers (the static paths).
    out = self.variant(_all_losses)(s, t, y, temperature, alpha)
    ref = _all_refs(s, t, y, temperature, alpha)

    batch = shape[:-1]
    for name, value in out.items():
      self.assertEqual(value.dtype, jnp.float32, name)  # Never bf16/f16.
      chex.assert_shape(value, shape if "softmax" in name else batch)
      self.assertTrue(np.all(np.isfinite(value)), name)

    num_classes = shape[-1]
    max_abs = float(np.max(np.abs(_f64(jnp.stack([s, t])))))
    kl_atol = _kl_atol(temperature, num_classes, max_abs)
    chex.assert_trees_all_close(out["softmax"], ref["softmax"], rtol=1e-5,
                                atol=1e-7)
    chex.assert_trees_all_close(out["log_softmax"], ref["log_softmax"],
                                rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(out["soft_ce"], ref["soft_ce"], rtol=1e-5,
                                atol=1e-6)
    chex.assert_trees_all_close(out["distillation"], ref["distillation"],
                                rtol=1e-5, atol=kl_atol)
    chex.assert_trees_all_close(out["logit_matching"], ref["logit_matching"],
                                rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(out["logit_matching_raw"],
                                ref["logit_matching_raw"], rtol=1e-5,
                                atol=1e-6)
    chex.assert_trees_all_close(out["hard"], ref["hard"], rtol=1e-5,
                                atol=1e-6)
    chex.assert_trees_all_close(out["kd"], ref["kd"], rtol=1e-5,
                                atol=kl_atol + 1e-6)


# -----------------------------------------------------------------------------
# Named regression tests for known bugs of other distillation libraries.
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [2.0, 4.0, 20.0])
def test_regression_t_squared_factor_present(temperature):
  """(a) distillation_loss at T is T^2 times the KL, on every kd path."""
  shape = SHAPE
  s, t, y = _logits(3, shape), _logits(4, shape), _labels(5, shape)
  kl = ref_kl(s, t, temperature)
  atol = _kl_atol(temperature, 10, 12.0)

  dist = losses.distillation_loss(s, t, temperature)
  chex.assert_trees_all_close(dist, temperature**2 * kl, rtol=1e-5, atol=atol)
  # Not the T^1 or T^0 variants (they differ by a factor >= T here).
  assert np.all(np.abs(np.asarray(dist) - kl) > 0.5 * np.abs(dist))

  # alpha = 0 is *exactly* the distillation loss, T^2 included.
  kd0 = losses.kd_objective(s, t, y, temperature=temperature, alpha=0.0)
  np.testing.assert_array_equal(kd0, dist)
  kd0_traced = jax.jit(
      lambda s, t, y, a: losses.kd_objective(
          s, t, y, temperature=temperature, alpha=a))(s, t, y, 0.0)
  chex.assert_trees_all_close(kd0_traced, dist, rtol=1e-5, atol=atol)
  # alpha = 1 is exactly the hard-label loss.
  kd1 = losses.kd_objective(s, t, y, temperature=temperature, alpha=1.0)
  np.testing.assert_array_equal(kd1, losses.hard_label_loss(s, y))

  # The soft CE is *not* scaled: distillation = T^2 (CE - H(teacher)).
  ce = losses.soft_target_cross_entropy(s, t, temperature)
  entropy = -_sum_over_support(ref_softmax(t, temperature),
                               ref_log_softmax(t, temperature))
  chex.assert_trees_all_close(temperature**2 * (np.asarray(ce) - entropy),
                              dist, rtol=1e-4, atol=10 * atol)


def test_regression_kl_summed_not_averaged_over_classes():
  """(b) The KL is a sum over classes: no 1/C factor, padding-invariant."""
  shape, temperature = SHAPE, 2.0
  s, t = _logits(6, shape), _logits(7, shape)
  dist = np.asarray(losses.distillation_loss(s, t, temperature))
  kl_sum = temperature**2 * ref_kl(s, t, temperature)
  kl_mean = temperature**2 * ref_kl_class_mean(s, t, temperature)
  chex.assert_trees_all_close(dist, kl_sum, rtol=1e-5, atol=1e-5)
  chex.assert_trees_all_close(dist / kl_mean, np.full(4, 10.0), rtol=1e-4)

  # Padding with 90 masked classes (where=, or -inf in both) changes nothing;
  # a class-mean would shrink by 10 / 100.
  pad = ((0, 0), (0, 90))
  s_pad = jnp.pad(s, pad, constant_values=-jnp.inf)
  t_pad = jnp.pad(t, pad, constant_values=-jnp.inf)
  where = np.arange(100) < 10
  s_garbage = jnp.pad(s, pad, constant_values=5.0)
  t_garbage = jnp.pad(t, pad, constant_values=-7.0)
  for padded in (
      losses.distillation_loss(s_pad, t_pad, temperature),
      losses.distillation_loss(s_garbage, t_garbage, temperature,
                               where=where),
  ):
    chex.assert_trees_all_close(padded, dist, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(
      losses.soft_target_cross_entropy(s_pad, t_pad, temperature),
      losses.soft_target_cross_entropy(s, t, temperature), rtol=1e-6)


def test_regression_kl_argument_order_teacher_first():
  """(c) KL(teacher || student), not KL(student || teacher)."""
  temperature = 1.0
  s = jnp.array([[4.0, 0.0, 0.0, -2.0]])  # Confident student.
  t = jnp.array([[0.5, 0.3, 0.0, 0.1]])  # Soft teacher.
  forward = ref_kl(s, t, temperature)  # KL(p_teacher || q_student)
  reverse = ref_kl(t, s, temperature)  # KL(q_student || p_teacher)
  assert abs(forward[0] - reverse[0]) > 0.2 * forward[0]  # Asymmetric.
  dist = losses.distillation_loss(s, t, temperature)
  chex.assert_trees_all_close(dist, forward, rtol=1e-5)
  assert abs(float(dist[0]) - reverse[0]) > 0.1 * reverse[0]
  # The gradient w.r.t. the *student* is T (q - p) (it is not for KL(q||p)).
  grad = jax.grad(lambda z: losses.distillation_loss(z, t, 3.0).sum())(s)
  expected = 3.0 * (ref_softmax(s, 3.0) - ref_softmax(t, 3.0))
  chex.assert_trees_all_close(grad, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("temperature", [1.0, 4.0, 20.0])
def test_regression_low_precision_inputs_use_float32_softmax(dtype,
                                                             temperature):
  """(d) bf16/f16 logits: float32 outputs, exact to ~1e-5 relative.

  A softmax computed in bf16 has ~1e-2 relative error and fails this.
  """
  shape = SHAPE
  s, t, y = _logits(8, shape, dtype), _logits(9, shape, dtype), _labels(
      10, shape)
  for fn, ref, rtol in (
      (lambda: losses.tempered_softmax(s, temperature),
       lambda: ref_softmax(s, temperature), 1e-5),
      (lambda: losses.soft_target_cross_entropy(s, t, temperature),
       lambda: ref_soft_ce(s, t, temperature), 1e-5),
      (lambda: losses.distillation_loss(s, t, temperature),
       lambda: ref_distillation(s, t, temperature), 1e-5),
      (lambda: losses.kd_objective(s, t, y, temperature=temperature,
                                   alpha=0.5),
       lambda: ref_kd(s, t, y, temperature, 0.5), 1e-5),
      (lambda: losses.logit_matching_loss(s, t),
       lambda: ref_logit_matching(s, t), 1e-5),
  ):
    value = fn()
    assert value.dtype == jnp.float32
    chex.assert_trees_all_close(value, ref(), rtol=rtol, atol=1e-6)
  # The same holds for the gradient (the softmaxes it is made of).
  grad = jax.grad(
      lambda z: losses.distillation_loss(z, t, temperature).sum())(s)
  assert grad.dtype == dtype  # Cotangent of a bf16 input is bf16 ...
  expected = temperature * (ref_softmax(s, temperature) -
                            ref_softmax(t, temperature))
  # ... rounded once, at the end (bf16 has 8 bits: rtol 2^-8).
  chex.assert_trees_all_close(_f64(grad), expected, rtol=2.0**-7,
                              atol=2.0**-7 * np.abs(expected).max())


_MASKED_TEACHER = jnp.array([[2.0, -jnp.inf, 0.5, 1.0, -jnp.inf],
                             [0.1, 0.2, -jnp.inf, 0.3, 3.0]])
_STUDENT = jnp.array([[1.0, 0.0, -1.0, 2.0, 0.5],
                      [0.5, -0.5, 1.0, 0.0, 2.0]])


@pytest.mark.integration
@pytest.mark.parametrize("temperature", [0.1, 1.0, 4.0, 20.0, 1000.0])
def test_regression_masked_teacher_logits_finite_values_and_gradients(
    temperature):
  """(e) Teacher -inf logits: finite loss, finite grads w.r.t. both inputs."""
  s, t = _STUDENT, _MASKED_TEACHER
  y = jnp.array([0, 4])
  for fn in (
      lambda s, t: losses.distillation_loss(s, t, temperature),
      lambda s, t: losses.soft_target_cross_entropy(s, t, temperature),
      lambda s, t: losses.kd_objective(s, t, y, temperature=temperature,
                                       alpha=0.2),
  ):
    value = fn(s, t)
    assert np.all(np.isfinite(value))
    g_s, g_t = jax.grad(lambda s, t, fn=fn: fn(s, t).sum(),
                        argnums=(0, 1))(s, t)
    assert np.all(np.isfinite(g_s)) and np.all(np.isfinite(g_t))
    # The masked teacher classes carry no gradient.
    np.testing.assert_array_equal(np.asarray(g_t)[np.isinf(t)], 0.0)
  chex.assert_trees_all_close(
      losses.distillation_loss(s, t, temperature),
      ref_distillation(s, t, temperature), rtol=1e-5,
      atol=_kl_atol(temperature, 5, 3.0))
  # Gradient w.r.t. the student: T (q - p), with p = 0 on masked classes.
  grad = jax.grad(
      lambda z: losses.distillation_loss(z, t, temperature).sum())(s)
  expected = temperature * (ref_softmax(s, temperature) -
                            ref_softmax(t, temperature))
  chex.assert_trees_all_close(grad, expected, rtol=1e-4,
                              atol=1e-6 * temperature)


@pytest.mark.integration
@pytest.mark.parametrize("temperature", [0.1, 1.0, 20.0])
def test_regression_masked_in_both_student_and_teacher(temperature):
  """(e) A class that is -inf for student *and* teacher is simply absent."""
  s = _STUDENT.at[:, 1].set(-jnp.inf)
  t = _MASKED_TEACHER.at[:, 1].set(-jnp.inf)
  keep = np.array([0, 2, 3, 4])
  for fn in (
      lambda s, t: losses.distillation_loss(s, t, temperature),
      lambda s, t: losses.soft_target_cross_entropy(s, t, temperature),
      lambda s, t: losses.kd_objective(s, t, jnp.array([0, 3]),
                                       temperature=temperature, alpha=0.5),
  ):
    value = fn(s, t)
    g_s, g_t = jax.grad(lambda s, t, fn=fn: fn(s, t).sum(),
                        argnums=(0, 1))(s, t)
    assert np.all(np.isfinite(value))
    assert np.all(np.isfinite(g_s)) and np.all(np.isfinite(g_t))
  chex.assert_trees_all_close(
      losses.distillation_loss(s, t, temperature),
      losses.distillation_loss(s[:, keep], t[:, keep], temperature),
      rtol=1e-6, atol=1e-7)


def test_regression_one_hot_teacher_at_low_temperature():
  """(e) 0 * log 0: a one-hot-like teacher (underflowing p) gives no NaN."""
  t = jnp.array([[50.0, 0.0, 0.0, -10.0], [0.0, 0.0, 80.0, 0.0]])
  s = jnp.array([[1.0, 2.0, 0.0, -1.0], [0.0, 3.0, 1.0, 0.0]])
  for temperature in (0.1, 0.5, 1.0):
    p = ref_softmax(t, temperature)
    assert np.any(p == 0.0) or np.min(p) < 1e-30  # Genuinely one-hot-like.
    value = losses.distillation_loss(s, t, temperature)
    chex.assert_trees_all_close(value, ref_distillation(s, t, temperature),
                                rtol=1e-5, atol=_kl_atol(temperature, 4, 80))
    g_s, g_t = jax.grad(
        lambda s, t, temp=temperature: losses.distillation_loss(
            s, t, temp).sum(),
        argnums=(0, 1))(s, t)
    assert np.all(np.isfinite(g_s)) and np.all(np.isfinite(g_t))
    chex.assert_trees_all_close(
        losses.soft_target_cross_entropy(s, t, temperature),
        ref_soft_ce(s, t, temperature), rtol=1e-5)
  # Identical one-hot-like teacher and student: exactly zero.
  np.testing.assert_array_equal(losses.distillation_loss(t, t, 0.1), 0.0)


@pytest.mark.integration
def test_regression_where_mask_equals_dropping_the_classes():
  """(e) where= is the same as slicing the masked classes away, everywhere."""
  shape, temperature = SHAPE, 2.0
  keep = np.array([0, 2, 3, 6, 7, 9])
  where = np.isin(np.arange(10), keep)
  s, t = _logits(11, shape), _logits(12, shape)
  # Garbage (huge, -inf) in masked student/teacher entries must not matter.
  s = s.at[:, 1].set(1e4).at[:, 4].set(-jnp.inf)
  t = t.at[:, 1].set(-1e4).at[:, 5].set(-jnp.inf)
  y_full = jnp.array([0, 3, 7, 9])
  y_kept = jnp.array([0, 2, 4, 5])  # The same classes, re-indexed.
  sk, tk = s[:, keep], t[:, keep]
  pairs = {
      "soft_ce": (losses.soft_target_cross_entropy(s, t, temperature,
                                                   where=where),
                  losses.soft_target_cross_entropy(sk, tk, temperature)),
      "distillation": (losses.distillation_loss(s, t, temperature,
                                                where=where),
                       losses.distillation_loss(sk, tk, temperature)),
      "logit_matching": (losses.logit_matching_loss(s, t, where=where),
                         losses.logit_matching_loss(sk, tk)),
      "logit_matching_raw": (
          losses.logit_matching_loss(s, t, zero_mean=False, where=where),
          losses.logit_matching_loss(sk, tk, zero_mean=False)),
      "hard": (losses.hard_label_loss(s, y_full, where=where),
               losses.hard_label_loss(sk, y_kept)),
      "kd": (losses.kd_objective(s, t, y_full, temperature=temperature,
                                 alpha=0.4, where=where),
             losses.kd_objective(sk, tk, y_kept, temperature=temperature,
                                 alpha=0.4)),
      "softmax": (losses.tempered_softmax(s, temperature,
                                          where=where)[:, keep],
                  losses.tempered_softmax(sk, temperature)),
      "log_softmax": (losses.tempered_log_softmax(s, temperature,
                                                  where=where)[:, keep],
                      losses.tempered_log_softmax(sk, temperature)),
  }
  for name, (masked, sliced) in pairs.items():
    assert np.all(np.isfinite(masked)), name
    chex.assert_trees_all_close(masked, sliced, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(
      losses.tempered_softmax(s, temperature, where=where)[:, ~where], 0.0)
  np.testing.assert_array_equal(
      losses.tempered_log_softmax(s, temperature, where=where)[:, ~where],
      -np.inf)
  # Gradients: finite, zero on masked classes, equal to the sliced ones.
  for fn in (
      lambda s, t, w: losses.distillation_loss(s, t, temperature, where=w),
      lambda s, t, w: losses.soft_target_cross_entropy(s, t, temperature,
                                                       where=w),
      lambda s, t, w: losses.logit_matching_loss(s, t, where=w),
  ):
    g_s, g_t = jax.grad(lambda s, t, fn=fn: fn(s, t, where).sum(),
                        argnums=(0, 1))(s, t)
    gk_s, gk_t = jax.grad(lambda s, t, fn=fn: fn(s, t, None).sum(),
                          argnums=(0, 1))(sk, tk)
    for g, gk in ((g_s, gk_s), (g_t, gk_t)):
      assert np.all(np.isfinite(g))
      np.testing.assert_array_equal(np.asarray(g)[:, ~where], 0.0)
      chex.assert_trees_all_close(g[:, keep], gk, rtol=1e-5, atol=1e-6)


@pytest.mark.integration
def test_regression_nonnegativity_clip_keeps_gradient():
  """Clipping the KL's rounding error at 0 must not zero its gradient.

  With student ~ teacher the float32 KL is dominated by rounding, so about
  half of the rows come out (slightly) negative; ``jnp.maximum(kl, 0)``
  would silently give those rows a zero gradient.
  """
  shape, temperature = (64, 10), 1.0
  t = _logits(13, shape, scale=1.0)
  s = t + 1e-3 * _logits(14, shape, scale=1.0)
  value = losses.distillation_loss(s, t, temperature)
  assert np.all(np.asarray(value) >= 0.0)
  grad = jax.grad(
      lambda z: losses.distillation_loss(z, t, temperature).sum())(s)
  expected = temperature * (ref_softmax(s, temperature) -
                            ref_softmax(t, temperature))
  assert np.all(np.abs(expected).max(axis=-1) > 1e-6)  # No row is trivial.
  chex.assert_trees_all_close(grad, expected, rtol=1e-2, atol=1e-7)


# -----------------------------------------------------------------------------
# Invariances.
# -----------------------------------------------------------------------------


def _per_example_fns(temperature, y):
  return {
      "soft_ce": lambda s, t: losses.soft_target_cross_entropy(
          s, t, temperature),
      "distillation": lambda s, t: losses.distillation_loss(s, t,
                                                            temperature),
      "logit_matching": lambda s, t: losses.logit_matching_loss(s, t),
      "logit_matching_raw": lambda s, t: losses.logit_matching_loss(
          s, t, zero_mean=False),
      "kd": lambda s, t: losses.kd_objective(
          s, t, y, temperature=temperature, alpha=0.25),
  }


@pytest.mark.integration
@pytest.mark.parametrize("temperature", [1.0, 20.0])
def test_duplicating_the_batch_changes_no_per_example_value(temperature):
  shape = SHAPE
  s, t, y = _logits(15, shape), _logits(16, shape), _labels(17, shape)
  fns = _per_example_fns(temperature, y)
  fns2 = _per_example_fns(temperature, jnp.concatenate([y, y]))
  s2, t2 = jnp.concatenate([s, s]), jnp.concatenate([t, t])
  for name in fns:
    single = fns[name](s, t)
    double = fns2[name](s2, t2)
    chex.assert_shape(double, (8,))
    chex.assert_trees_all_close(double, jnp.concatenate([single, single]),
                                rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("temperature", [0.5, 4.0, 100.0])
def test_adding_a_per_row_constant_changes_nothing(temperature):
  shape = SHAPE
  s, t, y = _logits(18, shape), _logits(19, shape), _labels(20, shape)
  c_s = jnp.array([[3.0], [-50.0], [0.25], [1000.0]])
  c_t = jnp.array([[-7.0], [20.0], [0.0], [-300.0]])
  fns = _per_example_fns(temperature, y)
  for name, fn in fns.items():
    if name == "logit_matching_raw":
      continue
    base = fn(s, t)
    shifted = fn(s + c_s, t + c_t)
    # A shift of 1000 loses ~eps * 1000 of the logits' precision.
    atol = 4e3 * EPS32 * max(1.0, temperature)
    chex.assert_trees_all_close(shifted, base, rtol=1e-4, atol=atol)
  chex.assert_trees_all_close(losses.tempered_softmax(s + c_s, temperature),
                              losses.tempered_softmax(s, temperature),
                              rtol=1e-4, atol=1e-6)
  chex.assert_trees_all_close(losses.hard_label_loss(s + c_s, y),
                              losses.hard_label_loss(s, y), rtol=1e-4,
                              atol=1e-4)
  # Without zero_mean, logit matching does see the shift: it is
  # 0.5 * mean_i (z_i - v_i + c)^2, i.e. it grows by c * mean(d) + c^2 / 2.
  raw = losses.logit_matching_loss(s + 1.5, t, zero_mean=False)
  d = _f64(s) - _f64(t)
  expected = 0.5 * np.mean((d + 1.5)**2, axis=-1)
  chex.assert_trees_all_close(raw, expected, rtol=1e-5)
  assert np.all(np.abs(np.asarray(raw) - ref_logit_matching(s, t, False)) >
                0.1)


@pytest.mark.parametrize("temperature", [0.1, 1.0, 20.0, 1000.0])
def test_equal_logits_give_zero(temperature):
  s = _logits(21, SHAPE)
  np.testing.assert_array_equal(losses.distillation_loss(s, s, temperature),
                                0.0)
  np.testing.assert_array_equal(losses.logit_matching_loss(s, s), 0.0)
  np.testing.assert_array_equal(
      losses.logit_matching_loss(s, s, zero_mean=False), 0.0)
  # Shifted copies: zero up to rounding (and never negative).
  shifted = losses.distillation_loss(s, s + 3.0, temperature)
  assert np.all(np.asarray(shifted) >= 0.0)
  assert np.all(np.asarray(shifted) <= _kl_atol(temperature, 10, 12.0))
  np.testing.assert_allclose(losses.logit_matching_loss(s, s + 3.0), 0.0,
                             atol=1e-5)


# -----------------------------------------------------------------------------
# Paper identities (Hinton et al., 2015) through jax.grad.
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 20.0, 100.0])
def test_soft_ce_gradient_is_eq2(temperature):
  """dC/dz_i = (q_i - p_i) / T (paper, eq. 2)."""
  shape = (4, 10)
  s, t = _logits(22, shape), _logits(23, shape)
  grad = jax.grad(lambda z: losses.soft_target_cross_entropy(
      z, t, temperature).sum())(s)
  expected = (ref_softmax(s, temperature) -
              ref_softmax(t, temperature)) / temperature
  chex.assert_trees_all_close(grad, expected, rtol=1e-4,
                              atol=1e-6 / temperature)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 20.0, 100.0])
def test_distillation_gradient_is_t_times_q_minus_p(temperature):
  """d(T^2 KL)/dz_i = T (q_i - p_i); w.r.t. v_k: T p_k (log p_k/q_k - KL)."""
  shape = (4, 10)
  s, t = _logits(24, shape), _logits(25, shape)
  g_s, g_t = jax.grad(
      lambda z, v: losses.distillation_loss(z, v, temperature).sum(),
      argnums=(0, 1))(s, t)
  q, p = ref_softmax(s, temperature), ref_softmax(t, temperature)
  chex.assert_trees_all_close(g_s, temperature * (q - p), rtol=1e-4,
                              atol=1e-6 * temperature)
  log_ratio = ref_log_softmax(t, temperature) - ref_log_softmax(
      s, temperature)
  kl = ref_kl(s, t, temperature)[..., None]
  chex.assert_trees_all_close(g_t, temperature * p * (log_ratio - kl),
                              rtol=1e-4, atol=1e-6 * temperature)


@pytest.mark.integration
def test_high_temperature_gradient_approaches_logit_matching():
  """As T grows, grad of T^2 KL -> grad of logit matching, error ~ 1/T."""
  shape = (4, 10)
  with jax.enable_x64(True):
    s = jnp.asarray(_f64(_logits(26, shape, scale=1.0)))
    t = jnp.asarray(_f64(_logits(27, shape, scale=1.0))) + 0.7  # Mean shift.
    assert s.dtype == jnp.float64
    lm = jax.grad(lambda z: losses.logit_matching_loss(z, t).sum())(s)
    grad = jax.jit(jax.grad(lambda z, T: losses.distillation_loss(
        z, t, T).sum()))  # One compile: T is traced.
    errors = {}
    for temperature in (10.0, 100.0, 1000.0):
      g = grad(s, jnp.float64(temperature))
      assert g.dtype == jnp.float64
      errors[temperature] = float(jnp.max(jnp.abs(g - lm)))
    lm_raw = jax.grad(lambda z: losses.logit_matching_loss(
        z, t, zero_mean=False).sum())(s)
    lm, lm_raw = np.asarray(lm), np.asarray(lm_raw)
  # error(T) * T is about constant: ratios ~10 per decade of T.
  assert 5.0 < errors[10.0] / errors[100.0] < 20.0, errors
  assert 5.0 < errors[100.0] / errors[1000.0] < 20.0, errors
  assert errors[1000.0] < 1e-2 * np.max(np.abs(lm))
  # The limit is the *zero-mean* logit matching (eq. 4), not plain (z - v)^2.
  assert np.max(np.abs(lm_raw - lm)) > 100 * errors[1000.0]


def test_high_temperature_limit_in_float32():
  """The same limit in float32 at moderate T: error shrinks ~10x per decade."""
  shape = (4, 10)
  s = _logits(28, shape, scale=0.5)
  t = _logits(29, shape, scale=0.5)
  lm = np.asarray(jax.grad(lambda z: losses.logit_matching_loss(z, t).sum())(
      s))
  err = []
  for temperature in (10.0, 100.0):
    g = jax.grad(lambda z, T=temperature: losses.distillation_loss(
        z, t, T).sum())(s)
    err.append(float(np.max(np.abs(np.asarray(g) - lm))))
  assert 5.0 < err[0] / err[1] < 20.0, err


def test_t_squared_keeps_gradient_norm_comparable_across_temperatures():
  shape = SHAPE
  s, t = _logits(30, shape, scale=2.0), _logits(31, shape, scale=2.0)
  temps = (1.0, 5.0, 20.0, 100.0)
  norm = lambda f: float(jnp.linalg.norm(jax.grad(f)(s)))
  with_t2 = [norm(lambda z, T=T: losses.distillation_loss(z, t, T).sum())
             for T in temps]
  without_t2 = [norm(lambda z, T=T: losses.soft_target_cross_entropy(
      z, t, T).sum()) for T in temps]
  assert max(with_t2) / min(with_t2) < 5.0, with_t2
  # Without the T^2 factor the gradient shrinks like 1/T^2 (x ~10^4 here).
  assert without_t2[0] / without_t2[-1] > 1e3, without_t2


# -----------------------------------------------------------------------------
# alpha.
# -----------------------------------------------------------------------------


def test_alpha_one_is_plain_cross_entropy():
  shape = SHAPE
  s, t, y = _logits(32, shape), _logits(33, shape), _labels(34, shape)
  kd1 = losses.kd_objective(s, t, y, temperature=4.0, alpha=1.0)
  chex.assert_trees_all_close(
      kd1, optax.losses.softmax_cross_entropy_with_integer_labels(s, y),
      rtol=1e-6)
  chex.assert_trees_all_close(kd1, ref_hard(s, y), rtol=1e-5, atol=1e-6)
  # The teacher and temperature play no role.
  np.testing.assert_array_equal(
      kd1, losses.kd_objective(s, -t, y, temperature=0.3, alpha=1.0))


@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_alpha_is_the_convex_combination(alpha):
  shape, temperature = SHAPE, 4.0
  s, t, y = _logits(35, shape), _logits(36, shape), _labels(37, shape)
  kd = losses.kd_objective(s, t, y, temperature=temperature, alpha=alpha)
  hard = losses.hard_label_loss(s, y)
  soft = losses.distillation_loss(s, t, temperature)
  chex.assert_trees_all_close(kd, alpha * hard + (1 - alpha) * soft,
                              rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(kd, ref_kd(s, t, y, temperature, alpha),
                              rtol=1e-5, atol=1e-5)
  # alpha weights the *hard* labels: the soft term's weight is 1 - alpha.
  if alpha in (0.1, 0.9):
    swapped = (1 - alpha) * ref_hard(s, y) + alpha * ref_distillation(
        s, t, temperature)
    assert np.max(np.abs(np.asarray(kd) - swapped)) > 1e-2


# -----------------------------------------------------------------------------
# jit / vmap / grad, and no retracing.
# -----------------------------------------------------------------------------


def test_vmap_matches_the_batched_call():
  shape = SHAPE
  s, t, y = _logits(38, shape), _logits(39, shape), _labels(40, shape)
  fn = lambda s, t, y: losses.kd_objective(s, t, y, temperature=4.0,
                                           alpha=0.3)
  chex.assert_trees_all_close(jax.vmap(fn)(s, t, y), fn(s, t, y), rtol=1e-6)
  dist = lambda s, t: losses.distillation_loss(s, t, 20.0)
  chex.assert_trees_all_close(jax.vmap(dist)(s, t), dist(s, t), rtol=1e-6)


def test_vmap_over_traced_temperature_matches_python_temperatures():
  shape = SHAPE
  s, t = _logits(41, shape), _logits(42, shape)
  temps = (0.5, 4.0, 20.0, 1000.0)
  swept = jax.jit(jax.vmap(lambda T: losses.distillation_loss(s, t, T)))(
      jnp.array(temps))
  for i, temperature in enumerate(temps):
    chex.assert_trees_all_close(
        swept[i], losses.distillation_loss(s, t, temperature), rtol=1e-5,
        atol=_kl_atol(temperature, 10, 12.0))


def test_grad_of_the_batch_mean_objective():
  shape, temperature, alpha = SHAPE, 4.0, 0.1
  s, t, y = _logits(43, shape), _logits(44, shape), _labels(45, shape)
  objective = lambda z: jnp.mean(losses.kd_objective(
      z, t, y, temperature=temperature, alpha=alpha))
  grad = jax.jit(jax.grad(objective))(s)
  q1 = ref_softmax(s)
  onehot = np.eye(10)[np.asarray(y)]
  expected = (alpha * (q1 - onehot) + (1 - alpha) * temperature *
              (ref_softmax(s, temperature) - ref_softmax(t, temperature)))
  chex.assert_trees_all_close(grad, expected / shape[0], rtol=1e-4,
                              atol=1e-7)


def test_jit_does_not_retrace_for_same_shapes_or_new_temperature():
  traces = []

  @jax.jit
  def objective(s, t, y, temperature, alpha):
    traces.append(1)  # Runs once per trace.
    return jnp.mean(losses.kd_objective(s, t, y, temperature=temperature,
                                        alpha=alpha))

  shape = (4, 10)
  results = []
  for i, temperature in enumerate((1.0, 4.0, 20.0, 1000.0)):
    s, t, y = _logits(50 + i, shape), _logits(60 + i, shape), _labels(
        70 + i, shape)
    results.append(objective(s, t, y, jnp.float32(temperature),
                             jnp.float32(0.1)))
    expected = np.mean(ref_kd(s, t, y, temperature, 0.1))
    np.testing.assert_allclose(results[-1], expected, rtol=1e-5,
                               atol=_kl_atol(temperature, 10, 12.0))
  assert len(traces) == 1
  assert objective._cache_size() == 1  # pylint: disable=protected-access
  objective(_logits(80, (5, 10)), _logits(81, (5, 10)), _labels(82, (5, 10)),
            jnp.float32(2.0), jnp.float32(0.5))
  assert len(traces) == 2  # A new shape does retrace.


# -----------------------------------------------------------------------------
# Bad input.
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0, 0.0, -1.0, -1, float("nan")])
def test_non_positive_temperature_raises(temperature):
  s = t = jnp.zeros((2, 3))
  y = jnp.zeros((2,), jnp.int32)
  calls = (
      lambda: losses.tempered_softmax(s, temperature),
      lambda: losses.tempered_log_softmax(s, temperature),
      lambda: losses.soft_target_cross_entropy(s, t, temperature),
      lambda: losses.distillation_loss(s, t, temperature),
      lambda: losses.kd_objective(s, t, y, temperature=temperature,
                                  alpha=0.5),
  )
  for call in calls:
    with pytest.raises(ValueError, match="temperature"):
      call()


@pytest.mark.parametrize("alpha", [-0.1, 1.1, 2, float("nan")])
def test_alpha_outside_unit_interval_raises(alpha):
  s = t = jnp.zeros((2, 3))
  y = jnp.zeros((2,), jnp.int32)
  with pytest.raises(ValueError, match="alpha"):
    losses.kd_objective(s, t, y, temperature=2.0, alpha=alpha)


@pytest.mark.integration
@pytest.mark.parametrize("wrap", [jnp.float32, np.float64, np.asarray])
def test_concrete_array_temperature_and_alpha_are_checked(wrap):
  s = t = jnp.zeros((2, 3))
  y = jnp.zeros((2,), jnp.int32)
  with pytest.raises(ValueError, match="temperature"):
    losses.distillation_loss(s, t, wrap(-2.0))
  with pytest.raises(ValueError, match="alpha"):
    losses.kd_objective(s, t, y, temperature=2.0, alpha=wrap(1.5))
  # A per-example temperature array is checked elementwise.
  with pytest.raises(ValueError, match="temperature"):
    losses.distillation_loss(s, t, jnp.array([[2.0], [0.0]]))
  # Valid concrete arrays pass, and a traced temperature is not checked
  # (it cannot be) but still computes.
  np.testing.assert_allclose(losses.distillation_loss(s, t, wrap(2.0)), 0.0)
  out = jax.jit(lambda z, tt: losses.distillation_loss(z, z, tt))(s, 2.0)
  np.testing.assert_allclose(out, 0.0)


def test_non_numeric_temperature_or_alpha_is_a_type_error():
  s = jnp.zeros((2, 3))
  with pytest.raises(TypeError, match="temperature"):
    losses.distillation_loss(s, s, "20")
  with pytest.raises(TypeError, match="alpha"):
    losses.kd_objective(s, s, jnp.zeros((2,), jnp.int32), temperature=2.0,
                        alpha="0.5")


@pytest.mark.integration
@pytest.mark.parametrize("bad_label", [-1, 3, 100])
def test_regression_out_of_range_label_is_nan_not_another_class(bad_label):
  # optax's integer cross-entropy wraps -1 around to class C - 1 (a
  # plausible, wrong loss). kdjax returns NaN for that row only.
  z = jnp.array([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0]])
  y = jnp.array([bad_label, 2])
  out = np.asarray(losses.hard_label_loss(z, y))
  assert np.isnan(out[0])
  ref = -(_f64(z)[1, 2] - np.log(np.sum(np.exp(_f64(z)[1]))))
  np.testing.assert_allclose(out[1], ref, rtol=1e-6)
  # Its gradient is finite (zero) on the bad row: NaN never leaks into the
  # other rows' update through a sum.
  g = jax.grad(lambda z: jnp.nansum(losses.hard_label_loss(z, y)))(z)
  assert np.all(np.isfinite(g)) and np.all(np.asarray(g[0]) == 0.0)
  # With a hard-label weight the objective is NaN (the train step's guard
  # then skips the batch) ...
  kd = losses.kd_objective(z, z + 1.0, y, temperature=4.0, alpha=0.3)
  assert np.isnan(kd[0]) and np.isfinite(kd[1])
  # ... and at alpha = 0 no label is read: any integer is fine.
  kd0 = losses.kd_objective(z, 2.0 * z, y, temperature=4.0, alpha=0.0)
  np.testing.assert_array_equal(kd0, losses.distillation_loss(z, 2.0 * z, 4.0))
  g0 = jax.grad(lambda z: jnp.sum(losses.kd_objective(
      z, 2.0 * z, y, temperature=4.0, alpha=jnp.float32(0.0))))(z)
  assert np.all(np.isfinite(g0))


def test_mismatched_shapes_raise_with_both_shapes():
  s, t = jnp.zeros((4, 10)), jnp.zeros((4, 9))
  y = jnp.zeros((4,), jnp.int32)
  for call in (
      lambda: losses.soft_target_cross_entropy(s, t, 2.0),
      lambda: losses.distillation_loss(s, t, 2.0),
      lambda: losses.logit_matching_loss(s, t),
      lambda: losses.kd_objective(s, t, y, temperature=2.0, alpha=0.5),
  ):
    with pytest.raises(ValueError) as info:
      call()
    assert "(4, 10)" in str(info.value) and "(4, 9)" in str(info.value)


def test_labels_shape_and_dtype_errors():
  s = jnp.zeros((4, 10))
  for labels in (jnp.zeros((5,), jnp.int32), jnp.zeros((4, 1), jnp.int32)):
    with pytest.raises(ValueError) as info:
      losses.hard_label_loss(s, labels)
    assert str(tuple(labels.shape)) in str(info.value)
    assert "(4,)" in str(info.value)
    with pytest.raises(ValueError):
      losses.kd_objective(s, s, labels, temperature=2.0, alpha=0.5)
  with pytest.raises(TypeError, match="integer"):
    losses.hard_label_loss(s, jnp.zeros((4,), jnp.float32))


def test_where_that_does_not_broadcast_raises():
  s = jnp.zeros((4, 10))
  with pytest.raises(ValueError, match="where"):
    losses.distillation_loss(s, s, 2.0, where=np.ones((4, 9), bool))


# -----------------------------------------------------------------------------
# Extreme inputs.
# -----------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("temperature", [0.1, 1.0, 10.0, 100.0, 1000.0])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_extreme_inputs_give_finite_values_and_gradients(temperature, dtype):
  shape = (4, 10)
  s = _logits(90, shape, dtype, scale=1e4)
  t = _logits(91, shape, dtype, scale=1e4)
  y = _labels(92, shape)
  fns = {
      "distillation": lambda s, t: losses.distillation_loss(s, t,
                                                            temperature),
      "soft_ce": lambda s, t: losses.soft_target_cross_entropy(
          s, t, temperature),
      "kd": lambda s, t: losses.kd_objective(
          s, t, y, temperature=temperature, alpha=0.1),
      "logit_matching": lambda s, t: losses.logit_matching_loss(s, t),
  }
  for name, fn in fns.items():
    value = fn(s, t)
    assert value.dtype == jnp.float32, name
    assert np.all(np.isfinite(value)), name
    assert np.all(np.asarray(value) >= 0.0), name
    g_s, g_t = jax.grad(lambda s, t, fn=fn: fn(s, t).sum(),
                        argnums=(0, 1))(s, t)
    assert np.all(np.isfinite(_f64(g_s))), name
    assert np.all(np.isfinite(_f64(g_t))), name
  chex.assert_trees_all_close(
      fns["distillation"](s, t), ref_distillation(s, t, temperature),
      rtol=1e-5, atol=_kl_atol(temperature, 10, 4e4))


# -----------------------------------------------------------------------------
# Properties (hypothesis).
# -----------------------------------------------------------------------------


@jax.jit
def _values_and_grads(s, t, y, mask, temperature):
  def total(s, t):
    return losses.distillation_loss(s, t, temperature, where=mask).sum()
  g_s, g_t = jax.grad(total, argnums=(0, 1))(s, t)
  return {
      "distillation": losses.distillation_loss(s, t, temperature,
                                               where=mask),
      "soft_ce": losses.soft_target_cross_entropy(s, t, temperature,
                                                  where=mask),
      "logit_matching": losses.logit_matching_loss(s, t, where=mask),
      "kd": losses.kd_objective(s, t, y, temperature=temperature, alpha=0.1,
                                where=mask),
      "grad_s": g_s,
      "grad_t": g_t,
  }


@st.composite
def _problems(draw):
  lead = draw(st.lists(st.integers(1, 3), min_size=1, max_size=3))
  num_classes = draw(st.integers(2, 50))
  shape = tuple(lead) + (num_classes,)
  temperature = 10.0**draw(st.floats(-1.0, 3.0))
  scale = 10.0**draw(st.floats(-2.0, 2.5))
  seed = draw(st.integers(0, 2**32 - 1))
  use_mask = draw(st.booleans())
  rng = np.random.default_rng(seed)
  s = (scale * rng.standard_normal(shape)).astype(np.float32)
  closeness = draw(st.sampled_from([1.0, 1e-2]))  # Near-converged students.
  t = (s + closeness * scale * rng.standard_normal(shape)).astype(np.float32)
  y = rng.integers(0, num_classes, size=shape[:-1]).astype(np.int32)
  if use_mask:
    mask = rng.random(shape) < 0.7
    mask[..., 0] = True  # At least one class per row,
    y = np.zeros(shape[:-1], np.int32)  # and the label is kept.
  else:
    mask = np.ones(shape, bool)
  return s, t, y, mask, float(temperature)


# Every example is a new shape, so a compile: as many examples as the
# profile says (conftest.py: 6 in the unit tier, 25 with "thorough").
@pytest.mark.integration
@hypothesis.given(_problems())
def test_property_finite_nonnegative_and_matches_reference(problem):
  s, t, y, mask, temperature = problem
  out = _values_and_grads(s, t, y, mask, np.float32(temperature))
  for name, value in out.items():
    assert np.all(np.isfinite(value)), name
  for name in ("distillation", "soft_ce", "logit_matching", "kd"):
    assert np.all(np.asarray(out[name]) >= 0.0), name

  num_classes = s.shape[-1]
  max_abs = float(np.max(np.abs(np.stack([s, t]))))
  atol = _kl_atol(temperature, num_classes, max_abs)
  ref = ref_distillation(s, t, temperature, mask)
  chex.assert_trees_all_close(out["distillation"], ref, rtol=1e-4, atol=atol)
  chex.assert_trees_all_close(
      out["soft_ce"], ref_soft_ce(s, t, temperature, mask), rtol=1e-5,
      atol=16 * EPS32 * (1 + 2 * max_abs / temperature +
                         math.log(num_classes)))
  chex.assert_trees_all_close(
      out["logit_matching"], ref_logit_matching(s, t, True, mask), rtol=1e-5,
      atol=8 * EPS32 * max_abs**2)
  chex.assert_trees_all_close(
      out["kd"], ref_kd(s, t, y, temperature, 0.1, mask), rtol=1e-4,
      atol=atol + 8 * EPS32 * (1 + max_abs))
  q = ref_softmax(s, temperature, mask)
  p = ref_softmax(t, temperature, mask)
  chex.assert_trees_all_close(out["grad_s"], temperature * (q - p),
                              rtol=1e-3, atol=16 * EPS32 * temperature)
  np.testing.assert_array_equal(np.asarray(out["grad_s"])[~mask], 0.0)
  np.testing.assert_array_equal(np.asarray(out["grad_t"])[~mask], 0.0)
