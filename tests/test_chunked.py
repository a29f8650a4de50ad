"""Tests for kdjax.losses.chunked: chunked = unchunked to float32 rounding.

The unchunked path (``chunk_size=None``) is itself checked against a float64
NumPy reference of the objective and its gradient; the chunked paths
(custom VJP for ``"mean"``/``"sum"``, rematerialised scan for ``"none"``)
are then compared with it, values and gradients w.r.t. ``h_s``, ``W_s`` and
``b_s``, with N not a multiple of the chunk size.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.losses import chunked
from kdjax.losses import topk

EPS32 = float(np.finfo(np.float32).eps)
N, D, D_T, V = 50, 16, 24, 300


def _problem(seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  arr = lambda *shape, s=1.0: jnp.asarray(s * rng.standard_normal(shape),
                                          dtype)
  return {
      "h_s": arr(N, D), "w_s": arr(D, V, s=0.5), "b_s": arr(V, s=0.5),
      "h_t": arr(N, D_T), "w_t": arr(D_T, V, s=0.5), "b_t": arr(V, s=0.5),
      "labels": jnp.asarray(rng.integers(0, V, N), jnp.int32),
      # Padding-like zeros, and fractional weights.
      "weights": jnp.asarray(np.where(rng.random(N) < 0.2, 0.0,
                                      rng.random(N) + 0.5), jnp.float32),
  }


def _loss(p, chunk_size, *, reduction="mean", alpha=0.0, labels=True,
          bias=True, temperature=4.0, source="teacher", tail="renormalize",
          k=20):
  kwargs = {}
  if source == "teacher":
    kwargs["teacher"] = (p["h_t"], p["w_t"], p["b_t"])
  else:
    v = (p["h_t"].astype(jnp.float32) @ p["w_t"].astype(jnp.float32) +
         p["b_t"])
    values, indices = topk.topk_targets(v, k)
    kwargs["topk"] = (values, indices) if tail == "renormalize" else (
        values, indices, topk.tail_logit(v, indices, temperature))
    kwargs["tail"] = tail

  def fn(h_s, w_s, b_s):
    return chunked.chunked_distillation_loss(
        h_s, w_s, b_s if bias else None, temperature=temperature,
        labels=p["labels"] if labels else None, alpha=alpha,
        weights=p["weights"], reduction=reduction, chunk_size=chunk_size,
        **kwargs)
  return fn


def _value_and_grads(fn, p, reduction="mean"):
  def scalar(*args):
    out = fn(*args)
    # A non-uniform function of the per-position values, so that "none"
    # is checked with per-position cotangents.
    return jnp.sum(out * jnp.linspace(0.5, 1.5, N)) if out.ndim else out
  return jax.jit(jax.value_and_grad(scalar, argnums=(0, 1, 2)))(
      p["h_s"], p["w_s"], p["b_s"])


def _assert_close(a, b, name=""):
  """Equal to float32 rounding of sums over N positions (and D, V)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = np.max(np.abs(b)) if b.size else 0.0
  np.testing.assert_allclose(a, b, rtol=1e-5,
                             atol=64 * EPS32 * max(scale, 1e-30),
                             err_msg=name)


# -----------------------------------------------------------------------------
# The unchunked reference against float64.
# -----------------------------------------------------------------------------


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_unchunked_matches_float64_reference(alpha):
  p = _problem(1)
  f = lambda k: np.asarray(p[k], np.float64)
  temperature = 4.0
  z = f("h_s") @ f("w_s") + f("b_s")
  v = f("h_t") @ f("w_t") + f("b_t")
  y, w = np.asarray(p["labels"]), f("weights")
  log_q, log_p = _np_log_softmax(z / temperature), _np_log_softmax(
      v / temperature)
  q, pt = np.exp(log_q), np.exp(log_p)
  log_q1 = _np_log_softmax(z)
  ell = (alpha * -log_q1[np.arange(N), y] + (1 - alpha) * temperature**2 *
         np.sum(pt * (log_p - log_q), -1))
  ref = np.sum(w * ell) / np.sum(w)
  onehot = np.eye(V)[y]
  d_z = (w / w.sum())[:, None] * (
      alpha * (np.exp(log_q1) - onehot) + (1 - alpha) * temperature *
      (q - pt))
  value, (g_h, g_w, g_b) = _value_and_grads(
      _loss(p, None, alpha=alpha), p)
  np.testing.assert_allclose(value, ref, rtol=1e-5)
  _assert_close(g_w, f("h_s").T @ d_z, "dW")
  _assert_close(g_h, d_z @ f("w_s").T, "dh")
  _assert_close(g_b, d_z.sum(0), "db")


# -----------------------------------------------------------------------------
# Chunked = unchunked.
# -----------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("chunk_size", [16, 7, 50, 64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_chunked_equals_unchunked_teacher(chunk_size, reduction):
  p = _problem(2)
  for alpha, labels, bias in ((0.0, False, True), (0.3, True, False)):
    ref = _value_and_grads(_loss(p, None, reduction=reduction, alpha=alpha,
                                 labels=labels, bias=bias), p)
    out = _value_and_grads(_loss(p, chunk_size, reduction=reduction,
                                 alpha=alpha, labels=labels, bias=bias), p)
    for name, a, b in zip(("value", "dh", "dW", "db"), (out[0],) + out[1],
                          (ref[0],) + ref[1]):
      if name == "db" and not bias:
        continue
      _assert_close(a, b, f"{name} alpha={alpha}")
  # The per-position values themselves (reduction "none").
  if reduction == "none":
    _assert_close(_loss(p, chunk_size, reduction="none")(
        p["h_s"], p["w_s"], p["b_s"]), _loss(p, None, reduction="none")(
            p["h_s"], p["w_s"], p["b_s"]))


@pytest.mark.integration
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunked_equals_unchunked_topk(tail, reduction):
  p = _problem(3)
  ref = _value_and_grads(_loss(p, None, reduction=reduction, source="topk",
                               tail=tail, alpha=0.2), p)
  out = _value_and_grads(_loss(p, 16, reduction=reduction, source="topk",
                               tail=tail, alpha=0.2), p)
  for name, a, b in zip(("value", "dh", "dW", "db"), (out[0],) + out[1],
                        (ref[0],) + ref[1]):
    _assert_close(a, b, name)
  # And the top-k loss at k = V is the teacher-logit loss.
  full = _loss(p, 16, source="teacher")(p["h_s"], p["w_s"], p["b_s"])
  top_v = _loss(p, 16, source="topk", k=V)(p["h_s"], p["w_s"], p["b_s"])
  np.testing.assert_allclose(top_v, full, rtol=1e-5)


# -----------------------------------------------------------------------------
# Weights, teacher, dtypes, traced hyperparameters.
# -----------------------------------------------------------------------------


@pytest.mark.integration
def test_weights_mask_and_normalise():
  p = _problem(4)
  keep = np.asarray(p["weights"]) > 0
  value, (g_h, _, _) = _value_and_grads(_loss(p, 16), p)
  # Zero-weight positions get exactly zero gradient.
  np.testing.assert_array_equal(np.asarray(g_h)[~keep], 0.0)
  # "mean" is sum(w l) / sum(w), and "sum" is sum(w l).
  per = np.asarray(_loss(p, 16, reduction="none")(p["h_s"], p["w_s"],
                                                  p["b_s"]), np.float64)
  np.testing.assert_array_equal(per[~keep], 0.0)
  w = np.asarray(p["weights"], np.float64)
  np.testing.assert_allclose(value, per.sum() / w.sum(), rtol=1e-5)
  np.testing.assert_allclose(
      _loss(p, 16, reduction="sum")(p["h_s"], p["w_s"], p["b_s"]),
      per.sum(), rtol=1e-5)
  # Dropping the zero-weight rows changes nothing (weight 0 = padding).
  sub = {name: (a[keep] if name in ("h_s", "h_t", "labels", "weights")
                else a) for name, a in p.items()}
  dropped = chunked.chunked_distillation_loss(
      sub["h_s"], sub["w_s"], sub["b_s"], temperature=4.0,
      teacher=(sub["h_t"], sub["w_t"], sub["b_t"]), weights=sub["weights"],
      chunk_size=16)
  np.testing.assert_allclose(dropped, value, rtol=1e-5)
  # All weights 0: the mean is 0 with zero (finite) gradients.
  zero = dict(p, weights=jnp.zeros(N))
  value0, grads0 = _value_and_grads(_loss(zero, 16), zero)
  assert float(value0) == 0.0
  for g in grads0:
    np.testing.assert_array_equal(g, 0.0)


def test_no_gradient_reaches_the_teacher():
  p = _problem(5)
  def fn(h_t, w_t, chunk_size):
    return chunked.chunked_distillation_loss(
        p["h_s"], p["w_s"], temperature=2.0, teacher=(h_t, w_t),
        chunk_size=chunk_size)
  for chunk_size in (None, 16):
    g_h, g_w = jax.grad(fn, argnums=(0, 1))(p["h_t"], p["w_t"], chunk_size)
    np.testing.assert_array_equal(g_h, 0.0)
    np.testing.assert_array_equal(g_w, 0.0)


@pytest.mark.integration
def test_bf16_inputs_compute_in_float32():
  p = _problem(6, jnp.bfloat16)
  value, grads = _value_and_grads(_loss(p, 16), p)
  ref_value, ref_grads = _value_and_grads(_loss(p, None), p)
  assert value.dtype == jnp.float32
  assert all(g.dtype == jnp.bfloat16 for g in grads)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for g, r in zip(grads, ref_grads):  # Rounded once to bf16 at the end.
    chex.assert_trees_all_close(g.astype(jnp.float32),
                                r.astype(jnp.float32), rtol=2.0**-7,
                                atol=2.0**-7 * float(jnp.max(jnp.abs(
                                    r.astype(jnp.float32)))))


def test_traced_temperature_and_alpha_compile_once():
  p = _problem(7)
  traces = []

  @jax.jit
  def fn(h_s, temperature, alpha):
    traces.append(1)
    return chunked.chunked_distillation_loss(
        h_s, p["w_s"], p["b_s"], temperature=temperature,
        teacher=(p["h_t"], p["w_t"]), labels=p["labels"], alpha=alpha,
        chunk_size=16)
  for temperature, alpha in ((1.0, 0.0), (4.0, 0.5), (20.0, 0.1)):
    out = fn(p["h_s"], jnp.float32(temperature), jnp.float32(alpha))
    ref = chunked.chunked_distillation_loss(
        p["h_s"], p["w_s"], p["b_s"], temperature=temperature,
        teacher=(p["h_t"], p["w_t"]), labels=p["labels"], alpha=alpha,
        chunk_size=None)
    np.testing.assert_allclose(out, ref, rtol=1e-5)
  assert len(traces) == 1


def test_chunked_temporaries_are_a_fraction_of_unchunked():
  """XLA's own memory analysis: [chunk, V] temporaries instead of [N, V]."""
  n, d, v, chunk = 1024, 32, 8192, 64
  args = (jax.ShapeDtypeStruct((n, d), jnp.float32),
          jax.ShapeDtypeStruct((d, v), jnp.float32),
          jax.ShapeDtypeStruct((n, d), jnp.float32),
          jax.ShapeDtypeStruct((d, v), jnp.float32))

  def temp_bytes(chunk_size):
    def f(h, w, ht, wt):
      return chunked.chunked_distillation_loss(
          h, w, temperature=2.0, teacher=(ht, wt), chunk_size=chunk_size)
    m = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(
        *args).compile().memory_analysis()
    if m is None:
      pytest.skip("no memory analysis on this backend")
    return m.temp_size_in_bytes
  full, small = temp_bytes(None), temp_bytes(chunk)
  one_logits = n * v * 4
  assert full >= one_logits, (full, one_logits)  # [N, V] really exists,
  assert small < full / 8, (small, full)  # and not when chunked.


def test_bad_input():
  p = _problem(8)
  h, w = p["h_s"], p["w_s"]
  with pytest.raises(ValueError, match="exactly one"):
    chunked.chunked_distillation_loss(h, w, temperature=1.0)
  with pytest.raises(ValueError, match="labels"):
    chunked.chunked_distillation_loss(h, w, temperature=1.0,
                                      teacher=(p["h_t"], p["w_t"]), alpha=0.5)
  with pytest.raises(ValueError, match="reduction"):
    chunked.chunked_distillation_loss(h, w, temperature=1.0,
                                      teacher=(p["h_t"], p["w_t"]),
                                      reduction="batchmean")
  with pytest.raises(ValueError, match=r"\(50, 16\)"):
    chunked.chunked_distillation_loss(h, w.T, temperature=1.0,
                                      teacher=(p["h_t"], p["w_t"]))
  with pytest.raises(ValueError, match="tail_logit"):
    chunked.chunked_distillation_loss(
        h, w, temperature=1.0, topk=(jnp.zeros((N, 3)),
                                     jnp.zeros((N, 3), jnp.int32)),
        tail="bucket")
  with pytest.raises(ValueError, match="temperature"):
    chunked.chunked_distillation_loss(h, w, temperature=0.0,
                                      teacher=(p["h_t"], p["w_t"]))
  with pytest.raises(ValueError, match="chunk_size"):
    chunked.chunked_distillation_loss(h, w, temperature=1.0,
                                      teacher=(p["h_t"], p["w_t"]),
                                      chunk_size=0)
