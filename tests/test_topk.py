"""Tests for kdjax.losses.topk against a float64 NumPy reference.

The top-k loss must equal kdjax.losses.distillation_loss at k = V (to
float32 rounding), and its error for small k must obey the documented exact
identities in terms of the teacher's dropped mass eps; tolerances come from
the float32 error of the quantities compared, never hard-coded results.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import losses
from kdjax.losses import topk

EPS32 = float(np.finfo(np.float32).eps)
SHAPE = (2, 3, 50)  # [batch, length, vocabulary]
V = SHAPE[-1]


def _f64(x):
  return np.asarray(jnp.asarray(x).astype(jnp.float32), dtype=np.float64)


def ref_log_softmax(logits, temperature):
  x = _f64(logits) / temperature
  shifted = x - np.max(x, axis=-1, keepdims=True)
  return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def _plogr(p, log_p, log_r):
  with np.errstate(invalid="ignore"):
    return np.where(p > 0, p * (log_p - log_r), 0.0)


def ref_full(s, t, temperature):
  log_p = ref_log_softmax(t, temperature)
  log_q = ref_log_softmax(s, temperature)
  return temperature**2 * np.sum(_plogr(np.exp(log_p), log_p, log_q), -1)


def _in_k(indices):
  idx = np.asarray(indices)
  member = np.zeros(idx.shape[:-1] + (V,), bool)
  np.put_along_axis(member, idx, True, axis=-1)
  return member


def ref_parts(s, t, indices, temperature):
  """Full p and q, and the dropped masses eps (teacher) and Q (student)."""
  log_p = ref_log_softmax(t, temperature)
  log_q = ref_log_softmax(s, temperature)
  p, q = np.exp(log_p), np.exp(log_q)
  tail = ~_in_k(indices)
  return log_p, log_q, p, q, tail, np.sum(p * tail, -1), np.sum(q * tail, -1)


def ref_renormalize(s, t, indices, temperature):
  log_p, log_q, p, _, tail, eps, _ = ref_parts(s, t, indices, temperature)
  log_pk = np.where(tail, -np.inf, log_p - np.log1p(-eps)[..., None])
  return temperature**2 * np.sum(_plogr(np.exp(log_pk), log_pk, log_q), -1)


def ref_bucket(s, t, indices, temperature):
  log_p, log_q, p, _, tail, eps, big_q = ref_parts(s, t, indices, temperature)
  head = np.sum(np.where(tail, 0.0, _plogr(p, log_p, log_q)), -1)
  with np.errstate(divide="ignore", invalid="ignore"):
    bucket = np.where(eps > 0, eps * (np.log(eps) - np.log(big_q)), 0.0)
  return temperature**2 * (head + bucket)


def _atol(temperature, max_abs=12.0, num=V + 1):
  """float32 error of distillation_loss on [..., num] (its docstring)."""
  err = 8.0 * temperature * max_abs
  if temperature < 8.0:
    err += 4.0 * temperature**2 * (1.0 + math.log(num))
  return 2.0 * EPS32 * err


def _logits(seed, shape=SHAPE, scale=3.0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  return jnp.asarray(scale * rng.standard_normal(shape), dtype)


_LOSS = jax.jit(topk.topk_distillation_loss, static_argnames=("tail",))
_GRAD = jax.jit(jax.grad(
    lambda z, v, i, T, tl, tail: topk.topk_distillation_loss(
        z, v, i, T, tail=tail, tail_logit=tl).sum()), static_argnums=5)


def _both(s, t, k, temperature):
  """{tail: (loss, grad)} for both modes (bucket's tail logit at T)."""
  values, indices = topk.topk_targets(t, k)
  tl = topk.tail_logit(t, indices, temperature)
  out = {}
  for tail, tail_logit in (("renormalize", None), ("bucket", tl)):
    out[tail] = (_LOSS(s, values, indices, temperature, tail=tail,
                       tail_logit=tail_logit),
                 _GRAD(s, values, indices, temperature, tail_logit, tail))
  return out, indices


# -----------------------------------------------------------------------------
# k = V is the full loss; small k against the reference.
# -----------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0, 20.0])
def test_k_equals_v_is_the_full_distillation_loss(temperature):
  s, t = _logits(0), _logits(1)
  full = losses.distillation_loss(s, t, temperature)
  full_g = jax.grad(lambda z: losses.distillation_loss(
      z, t, temperature).sum())(s)
  out, _ = _both(s, t, V, temperature)
  for tail, (loss, grad) in out.items():
    chex.assert_shape(loss, SHAPE[:-1])
    assert loss.dtype == jnp.float32
    # Only the summation order differs: float32 rounding of the KL.
    chex.assert_trees_all_close(loss, full, rtol=1e-5,
                                atol=_atol(temperature), custom_message=tail)
    chex.assert_trees_all_close(grad, full_g, rtol=1e-5,
                                atol=16 * EPS32 * temperature,
                                custom_message=tail)
  # The bucket is exact at k = V - 1 too (its bucket is one class).
  out, _ = _both(s, t, V - 1, temperature)
  chex.assert_trees_all_close(out["bucket"][0], full, rtol=1e-5,
                              atol=_atol(temperature))


@pytest.mark.integration
@pytest.mark.parametrize("temperature", [1.0, 4.0, 20.0])
@pytest.mark.parametrize("k", [1, 5, 20])
def test_small_k_matches_float64_reference(k, temperature):
  s, t = _logits(2), _logits(3)
  out, indices = _both(s, t, k, temperature)
  refs = {"renormalize": ref_renormalize(s, t, indices, temperature),
          "bucket": ref_bucket(s, t, indices, temperature)}
  _, _, p, q, tail, eps, big_q = ref_parts(s, t, indices, temperature)
  expected_g = {
      "renormalize": temperature * (q - np.where(
          tail, 0.0, p / (1.0 - eps)[..., None])),
      "bucket": temperature * (q - np.where(
          tail, (eps / big_q)[..., None] * q, p)),
  }
  for tail_mode, (loss, grad) in out.items():
    chex.assert_trees_all_close(loss, refs[tail_mode], rtol=1e-5,
                                atol=_atol(temperature),
                                custom_message=tail_mode)
    chex.assert_trees_all_close(grad, expected_g[tail_mode], rtol=1e-4,
                                atol=16 * EPS32 * temperature,
                                custom_message=tail_mode)


# -----------------------------------------------------------------------------
# The documented error of small k.
# -----------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("k", [1, 3, 10, 30])
def test_renormalize_error_identity_and_bound(k, temperature):
  s, t = _logits(4), _logits(5)
  out, indices = _both(s, t, k, temperature)
  loss, grad = (np.asarray(x, np.float64) for x in out["renormalize"])
  full = ref_full(s, t, temperature)
  log_p, log_q, p, q, tail, eps, _ = ref_parts(s, t, indices, temperature)
  assert np.all(eps > 1e-6)  # Something really is dropped.
  h2 = -eps * np.log(eps) - (1 - eps) * np.log1p(-eps)
  p_tail = np.where(tail, p / eps[..., None], 0.0)
  with np.errstate(divide="ignore", invalid="ignore"):
    c_tail = np.sum(np.where(tail, p_tail * (np.log(p_tail) - log_q), 0.0),
                    -1)
  assert np.all(c_tail >= 0)
  t2 = temperature**2
  # The exact identity, to the float32 error of `loss` (times 1 + eps).
  chex.assert_trees_all_close(
      loss - full, eps * loss + t2 * h2 - t2 * eps * c_tail,
      rtol=1e-5, atol=2 * _atol(temperature))
  # The bound.
  assert np.all(loss - full <= eps * loss + t2 * h2 + _atol(temperature))
  # ||grad - full grad||_1 = 2 T eps, exactly.
  full_g = temperature * (q - p)
  chex.assert_trees_all_close(np.abs(grad - full_g).sum(-1),
                              2 * temperature * eps, rtol=1e-4,
                              atol=V * 16 * EPS32 * temperature)


@pytest.mark.integration
@pytest.mark.parametrize("temperature", [1.0, 4.0])
@pytest.mark.parametrize("k", [1, 3, 10, 30])
def test_bucket_is_below_the_full_loss_by_the_tail_kl(k, temperature):
  s, t = _logits(6), _logits(7)
  out, indices = _both(s, t, k, temperature)
  loss, grad = (np.asarray(x, np.float64) for x in out["bucket"])
  full = ref_full(s, t, temperature)
  log_p, log_q, p, q, tail, eps, big_q = ref_parts(s, t, indices, temperature)
  log_pt = np.where(tail, log_p - np.log(eps)[..., None], -np.inf)
  log_qt = np.where(tail, log_q - np.log(big_q)[..., None], -np.inf)
  tail_kl = np.sum(_plogr(np.exp(log_pt), log_pt, log_qt), -1)
  chex.assert_trees_all_close(full - loss, temperature**2 * eps * tail_kl,
                              rtol=1e-5, atol=2 * _atol(temperature))
  assert np.all(loss <= full + _atol(temperature))
  assert np.all(np.abs(grad - temperature * (q - p)).sum(-1) <=
                2 * temperature * eps * (1 + 1e-4) + 1e-6)


def test_renormalize_keeps_the_temperature_free_and_bucket_does_not():
  s, t = _logits(8), _logits(9)
  values, indices = topk.topk_targets(t, 5)  # Cached once, at no T.
  for temperature in (0.5, 2.0, 10.0):
    chex.assert_trees_all_close(
        _LOSS(s, values, indices, temperature, tail="renormalize"),
        ref_renormalize(s, t, indices, temperature), rtol=1e-5,
        atol=_atol(temperature))
  # A bucket tail logit cached at T_c = 1 is wrong at T = 4 (documented):
  # use one cached at the training temperature.
  stale = topk.tail_logit(t, indices, 1.0)
  wrong = _LOSS(s, values, indices, 4.0, tail="bucket", tail_logit=stale)
  right = ref_bucket(s, t, indices, 4.0)
  assert np.all(np.abs(np.asarray(wrong) - right) > 1e-3 * right)


# -----------------------------------------------------------------------------
# Masks, -inf, dtypes, jit and grad.
# -----------------------------------------------------------------------------


@pytest.mark.integration
def test_where_masks_padded_positions():
  s, t, temperature = _logits(10), _logits(11), 2.0
  values, indices = topk.topk_targets(t, 8)
  tl = topk.tail_logit(t, indices, temperature)
  pad = np.array([[True, True, False], [True, False, False]])
  # Garbage in the padded positions: NaN logits, out-of-range indices.
  s_bad = jnp.where(pad[..., None], s, jnp.nan)
  i_bad = jnp.where(pad[..., None], indices, V + 7)
  v_bad = jnp.where(pad[..., None], values, jnp.inf)
  tl_bad = jnp.where(pad, tl, jnp.nan)
  for tail, tail_logit in (("renormalize", None), ("bucket", tl_bad)):
    fn = lambda z, tail=tail, tail_logit=tail_logit: (
        topk.topk_distillation_loss(z, v_bad, i_bad, temperature, tail=tail,
                                    tail_logit=tail_logit, where=pad))
    loss = fn(s_bad)
    grad = jax.grad(lambda z, fn=fn: fn(z).sum())(s_bad)
    np.testing.assert_array_equal(np.asarray(loss)[~pad], 0.0)
    np.testing.assert_array_equal(np.asarray(grad)[~pad], 0.0)
    assert np.all(np.isfinite(grad))
    clean = topk.topk_distillation_loss(
        s, values, indices, temperature, tail=tail,
        tail_logit=None if tail_logit is None else tl)
    np.testing.assert_array_equal(np.asarray(loss)[pad],
                                  np.asarray(clean)[pad])
  # A [B, L] mask broadcasts from [L] too.
  row = np.array([True, False, True])
  out = topk.topk_distillation_loss(s, values, indices, temperature,
                                    where=row)
  np.testing.assert_array_equal(np.asarray(out)[:, 1], 0.0)


@pytest.mark.integration
def test_minus_inf_logits_give_finite_values_and_gradients():
  s, t, temperature = _logits(12), _logits(13), 1.0
  t = t.at[..., 10:].set(-jnp.inf)  # Only 10 finite teacher classes ...
  s = s.at[..., 40:].set(-jnp.inf)  # ... and a student vocabulary padding.
  for k in (5, 10, 20):  # 20 > 10: the top k hold -inf values.
    values, indices = topk.topk_targets(t, k)
    tl = topk.tail_logit(t, indices, temperature)
    for tail, tail_logit in (("renormalize", None), ("bucket", tl)):
      def total(z, tail=tail, tail_logit=tail_logit, values=values,
                indices=indices):
        return topk.topk_distillation_loss(
            z, values, indices, temperature, tail=tail,
            tail_logit=tail_logit).sum()

      loss, grad = jax.value_and_grad(total)(s)
      assert np.isfinite(loss) and np.all(np.isfinite(grad)), (k, tail)
      np.testing.assert_array_equal(np.asarray(grad)[..., 40:], 0.0)
  # With k >= 10 the cache holds the teacher's whole support: full loss.
  values, indices = topk.topk_targets(t, 20)
  chex.assert_trees_all_close(
      topk.topk_distillation_loss(s, values, indices, temperature),
      losses.distillation_loss(s, t, temperature), rtol=1e-5,
      atol=_atol(temperature))


def test_bf16_student_logits_are_computed_in_float32():
  s = _logits(14, dtype=jnp.bfloat16)
  t = _logits(15)
  values, indices = topk.topk_targets(t, 7)
  loss = topk.topk_distillation_loss(s, values, indices, 2.0)
  assert loss.dtype == jnp.float32
  chex.assert_trees_all_close(loss, ref_renormalize(s, t, indices, 2.0),
                              rtol=1e-5, atol=_atol(2.0))


@pytest.mark.integration
def test_jit_and_vmap_agree_with_eager():
  s, t = _logits(16), _logits(17)
  values, indices = topk.topk_targets(t, 6)
  eager = topk.topk_distillation_loss(s, values, indices, 3.0)
  chex.assert_trees_all_close(_LOSS(s, values, indices, 3.0), eager,
                              rtol=1e-6, atol=1e-7)
  vmapped = jax.vmap(lambda a, b, c: topk.topk_distillation_loss(
      a, b, c, 3.0))(s, values, indices)
  chex.assert_trees_all_close(vmapped, eager, rtol=1e-6, atol=1e-7)


@pytest.mark.integration
def test_topk_targets_and_chunked_cache():
  t = _logits(18, (7, 3, V), dtype=jnp.bfloat16)
  values, indices = topk.topk_targets(t, 4)
  assert values.dtype == jnp.float32 and indices.dtype == jnp.int32
  ref = np.sort(_f64(t), axis=-1)[..., ::-1][..., :4]
  np.testing.assert_array_equal(values, ref)
  np.testing.assert_array_equal(
      np.take_along_axis(_f64(t), np.asarray(indices), -1), ref)
  # Chunked over the first axis (7 rows, chunks of 3: a padded last chunk),
  # from a host array: the same numbers.
  cache = topk.topk_cache(np.asarray(t.astype(jnp.float32)), 4, chunk_size=3,
                          bucket_temperature=2.0)
  np.testing.assert_array_equal(cache["values"], values)
  np.testing.assert_array_equal(cache["indices"], indices)
  tl = topk.tail_logit(t, indices, 2.0)
  np.testing.assert_allclose(cache["tail_logit"], tl, rtol=1e-6)
  # The tail logit's definition, in float64.
  x = np.where(_in_k(np.asarray(indices)[None])[0], -np.inf,
               _f64(t) / 2.0)
  m = np.max(x, -1)
  expected = 2.0 * (m + np.log(np.sum(np.exp(x - m[..., None]), -1)))
  np.testing.assert_allclose(tl, expected, rtol=1e-6, atol=1e-6)
  # cache_bytes is the arrays' size.
  positions = 7 * 3
  assert topk.cache_bytes(positions, 4) == (cache["values"].nbytes +
                                            cache["indices"].nbytes)
  assert topk.cache_bytes(positions, 4, bucket=True) == sum(
      a.nbytes for a in cache.values())
  assert "tail_logit" not in topk.topk_cache(np.asarray(t, np.float32), 4)


def test_bad_input():
  s = jnp.zeros((4, 10))
  values, indices = topk.topk_targets(s, 3)
  with pytest.raises(ValueError, match="tail"):
    topk.topk_distillation_loss(s, values, indices, 1.0, tail="drop")
  with pytest.raises(ValueError, match="tail_logit"):
    topk.topk_distillation_loss(s, values, indices, 1.0, tail="bucket")
  with pytest.raises(ValueError, match="tail_logit"):
    topk.topk_distillation_loss(s, values, indices, 1.0,
                                tail_logit=jnp.zeros(4))
  with pytest.raises(ValueError) as info:
    topk.topk_distillation_loss(s[:3], values, indices, 1.0)
  assert "(4, 3)" in str(info.value) and "(3,)" in str(info.value)
  with pytest.raises(TypeError, match="integers"):
    topk.topk_distillation_loss(s, values, values, 1.0)
  with pytest.raises(ValueError, match="temperature"):
    topk.topk_distillation_loss(s, values, indices, 0.0)
  with pytest.raises(ValueError, match="where"):
    topk.topk_distillation_loss(s, values, indices, 1.0,
                                where=np.ones((4, 10), bool))
  for k in (0, 11):
    with pytest.raises(ValueError, match="k"):
      topk.topk_targets(s, k)
  with pytest.raises(TypeError, match="k"):
    topk.topk_targets(s, 2.0)
