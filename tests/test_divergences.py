"""Tests for the reverse KL and the generalised JSD in kdjax.losses.

Values and gradients are compared with a float64 NumPy reference computed
from the *same rounded inputs*. Tolerances follow a float32 error model
(``_atol``): every term ``w_i f_i`` of the sum is computed with a relative
error of a few ``eps`` times the conditioning of its log-probabilities
(``|logit|/T + log C``), so the absolute error is bounded by
``eps * (|logit|/T + log C) * sum_i |w_i f_i|``, computed per row from the
reference. No test compares with a hard-coded result.
"""

import math

import chex
import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import losses

EPS32 = float(np.finfo(np.float32).eps)
SHAPE = (4, 10)  # Most tests share one shape, so eager ops compile once.
TEMPERATURES = (0.5, 1.0, 4.0, 20.0, 100.0)
BETAS = (0.1, 0.5, 0.9)


# -----------------------------------------------------------------------------
# float64 NumPy reference.
# -----------------------------------------------------------------------------


def _f64(x):
  """An array's exact values as float64 (float64 inputs stay as they are)."""
  if isinstance(x, np.ndarray) and x.dtype == np.float64:
    return x
  return np.asarray(jnp.asarray(x).astype(jnp.float32), dtype=np.float64)


def _mask(where, shape):
  if where is None:
    return np.ones(shape, dtype=bool)
  return np.broadcast_to(np.asarray(where, dtype=bool), shape)


def ref_log_softmax(logits, temperature, where=None):
  """float64 log-softmax, with ``log1p`` of the non-max mass.

  ``log(sum exp)`` would round ``log(1 + 1e-31)`` to 0: a nearly one-hot
  row's largest log-probability must stay ``-1e-31``, not 0 (else its
  ``~1e-30`` KL comes out as 0 and float32 kdjax looks wrong).
  """
  x = _f64(logits) / temperature
  x = np.where(_mask(where, x.shape), x, -np.inf)
  shifted = x - np.max(x, axis=-1, keepdims=True)
  first_max = np.arange(x.shape[-1]) == np.argmax(x, axis=-1)[..., None]
  rest = np.sum(np.where(first_max, 0.0, np.exp(shifted)), axis=-1,
                keepdims=True)
  return shifted - np.log1p(rest)


def _terms(w, log_w, log_other):
  """``w_i (log w_i - log other_i)`` with 0 where ``w_i = 0``."""
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(w > 0, w * (log_w - log_other), 0.0)


def ref_kl(log_a, log_b):
  """KL(a || b) from float64 log-probabilities."""
  return np.sum(_terms(np.exp(log_a), log_a, log_b), axis=-1)


def ref_reverse(s, t, temperature, where=None):
  log_q = ref_log_softmax(s, temperature, where)
  log_p = ref_log_softmax(t, temperature, where)
  return temperature**2 * ref_kl(log_q, log_p)


def ref_forward(s, t, temperature, where=None):
  return ref_reverse(t, s, temperature, where)


def _ref_parts(s, t, temperature, beta, where=None):
  log_q = ref_log_softmax(s, temperature, where)
  log_p = ref_log_softmax(t, temperature, where)
  # log m = log(beta p + (1 - beta) q), in probability space, relative to
  # q: log q + log((1 - beta) + beta p / q), with log1p where that is small
  # (float64 would round the sum of two ~1 probabilities).
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    d = np.where(np.isfinite(log_q), log_p - log_q, np.inf)
    near = np.log1p(beta * np.expm1(np.clip(d, -1.0, 1.0)))
    far = np.logaddexp(np.log1p(-beta), np.log(beta) + d)
    log_m = np.where(np.isfinite(log_q),
                     log_q + np.where(np.abs(d) <= 1.0, near, far),
                     np.log(beta) + log_p)
  return log_p, log_q, log_m


def ref_jsd(s, t, temperature, beta, normalize=True, where=None):
  """T^2 JSD_beta, divided by beta (1 - beta) when normalised."""
  if normalize and beta == 0.0:
    return ref_forward(s, t, temperature, where)
  if normalize and beta == 1.0:
    return ref_reverse(s, t, temperature, where)
  log_p, log_q, log_m = _ref_parts(s, t, temperature, beta, where)
  kl_p, kl_q = ref_kl(log_p, log_m), ref_kl(log_q, log_m)
  if normalize:
    return temperature**2 * (kl_p / (1.0 - beta) + kl_q / beta)
  return temperature**2 * (beta * kl_p + (1.0 - beta) * kl_q)


def ref_jsd_grads(s, t, temperature, beta, normalize=True):
  """Analytic d/dz and d/dv of ``ref_jsd`` (see the docstring)."""
  log_p, log_q, log_m = _ref_parts(s, t, temperature, beta)
  p, q = np.exp(log_p), np.exp(log_q)
  kl_p = ref_kl(log_p, log_m)[..., None]
  kl_q = ref_kl(log_q, log_m)[..., None]
  g_z = temperature / beta * q * (log_q - log_m - kl_q)
  g_v = temperature / (1.0 - beta) * p * (log_p - log_m - kl_p)
  scale = 1.0 if normalize else beta * (1.0 - beta)
  return scale * g_z, scale * g_v


def ref_reverse_grads(s, t, temperature):
  log_q = ref_log_softmax(s, temperature)
  log_p = ref_log_softmax(t, temperature)
  p, q = np.exp(log_p), np.exp(log_q)
  kl = ref_kl(log_q, log_p)[..., None]
  return temperature * q * (log_q - log_p - kl), temperature * (p - q)


def _atol(s, t, temperature, beta=None, where=None):
  """Per-row float32 error bound of the loss (see the module docstring).

  ``sum_i |w_i f_i|`` over the terms of the (normalised) sum, times
  ``eps (2 max|logit| / T + log C + 1)``, times a safety factor of 16.
  There is no ``eps T^2 log C`` floor: the log-ratios are computed without
  cancellation, so equal inputs give exactly 0 and near-equal ones an error
  relative to their (small) terms.
  """
  num_classes = np.shape(s)[-1]
  max_abs = float(np.max(np.abs(np.where(
      np.isfinite(_f64(s)) & np.isfinite(_f64(t)),
      np.maximum(np.abs(_f64(s)), np.abs(_f64(t))), 0.0))))
  if beta is None:  # Reverse KL.
    log_q = ref_log_softmax(s, temperature, where)
    log_p = ref_log_softmax(t, temperature, where)
    mag = np.sum(np.abs(_terms(np.exp(log_q), log_q, log_p)), axis=-1)
  else:
    log_p, log_q, log_m = _ref_parts(s, t, temperature, beta, where)
    bp = (1.0 - beta) if beta < 1.0 else 1.0
    bq = beta if beta > 0.0 else 1.0
    mag = np.sum(np.abs(_terms(np.exp(log_p), log_p, log_m)) / bp +
                 np.abs(_terms(np.exp(log_q), log_q, log_m)) / bq, axis=-1)
  cond = 2.0 * max_abs / temperature + math.log(num_classes) + 1.0
  atol = 16.0 * EPS32 * temperature**2 * mag * cond
  if beta is None and temperature < 8.0:
    # distillation_loss (which computes the reverse KL) uses the plain
    # formula below T = 8: error ~eps T^2 log C (see its docstring).
    atol = atol + 8.0 * EPS32 * temperature**2 * (1.0 + math.log(num_classes))
  return atol


def _close(actual, expected, atol):
  actual = np.asarray(actual, dtype=np.float64)
  err = np.abs(actual - expected)
  # 1e-30: float32 flushes a loss near its smallest normal (~1e-38) to 0.
  assert np.all(err <= atol + 1e-6 * np.abs(expected) + 1e-30), (
      f"max error {np.max(err - atol)} over the bound; actual={actual}, "
      f"expected={expected}, atol={atol}")


# -----------------------------------------------------------------------------
# Inputs.
# -----------------------------------------------------------------------------


def _logits(seed, shape=SHAPE, dtype=jnp.float32, scale=3.0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(scale * rng.standard_normal(shape), dtype=dtype)


# -----------------------------------------------------------------------------
# Values and gradients against the reference, eager and jitted.
# -----------------------------------------------------------------------------


_JSD_JIT = jax.jit(losses.generalized_jsd_loss,
                   static_argnames=("normalize",))
_REVERSE_JIT = jax.jit(losses.reverse_distillation_loss)


@pytest.mark.integration
@pytest.mark.parametrize("normalize", [True, False])
def test_jsd_matches_float64_reference(normalize):
  s, t = _logits(0), _logits(1)
  for temperature in TEMPERATURES:
    for beta in BETAS:
      ref = ref_jsd(s, t, temperature, beta, normalize)
      atol = _atol(s, t, temperature, beta)
      if not normalize:
        atol = atol * beta * (1.0 - beta)
      # Eager with Python numbers (the static paths) and jitted with traced
      # temperature and beta (the run-time paths; one compile for all).
      for out in (losses.generalized_jsd_loss(s, t, temperature, beta=beta,
                                              normalize=normalize),
                  _JSD_JIT(s, t, temperature, beta=beta,
                           normalize=normalize)):
        assert out.dtype == jnp.float32
        chex.assert_shape(out, SHAPE[:-1])
        _close(out, ref, atol)


def test_reverse_matches_float64_reference():
  s, t = _logits(2), _logits(3)
  for temperature in TEMPERATURES:
    ref = ref_reverse(s, t, temperature)
    for out in (losses.reverse_distillation_loss(s, t, temperature),
                _REVERSE_JIT(s, t, temperature)):
      assert out.dtype == jnp.float32
      _close(out, ref, _atol(s, t, temperature))


@pytest.mark.integration
def test_other_shapes():
  for shape in ((10,), (2, 3, 7)):
    s, t = _logits(4, shape), _logits(5, shape)
    out = losses.generalized_jsd_loss(s, t, 2.0, beta=0.3)
    chex.assert_shape(out, shape[:-1])
    _close(out, ref_jsd(s, t, 2.0, 0.3), _atol(s, t, 2.0, 0.3))
    rev = losses.reverse_distillation_loss(s, t, 2.0)
    chex.assert_shape(rev, shape[:-1])
    _close(rev, ref_reverse(s, t, 2.0), _atol(s, t, 2.0))


_JSD_GRAD = jax.jit(jax.grad(
    lambda s, t, T, b, normalize: losses.generalized_jsd_loss(
        s, t, T, beta=b, normalize=normalize).sum(), argnums=(0, 1)),
                    static_argnums=4)
_REVERSE_GRAD = jax.jit(jax.grad(
    lambda s, t, T: losses.reverse_distillation_loss(s, t, T).sum(),
    argnums=(0, 1)))


def _grad_close(g, e, temperature):
  # Gradients are softmax-sized: 1e-4 relative, 1e-5 of the largest entry,
  # plus 64 eps T for entries near 0.
  chex.assert_trees_all_close(
      g, e, rtol=1e-4, atol=1e-5 * np.max(np.abs(e)) + 64 * EPS32 * temperature)


@pytest.mark.integration
@pytest.mark.parametrize("normalize", [True, False])
def test_jsd_gradients_match_analytic_float64(normalize):
  s, t = _logits(6), _logits(7)
  for temperature in TEMPERATURES:
    for beta in BETAS:
      g_z, g_v = _JSD_GRAD(s, t, temperature, beta, normalize)
      e_z, e_v = ref_jsd_grads(s, t, temperature, beta, normalize)
      _grad_close(g_z, e_z, temperature)
      _grad_close(g_v, e_v, temperature)


def test_reverse_gradients_match_analytic_float64():
  s, t = _logits(8), _logits(9)
  for temperature in TEMPERATURES:
    g_z, g_v = _REVERSE_GRAD(s, t, temperature)
    e_z, e_v = ref_reverse_grads(s, t, temperature)
    _grad_close(g_z, e_z, temperature)
    _grad_close(g_v, e_v, temperature)


@pytest.mark.integration
def test_gradient_matches_float64_finite_differences():
  """Central differences of the float64 reference at one point."""
  s, t, temperature, beta = _logits(10), _logits(11), 2.0, 0.3
  g = np.asarray(jax.grad(lambda z: losses.generalized_jsd_loss(
      z, t, temperature, beta=beta).sum())(s))
  base, h = _f64(s), 1e-6
  fd = np.zeros_like(base)
  for idx in np.ndindex(base.shape):
    plus, minus = base.copy(), base.copy()
    plus[idx] += h
    minus[idx] -= h
    fd[idx] = (ref_jsd(plus, t, temperature, beta).sum() -
               ref_jsd(minus, t, temperature, beta).sum()) / (2 * h)
  chex.assert_trees_all_close(g, fd, rtol=1e-4,
                              atol=1e-5 * np.max(np.abs(fd)))


# -----------------------------------------------------------------------------
# Identities between the divergences.
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 4.0, 20.0])
def test_reverse_is_forward_with_arguments_swapped(temperature):
  s, t = _logits(12), _logits(13)
  rev = losses.reverse_distillation_loss(s, t, temperature)
  np.testing.assert_array_equal(
      rev, losses.distillation_loss(t, s, temperature))
  # Regression (swapped arguments): it is not the forward KL.
  fwd = ref_forward(s, t, temperature)
  assert np.all(np.abs(np.asarray(rev) - fwd) > 1e-2 * fwd), (rev, fwd)
  # Nor the forward KL without T^2, nor the KL without T^2.
  kl = ref_reverse(s, t, temperature) / temperature**2
  if temperature > 1.0:
    assert np.all(np.abs(np.asarray(rev) - kl) > 0.5 * np.asarray(rev))


@pytest.mark.parametrize("beta", [0.1, 0.3, 0.5])
def test_jsd_swapping_arguments_is_one_minus_beta(beta):
  """JSD_beta(p, q) = JSD_{1-beta}(q, p); at beta = 1/2 it is symmetric."""
  s, t, temperature = _logits(14), _logits(15), 2.0
  a = losses.generalized_jsd_loss(s, t, temperature, beta=beta)
  b = losses.generalized_jsd_loss(t, s, temperature, beta=1.0 - beta)
  _close(a, np.asarray(b, np.float64), 2 * _atol(s, t, temperature, beta))
  if beta == 0.5:
    # Symmetric, and equal to 4 times the usual JSD.
    log_p, log_q, log_m = _ref_parts(s, t, temperature, 0.5)
    jsd = 0.5 * ref_kl(log_p, log_m) + 0.5 * ref_kl(log_q, log_m)
    _close(a, 4 * temperature**2 * jsd, _atol(s, t, temperature, 0.5))
  else:
    # Not symmetric (a beta swap would go unnoticed otherwise).
    c = np.asarray(losses.generalized_jsd_loss(t, s, temperature, beta=beta))
    assert np.all(np.abs(np.asarray(a) - c) > 1e-3 * np.asarray(a))


def test_jsd_mixture_is_in_probability_space():
  """Regression: a mixture of log-probabilities gives another number."""
  s, t, temperature, beta = _logits(16), _logits(17), 1.0, 0.5
  out = np.asarray(losses.generalized_jsd_loss(s, t, temperature, beta=beta))
  log_p = ref_log_softmax(t, temperature)
  log_q = ref_log_softmax(s, temperature)
  # The wrong mixture: log m = beta log p + (1 - beta) log q, renormalised.
  log_m = 0.5 * log_p + 0.5 * log_q
  log_m = log_m - np.log(np.sum(np.exp(log_m), axis=-1, keepdims=True))
  wrong = 4 * (0.5 * ref_kl(log_p, log_m) + 0.5 * ref_kl(log_q, log_m))
  right = ref_jsd(s, t, temperature, beta)
  _close(out, right, _atol(s, t, temperature, beta))
  assert np.all(np.abs(out - wrong) > 1e-2 * right), (out, wrong)


# -----------------------------------------------------------------------------
# Endpoints: forward and reverse KL, never a silent 0.
# -----------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("temperature", [1.0, 4.0, 20.0])
def test_jsd_endpoints_are_forward_and_reverse_kl(temperature):
  s, t = _logits(18), _logits(19)
  fwd = ref_forward(s, t, temperature)
  rev = ref_reverse(s, t, temperature)
  jitted = jax.jit(lambda b: losses.generalized_jsd_loss(s, t, temperature,
                                                         beta=b))
  for beta, ref in ((0.0, fwd), (1.0, rev)):
    atol = _atol(s, t, temperature, beta)
    for out in (losses.generalized_jsd_loss(s, t, temperature, beta=beta),
                jitted(jnp.float32(beta))):  # Python and traced beta.
      assert np.all(np.asarray(out) > 0.1 * ref)  # Regression: not 0.
      _close(out, ref, atol)
  # And the gradients: T (q - p) at 0, the reverse KL's at 1.
  grad = jax.jit(jax.grad(lambda z, b: losses.generalized_jsd_loss(
      z, t, temperature, beta=b).sum()))
  q, p = (np.exp(ref_log_softmax(x, temperature)) for x in (s, t))
  rev_z, _ = ref_reverse_grads(s, t, temperature)
  for beta, expected in ((0.0, temperature * (q - p)), (1.0, rev_z)):
    for g in (grad(s, jnp.float32(beta)),
              jax.grad(lambda z, b=beta: losses.generalized_jsd_loss(
                  z, t, temperature, beta=b).sum())(s)):
      assert np.all(np.isfinite(g))
      chex.assert_trees_all_close(
          g, expected, rtol=1e-4, atol=1e-5 * np.max(np.abs(expected)))


@pytest.mark.integration
def test_jsd_limits_converge_linearly_in_beta():
  """beta -> 0 gives the forward KL, beta -> 1 the reverse, errors O(beta).

  Each step of 10x in the distance to the endpoint shrinks the gap by ~10x
  (value and gradient): the limits are reached continuously, not by a
  special case at the endpoint only.
  """
  s, t, temperature = _logits(20), _logits(21), 2.0
  q, p = (np.exp(ref_log_softmax(x, temperature)) for x in (s, t))
  fwd_v, rev_v = ref_forward(s, t, temperature), ref_reverse(s, t, temperature)
  fwd_g, rev_g = temperature * (q - p), ref_reverse_grads(s, t, temperature)[0]
  value = jax.jit(lambda b: losses.generalized_jsd_loss(s, t, temperature,
                                                        beta=b))
  grad = jax.jit(jax.grad(lambda z, b: losses.generalized_jsd_loss(
      z, t, temperature, beta=b).sum()))
  for at_one in (False, True):
    target_v, target_g = (rev_v, rev_g) if at_one else (fwd_v, fwd_g)
    gaps_v, gaps_g = [], []
    for delta in (1e-3, 1e-4, 1e-5):
      beta = 1.0 - delta if at_one else delta
      gaps_v.append(np.max(np.abs(np.asarray(value(jnp.float32(beta))) -
                                  target_v) / target_v))
      gaps_g.append(np.max(np.abs(np.asarray(grad(s, jnp.float32(beta))) -
                                  target_g)) / np.max(np.abs(target_g)))
    for gaps in (gaps_v, gaps_g):
      assert 5.0 < gaps[0] / gaps[1] < 20.0, (at_one, gaps)
      assert 5.0 < gaps[1] / gaps[2] < 20.0, (at_one, gaps)
      assert gaps[2] < 100 * 1e-5, (at_one, gaps)  # O(beta), not O(1).
  # The unnormalised JSD_beta / beta has the forward KL's gradient at 0, too.
  b = 1e-4
  g_raw = jax.grad(lambda z: losses.generalized_jsd_loss(
      z, t, temperature, beta=b, normalize=False).sum())(s)
  chex.assert_trees_all_close(np.asarray(g_raw) / b, fwd_g, rtol=1e-2,
                              atol=2e-3 * np.max(np.abs(fwd_g)))


@pytest.mark.parametrize("beta", [0.0, 1.0, 0, 1, -0.1, 1.5])
def test_unnormalised_endpoints_raise(beta):
  s = t = jnp.zeros(SHAPE)
  with pytest.raises(ValueError, match="beta"):
    losses.generalized_jsd_loss(s, t, 2.0, beta=beta, normalize=False)
  if not 0.0 <= beta <= 1.0:
    with pytest.raises(ValueError, match="beta"):
      losses.generalized_jsd_loss(s, t, 2.0, beta=beta)
  else:  # Normalised, the endpoints are fine.
    assert np.all(np.isfinite(losses.generalized_jsd_loss(s, t, 2.0,
                                                          beta=beta)))


def test_bad_beta_types_and_other_bad_input():
  s = jnp.zeros(SHAPE)
  for beta in ("0.5", True, float("nan")):
    with pytest.raises((TypeError, ValueError), match="beta"):
      losses.generalized_jsd_loss(s, s, 2.0, beta=beta)
  for fn in (lambda T: losses.generalized_jsd_loss(s, s, T),
             lambda T: losses.reverse_distillation_loss(s, s, T)):
    with pytest.raises(ValueError, match="temperature"):
      fn(0.0)
  with pytest.raises(ValueError) as info:
    losses.generalized_jsd_loss(s, jnp.zeros((4, 9)), 2.0)
  assert "(4, 10)" in str(info.value) and "(4, 9)" in str(info.value)
  with pytest.raises(ValueError, match="where"):
    losses.generalized_jsd_loss(s, s, 2.0, where=np.ones((4, 9), bool))


def test_per_example_beta_broadcasts():
  s, t = _logits(22), _logits(23)
  betas = jnp.array([0.0, 0.2, 0.7, 1.0])
  out = losses.generalized_jsd_loss(s, t, 3.0, beta=betas)
  for i, b in enumerate(np.asarray(betas)):
    single = losses.generalized_jsd_loss(s[i], t[i], 3.0, beta=float(b))
    chex.assert_trees_all_close(out[i], single, rtol=1e-5, atol=1e-6)


# -----------------------------------------------------------------------------
# Invariances.
# -----------------------------------------------------------------------------


def _fns(temperature):
  return {
      "reverse": lambda s, t: losses.reverse_distillation_loss(s, t,
                                                               temperature),
      "jsd_0.3": lambda s, t: losses.generalized_jsd_loss(s, t, temperature,
                                                          beta=0.3),
      "jsd_0.5_raw": lambda s, t: losses.generalized_jsd_loss(
          s, t, temperature, beta=0.5, normalize=False),
  }


@pytest.mark.parametrize("temperature", [0.5, 4.0, 100.0])
def test_adding_a_per_row_constant_changes_nothing(temperature):
  s, t = _logits(24), _logits(25)
  c_s = jnp.array([[3.0], [-50.0], [0.25], [1000.0]])
  c_t = jnp.array([[-7.0], [20.0], [0.0], [-300.0]])
  for name, fn in _fns(temperature).items():
    # A shift of 1000 loses ~eps * 1000 of the logits' precision, i.e.
    # ~eps * 1000 / T of the log-ratios, times T^2 (T d) in the loss.
    atol = 4e3 * EPS32 * temperature * 10
    chex.assert_trees_all_close(fn(s + c_s, t + c_t), fn(s, t), rtol=1e-4,
                                atol=atol, custom_message=name)


@pytest.mark.integration
@pytest.mark.parametrize("temperature", [1.0, 20.0])
def test_duplicating_the_batch_duplicates_the_values(temperature):
  s, t = _logits(26), _logits(27)
  s2, t2 = jnp.concatenate([s, s]), jnp.concatenate([t, t])
  for name, fn in _fns(temperature).items():
    single, double = fn(s, t), fn(s2, t2)
    chex.assert_shape(double, (8,))
    np.testing.assert_array_equal(double, jnp.concatenate([single, single]),
                                  err_msg=name)


@pytest.mark.parametrize("temperature", [0.1, 1.0, 20.0, 1000.0])
def test_equal_inputs_give_zero(temperature):
  s = _logits(28)
  for name, fn in _fns(temperature).items():
    np.testing.assert_array_equal(fn(s, s), 0.0, err_msg=name)
  for beta in (0.0, 0.5, 1.0):
    np.testing.assert_array_equal(
        losses.generalized_jsd_loss(s, s, temperature, beta=beta), 0.0)
  # Shifted copies: zero up to rounding, never negative.
  for name, fn in _fns(temperature).items():
    out = np.asarray(fn(s, s + 3.0))
    assert np.all(out >= 0.0), name
    assert np.all(out <= 64 * EPS32 * temperature * 12.0), (name, out)


# -----------------------------------------------------------------------------
# Extreme inputs, masks and precision.
# -----------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("temperature", [0.5, 1.0, 10.0, 100.0])
@pytest.mark.parametrize("scale", [1e4, 1e-4])
def test_extreme_magnitudes(temperature, scale):
  s, t = _logits(29, scale=scale), _logits(30, scale=scale)
  for name, fn in _fns(temperature).items():
    value = fn(s, t)
    assert np.all(np.isfinite(value)) and np.all(np.asarray(value) >= 0), name
    g_s, g_t = jax.grad(lambda s, t, fn=fn: fn(s, t).sum(),
                        argnums=(0, 1))(s, t)
    assert np.all(np.isfinite(g_s)) and np.all(np.isfinite(g_t)), name
  # Spreads of 1e-4: the value is ~T^2 (1e-4 / T)^2 ~ 1e-8, and its error
  # ~eps T^2 |d| (d ~ 1e-4 / T), far below the plain formula's eps T^2 log C.
  out = losses.generalized_jsd_loss(s, t, temperature, beta=0.3)
  _close(out, ref_jsd(s, t, temperature, 0.3), _atol(s, t, temperature, 0.3))
  _close(losses.reverse_distillation_loss(s, t, temperature),
         ref_reverse(s, t, temperature), _atol(s, t, temperature))
  if scale < 1.0 and temperature <= 0.5:
    # A real test: the bound is a tenth of the value. (At high T the
    # relative error ~eps T / |z - v| of a value O(|z - v|^2) is documented
    # and bounds the test.)
    assert np.all(_atol(s, t, temperature, 0.3) <
                  0.1 * ref_jsd(s, t, temperature, 0.3))


_MASKED_TEACHER = jnp.array([[2.0, -jnp.inf, 0.5, 1.0, -jnp.inf],
                             [0.1, 0.2, -jnp.inf, 0.3, 3.0]])
_STUDENT = jnp.array([[1.0, 0.0, -1.0, 2.0, 0.5],
                      [0.5, -0.5, 1.0, 0.0, 2.0]])


@pytest.mark.integration
@pytest.mark.parametrize("temperature", [0.5, 1.0, 20.0, 1000.0])
def test_masked_teacher_where_the_student_has_mass(temperature):
  """-inf teacher logits: JSD finite and exact; reverse KL huge, finite."""
  s, t = _STUDENT, _MASKED_TEACHER
  for beta in (0.0, 0.3, 0.5, 0.9):
    fn = lambda s, t, b=beta: losses.generalized_jsd_loss(s, t, temperature,
                                                          beta=b)
    value = fn(s, t)
    g_s, g_t = jax.grad(lambda s, t, fn=fn: fn(s, t).sum(),
                        argnums=(0, 1))(s, t)
    assert np.all(np.isfinite(value)), beta
    assert np.all(np.isfinite(g_s)) and np.all(np.isfinite(g_t)), beta
    np.testing.assert_array_equal(np.asarray(g_t)[np.isinf(t)], 0.0)
    # Inside (0, 1) the JSD is bounded: it matches the reference.
    _close(value, ref_jsd(s, t, temperature, beta),
           _atol(s, t, temperature, beta))
  # The reverse KL (and JSD at beta = 1) is infinite: a huge finite value.
  for fn in (lambda s, t: losses.reverse_distillation_loss(s, t, temperature),
             lambda s, t: losses.generalized_jsd_loss(s, t, temperature,
                                                      beta=1.0)):
    value = np.asarray(fn(s, t))
    assert np.all(np.isfinite(value)) and np.all(value > 1e15), value
    g_s, g_t = jax.grad(lambda s, t, fn=fn: fn(s, t).sum(),
                        argnums=(0, 1))(s, t)
    assert np.all(np.isfinite(g_s)) and np.all(np.isfinite(g_t))


@pytest.mark.integration
@pytest.mark.parametrize("temperature", [0.1, 1.0, 20.0])
def test_masked_in_both_is_absent(temperature):
  s = _STUDENT.at[:, 1].set(-jnp.inf)
  t = _MASKED_TEACHER.at[:, 1].set(-jnp.inf).at[1, 2].set(-1.0)
  s = s.at[0, 4].set(-jnp.inf)  # Masked in both on row 0, class 4.
  keep = {0: np.array([0, 2, 3]), 1: np.array([0, 2, 3, 4])}
  for name, fn in list(_fns(temperature).items()) + [
      ("jsd_0", lambda s, t: losses.generalized_jsd_loss(s, t, temperature,
                                                         beta=0.0))]:
    value = fn(s, t)
    g_s, g_t = jax.grad(lambda s, t, fn=fn: fn(s, t).sum(),
                        argnums=(0, 1))(s, t)
    assert np.all(np.isfinite(value)), name
    assert np.all(np.isfinite(g_s)) and np.all(np.isfinite(g_t)), name
    both = np.isinf(s) & np.isinf(t)
    np.testing.assert_array_equal(np.asarray(g_s)[both], 0.0)
    np.testing.assert_array_equal(np.asarray(g_t)[both], 0.0)
    for row, cols in keep.items():
      sliced = fn(s[row:row + 1, cols], t[row:row + 1, cols])
      chex.assert_trees_all_close(value[row:row + 1], sliced, rtol=1e-6,
                                  atol=1e-7, custom_message=name)


@pytest.mark.integration
def test_where_mask_equals_dropping_the_classes():
  temperature = 2.0
  keep = np.array([0, 2, 3, 6, 7, 9])
  where = np.isin(np.arange(10), keep)
  s, t = _logits(31), _logits(32)
  s = s.at[:, 1].set(1e4).at[:, 4].set(-jnp.inf)  # Garbage where masked.
  t = t.at[:, 1].set(-1e4).at[:, 5].set(-jnp.inf)
  sk, tk = s[:, keep], t[:, keep]
  for name, fn in (
      ("reverse", lambda s, t, w: losses.reverse_distillation_loss(
          s, t, temperature, where=w)),
      ("jsd", lambda s, t, w: losses.generalized_jsd_loss(
          s, t, temperature, beta=0.4, where=w)),
  ):
    chex.assert_trees_all_close(fn(s, t, where), fn(sk, tk, None),
                                rtol=1e-6, atol=1e-6, custom_message=name)
    g_s, g_t = jax.grad(lambda s, t, fn=fn: fn(s, t, where).sum(),
                        argnums=(0, 1))(s, t)
    gk_s, gk_t = jax.grad(lambda s, t, fn=fn: fn(s, t, None).sum(),
                          argnums=(0, 1))(sk, tk)
    for g, gk in ((g_s, gk_s), (g_t, gk_t)):
      assert np.all(np.isfinite(g)), name
      np.testing.assert_array_equal(np.asarray(g)[:, ~where], 0.0)
      chex.assert_trees_all_close(g[:, keep], gk, rtol=1e-5, atol=1e-6)


@pytest.mark.integration
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_inputs_are_computed_in_float32(dtype):
  s, t, temperature = _logits(33, dtype=dtype), _logits(34, dtype=dtype), 4.0
  for value, ref, atol in (
      (losses.generalized_jsd_loss(s, t, temperature, beta=0.3),
       ref_jsd(s, t, temperature, 0.3), _atol(s, t, temperature, 0.3)),
      (losses.reverse_distillation_loss(s, t, temperature),
       ref_reverse(s, t, temperature), _atol(s, t, temperature)),
  ):
    assert value.dtype == jnp.float32
    # The reference uses the same (rounded) inputs: float32 accuracy, not
    # bf16's 2^-8 (a bf16 softmax fails this).
    _close(value, ref, atol)
  g = jax.grad(lambda z: losses.generalized_jsd_loss(
      z, t, temperature, beta=0.3).sum())(s)
  assert g.dtype == dtype
  e, _ = ref_jsd_grads(s, t, temperature, 0.3)
  chex.assert_trees_all_close(_f64(g), e, rtol=2.0**-7,
                              atol=2.0**-7 * np.abs(e).max())


# -----------------------------------------------------------------------------
# jit / vmap / grad.
# -----------------------------------------------------------------------------


@pytest.mark.integration
def test_jit_vmap_and_grad_agree_with_eager():
  s, t, temperature = _logits(35), _logits(36), 4.0
  fns = _fns(temperature)
  del fns["jsd_0.5_raw"]  # The same code path as jsd_0.3 (saves compiles).
  for name, fn in fns.items():
    eager = fn(s, t)
    chex.assert_trees_all_close(jax.jit(fn)(s, t), eager, rtol=1e-6,
                                atol=1e-7, custom_message=name)
    chex.assert_trees_all_close(jax.vmap(fn)(s, t), eager, rtol=1e-6,
                                atol=1e-7, custom_message=name)
    total = lambda s, t, fn=fn: fn(s, t).sum()
    g_eager = jax.grad(total, argnums=(0, 1))(s, t)
    g_jit = jax.jit(jax.grad(total, argnums=(0, 1)))(s, t)
    chex.assert_trees_all_close(g_jit, g_eager, rtol=1e-5, atol=1e-7)


def test_vmap_over_traced_beta_and_temperature():
  s, t = _logits(37), _logits(38)
  betas = (0.0, 0.25, 0.5, 1.0)
  temps = (0.5, 20.0)
  swept = jax.jit(jax.vmap(jax.vmap(
      lambda b, T: losses.generalized_jsd_loss(s, t, T, beta=b),
      in_axes=(None, 0)), in_axes=(0, None)))(jnp.array(betas),
                                              jnp.array(temps))
  for i, beta in enumerate(betas):
    for j, temperature in enumerate(temps):
      _close(swept[i, j], ref_jsd(s, t, temperature, beta),
             _atol(s, t, temperature, beta))


# -----------------------------------------------------------------------------
# Properties (hypothesis): one shape, traced T and beta, so one compile.
# -----------------------------------------------------------------------------


@jax.jit
def _values_and_grads(s, t, mask, temperature, beta):
  def total(s, t):
    return losses.generalized_jsd_loss(s, t, temperature, beta=beta,
                                       where=mask).sum()
  g_s, g_t = jax.grad(total, argnums=(0, 1))(s, t)
  return {
      "jsd": losses.generalized_jsd_loss(s, t, temperature, beta=beta,
                                         where=mask),
      "reverse": losses.reverse_distillation_loss(s, t, temperature,
                                                  where=mask),
      "grad_s": g_s,
      "grad_t": g_t,
  }


@hypothesis.settings(max_examples=30, deadline=None)
@hypothesis.given(
    temperature=st.floats(-0.3, 2.0).map(lambda x: 10.0**x),
    scale=st.floats(-2.0, 2.0).map(lambda x: 10.0**x),
    beta=st.sampled_from([0.0, 1e-3, 0.2, 0.5, 0.8, 1.0]),
    closeness=st.sampled_from([1.0, 1e-2]),
    use_mask=st.booleans(),
    seed=st.integers(0, 2**32 - 1))
@pytest.mark.integration
def test_property_finite_nonnegative_and_matches_reference(
    temperature, scale, beta, closeness, use_mask, seed):
  rng = np.random.default_rng(seed)
  s = (scale * rng.standard_normal(SHAPE)).astype(np.float32)
  t = (s + closeness * scale * rng.standard_normal(SHAPE)).astype(np.float32)
  mask = np.ones(SHAPE, bool)
  if use_mask:
    mask = rng.random(SHAPE) < 0.7
    mask[:, 0] = True
  out = _values_and_grads(s, t, mask, np.float32(temperature),
                          np.float32(beta))
  for name, value in out.items():
    assert np.all(np.isfinite(value)), name
  assert np.all(np.asarray(out["jsd"]) >= 0.0)
  assert np.all(np.asarray(out["reverse"]) >= 0.0)
  _close(out["jsd"], ref_jsd(s, t, temperature, beta, where=mask),
         _atol(s, t, temperature, beta, where=mask))
  np.testing.assert_array_equal(np.asarray(out["grad_s"])[~mask], 0.0)
  np.testing.assert_array_equal(np.asarray(out["grad_t"])[~mask], 0.0)
