r"""Distillation loss over chunks of positions, for large vocabularies.

A language model's output layer turns hidden states ``h_s [N, D]`` into
logits ``z = h_s W_s + b_s`` of shape ``[N, V]``; at ``N = 8,192`` tokens and
``V = 128,000`` that is 4 GB of float32 per copy, and the distillation loss's
value-and-grad keeps several copies (student and teacher logits, softmaxes,
the logits' cotangent). :func:`chunked_distillation_loss` computes the same
loss and gradients ``chunk_size`` positions at a time inside one
``lax.scan``, so only ``[chunk_size, V]`` logits ever exist:

* ``reduction="mean"`` or ``"sum"`` (a scalar): a ``jax.custom_vjp`` whose
  forward pass computes, for each chunk, the loss **and** its gradients
  w.r.t. ``h_s``, ``W_s`` and ``b_s`` (the chunk's logits' cotangent is
  formed and consumed at once: ``dW_s += h_c^T g_c``, ``dh_c = g_c W_s^T``).
  The backward pass only scales them by the incoming cotangent. Same
  matmuls as the unchunked value-and-grad (teacher forward, student forward,
  ``dh``, ``dW``): no recomputation.
* ``reduction="none"`` (per-position ``[N]``): a scan whose body is
  ``jax.checkpoint``-ed, so the backward pass recomputes each chunk's logits
  (one more forward matmul per model than unchunked).

The objective per position is kdjax's ``kd`` objective,
``alpha * CE(y, softmax(z)) + (1 - alpha) * T^2 KL(p_t || q_s)``, or with
``divergence="reverse_kl"`` / ``"jsd"`` the reverse KL or the normalised
generalised JSD in place of the forward KL (``T^2`` on each), with the
teacher given either as its own hidden states and projection
(``teacher=(h_t, W_t[, b_t])``, no gradient reaches it) or as cached top-k
targets (``topk=(values, indices[, tail_logit])``, see
:mod:`kdjax.losses.topk`).
Positions are weighted by ``weights [N]`` (0 for padding): ``"sum"`` is
:math:`\sum_n w_n \ell_n`, ``"mean"`` is :math:`\sum_n w_n \ell_n / \sum_n
w_n` (0 when every weight is 0), the per-token normalisation of MaxText and
TRL (never a mean over padding, never divided by ``V``). ``N`` need not be a
multiple of ``chunk_size``: the last chunk is padded with weight 0.

Peak memory, chunked: the arguments (``W_s``, ``W_t``: ``4 D V`` bytes each
in float32), the gradient ``dW_s`` (``4 D V``, accumulated over the chunks
and held until the backward pass) and ``O(chunk_size V)`` temporaries
(measured on XLA:CPU: about four ``[chunk_size, V]`` float32 arrays, or
for small chunks one ``[D, V]`` gradient update plus one or two ``[chunk_size,
V]``), instead of ``O(N V)`` (about five ``[N, V]``
float32 arrays for the unchunked value-and-grad). The chunk size trades
memory for speed: each chunk is a rank-``chunk_size`` update of the whole
``[D, V]`` gradient, which runs below peak matmul speed for small chunks.
Measured on a 2-core CPU (``benchmarks/chunked_loss.py``, D = 1,024), the
default of 512 takes 0.96x the unchunked time with 0.025 of its
temporaries at V = 32,000 and 16,384 tokens, and 0.85x with 0.10 at V =
128,000 and 4,096 tokens; 256 cuts the temporaries by a further quarter
to a third at 1.0-1.3x the time. A chunk larger than ``N`` is cut to ``N``.
``chunk_size=None`` computes the plain unchunked loss with autodiff (the
reference, and the benchmark's baseline).

A teacher with a padded vocabulary (``W_t [D_t, V_s + P]``, its last ``P``
columns ids no token maps to) is compared after its padding is dropped,
when the caller declares it: ``teacher_vocab_padding=P`` (the rule and its
math: :mod:`kdjax.vocab`). Each chunk's teacher logits are computed on all
``V_s + P`` columns and sliced to the student's ``V_s`` (no copy of
``W_t``; ``P / V`` more teacher matmul work, 0.08% for Qwen's 128 of
152,064), so the teacher's distribution is renormalised over the student's
classes. Any other difference in ``V`` raises, naming both sizes; a top-k
cache must hold student classes (see :mod:`kdjax.losses.topk`).

:func:`chunked_sums` is the same fused loss returning its weighted sum and
the weighted sums of its metrics (soft and hard loss, accuracy, agreement,
from the same chunk logits); it is what the hidden-state objectives of
:func:`kdjax.fit` call (:mod:`kdjax.fused`).
"""

from __future__ import annotations

import functools
import numbers
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.losses import divergences as losses
from kdjax.losses import topk as topk_lib
from kdjax import vocab as vocab_lib

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

__all__ = ["chunked_distillation_loss", "chunked_sums", "DIVERGENCES"]

_REDUCTIONS = ("mean", "sum", "none")


def _logits(h: Array, w: Array, b: Array) -> Array:
  """``h @ w + b`` accumulated and returned in >= float32."""
  out_dtype = jnp.promote_types(jnp.result_type(h, w), jnp.float32)
  z = jnp.dot(h, w, preferred_element_type=out_dtype)
  return z + b.astype(out_dtype)


DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def _soft_term(divergence: str, z, v, temperature, beta):
  """The per-position divergence of student logits ``z`` from teacher ``v``."""
  if divergence == "forward_kl":
    return losses.distillation_loss(z, v, temperature)
  if divergence == "reverse_kl":
    return losses.reverse_distillation_loss(z, v, temperature)
  return losses.generalized_jsd_loss(z, v, temperature, beta=beta)


def _make_per_position(mode: str, tail: str, has_labels: bool,
                       divergence: str = "forward_kl"):
  """``fn(z, consts, rows, hp) -> (loss [c], terms)`` per position.

  ``hp`` holds ``temperature``, ``alpha`` and ``beta``; ``terms`` the
  per-position ``soft_loss``, ``hard_loss`` (with labels), ``accuracy``
  (student top-1 equals the label) and ``agreement`` (student top-1 equals
  the teacher's; with top-k targets, the teacher's first index).
  """

  def fn(z, consts, rows, hp):
    temperature = hp["temperature"]
    if mode == "teacher":
      v = jax.lax.stop_gradient(_logits(rows["h_t"], consts["w_t"],
                                        consts["b_t"]))
      if v.shape[-1] != z.shape[-1]:  # Padding dropped (kdjax.vocab).
        v = v[..., :z.shape[-1]]
      soft = _soft_term(divergence, z, v, temperature, hp["beta"])
      teacher_top = jnp.argmax(v, -1)
    else:
      soft = topk_lib.topk_distillation_loss(
          z, rows["values"], rows["indices"], temperature, tail=tail,
          tail_logit=rows.get("tail_logit"))
      teacher_top = rows["indices"][:, 0]
    top = jnp.argmax(z, -1)
    terms = {"soft_loss": soft,
             "agreement": (top == teacher_top).astype(jnp.float32)}
    if not has_labels:
      return soft, terms
    hard = losses.hard_label_loss(z, rows["labels"])
    terms["hard_loss"] = hard
    terms["accuracy"] = (top == rows["labels"]).astype(jnp.float32)
    a = jnp.asarray(hp["alpha"], soft.dtype)
    # As in kd_objective: at alpha = 0 a NaN hard term (bad label) is 0.
    return jnp.where(a > 0, a * hard, 0.0) + (1.0 - a) * soft, terms

  return fn


def _split(tree, num_chunks: int, chunk_size: int):
  return jax.tree.map(
      lambda a: a.reshape((num_chunks, chunk_size) + a.shape[1:]), tree)


def _masked_sum(values, w):
  """``sum_n w_n v_n`` with positions of weight 0 exactly 0 (NaN included)."""
  return jnp.sum(jnp.where(w != 0, w * values, 0.0))


@functools.lru_cache(maxsize=None)
def _make_fused(mode: str, tail: str, has_labels: bool, num_chunks: int,
                chunk_size: int, static_hp: tuple, divergence: str):
  """The custom-VJP ``(sum_n w_n l_n, terms)`` over chunks (module doc).

  ``terms`` are the weighted sums of the per-position terms of
  :func:`_make_per_position` (metrics: they carry no gradient, their
  cotangent is ignored). A Python hyperparameter is baked in
  (``static_hp``: ``(name, value)`` pairs), as it would be without the
  custom VJP (whose arguments are always traced): the losses then take
  their static code paths (e.g. no high-T select).
  """
  per_position = _make_per_position(mode, tail, has_labels, divergence)

  def chunk_sum(h_c, w_s, b_s, consts, rows_c, hp):
    hp = {**hp, **dict(static_hp)}
    ell, terms = per_position(_logits(h_c, w_s, b_s), consts, rows_c, hp)
    w = rows_c["weights"]
    return _masked_sum(ell, w), {k: _masked_sum(t, w)
                                 for k, t in terms.items()}

  def zero_terms(h_s, w_s, b_s, consts, rows, hp):
    shapes = jax.eval_shape(
        chunk_sum, h_s[:chunk_size], w_s, b_s, consts,
        jax.tree.map(lambda a: a[:chunk_size], rows), hp)[1]
    return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)

  @jax.custom_vjp
  def fused(h_s, w_s, b_s, consts, rows, hp):
    xs = _split((h_s, rows), num_chunks, chunk_size)

    def body(carry, x):
      total, terms = carry
      h_c, rows_c = x
      value, t = chunk_sum(h_c, w_s, b_s, consts, rows_c, hp)
      return (total + value, jax.tree.map(jnp.add, terms, t)), None

    init = (jnp.zeros((), jnp.float32),
            zero_terms(h_s, w_s, b_s, consts, rows, hp))
    out, _ = jax.lax.scan(body, init, xs)
    return out

  def fwd(h_s, w_s, b_s, consts, rows, hp):
    xs = _split((h_s, rows), num_chunks, chunk_size)
    grad_fn = jax.value_and_grad(chunk_sum, argnums=(0, 1, 2), has_aux=True)

    def body(carry, x):
      total, terms, d_w, d_b = carry
      h_c, rows_c = x
      (value, t), (d_h, d_w_c, d_b_c) = grad_fn(h_c, w_s, b_s, consts,
                                                rows_c, hp)
      return (total + value, jax.tree.map(jnp.add, terms, t),
              d_w + d_w_c.astype(d_w.dtype),
              d_b + d_b_c.astype(d_b.dtype)), d_h

    init = (jnp.zeros((), jnp.float32),
            zero_terms(h_s, w_s, b_s, consts, rows, hp),
            jnp.zeros(w_s.shape, jnp.float32),
            jnp.zeros(b_s.shape, jnp.float32))
    (total, terms, d_w, d_b), d_h = jax.lax.scan(body, init, xs)
    d_h = d_h.reshape(h_s.shape)
    return (total, terms), (d_h, d_w.astype(w_s.dtype), d_b.astype(b_s.dtype))

  def bwd(res, ct):
    d_h, d_w, d_b = res
    ct = ct[0]  # The terms are metrics: their cotangent is ignored.
    scale = lambda g: (ct * g).astype(g.dtype)
    return (scale(d_h), scale(d_w), scale(d_b), None, None, None)

  fused.defvjp(fwd, bwd)
  return fused


def _per_position_chunked(per_position, h_s, w_s, b_s, consts, rows, hp,
                          num_chunks, chunk_size):
  """``[N_pad]`` weighted per-position losses, rematerialised per chunk."""
  xs = _split((h_s, rows), num_chunks, chunk_size)

  @jax.checkpoint
  def chunk(h_c, w_s, b_s, rows_c):
    z = _logits(h_c, w_s, b_s)
    ell, _ = per_position(z, consts, rows_c, hp)
    w = rows_c["weights"]
    return jnp.where(w != 0, w * ell, 0.0)

  def body(_, x):
    h_c, rows_c = x
    return None, chunk(h_c, w_s, b_s, rows_c)

  _, out = jax.lax.scan(body, None, xs)
  return out.reshape(-1)


def _pad_rows(a: Array, total: int, value=0) -> Array:
  extra = total - a.shape[0]
  if extra == 0:
    return a
  pad = [(0, extra)] + [(0, 0)] * (a.ndim - 1)
  return jnp.pad(a, pad, constant_values=value)


def _teacher_rows(teacher, n: int, num_classes: int, padding: int = 0):
  """``(rows, consts)`` of an online teacher ``(h_t, W_t[, b_t])``.

  ``W_t`` has ``V + padding`` columns (:mod:`kdjax.vocab`), checked.
  """
  if len(teacher) not in (2, 3):
    raise ValueError("teacher must be (h_t, W_t) or (h_t, W_t, b_t).")
  h_t, w_t = jnp.asarray(teacher[0]), jnp.asarray(teacher[1])
  if w_t.ndim == 2:
    vocab_lib.check_vocab(num_classes, w_t.shape[1], padding,
                          what="the teacher's W_t columns")
  v_t = num_classes + padding
  b_t = (jnp.zeros((v_t,), jnp.float32) if len(teacher) == 2
         else jnp.asarray(teacher[2]))
  if (h_t.ndim != 2 or h_t.shape[0] != n or w_t.shape !=
      (h_t.shape[1], v_t) or b_t.shape != (v_t,)):
    raise ValueError(
        f"teacher shapes must be h_t [N={n}, D_t], W_t [D_t, V_t={v_t}]"
        f", b_t [V_t], got {h_t.shape}, {w_t.shape}, {b_t.shape}.")
  return {"h_t": h_t}, {"w_t": w_t, "b_t": b_t}


def _topk_rows(topk, tail: str, n: int, num_classes: int) -> dict:
  """The per-position rows of cached top-k targets."""
  if tail == "bucket" and len(topk) != 3:
    raise ValueError("tail='bucket' needs topk=(values, indices, "
                     "tail_logit).")
  if tail != "bucket" and len(topk) != 2:
    raise ValueError("topk must be (values, indices) with "
                     f"tail={tail!r} (a tail_logit is for 'bucket').")
  rows = {"values": jnp.asarray(topk[0]), "indices": jnp.asarray(topk[1])}
  topk_lib.check_indices(rows["indices"], num_classes)
  if rows["values"].shape[0] != n or rows["indices"].shape[0] != n:
    raise ValueError(
        f"topk arrays must have N={n} rows, got "
        f"{rows['values'].shape} and {rows['indices'].shape}.")
  if tail == "bucket":
    rows["tail_logit"] = jnp.asarray(topk[2])
  return rows


def _targets(teacher, topk, tail, n: int, num_classes: int, padding):
  """``(mode, rows, consts)`` of the online teacher or the top-k cache."""
  if teacher is not None:
    return ("teacher", *_teacher_rows(
        teacher, n, num_classes, vocab_lib._check_padding(padding)))  # pylint: disable=protected-access
  if padding:
    raise ValueError(
        "teacher_vocab_padding is for an online teacher=(h_t, W_t); a "
        "top-k cache is built with the padding dropped "
        "(kdjax.losses.topk.topk_cache(..., teacher_vocab_padding=P)) and "
        "holds student classes.")
  return "topk", _topk_rows(topk, tail, n, num_classes), {}


def _static(x):
  """A Python real as a float (baked into the program), else None."""
  return (float(x) if isinstance(x, numbers.Real) and not isinstance(x, bool)
          else None)


def _chunked(per_position, key: tuple, h_s, w_s, b_s, consts, rows, hp,
             chunk_size, reduction):
  """``(total, terms)`` (``"sum"``) or ``[N]`` weighted values (``"none"``).

  ``key``: ``(mode, tail, has_labels, divergence)``.
  """
  n = h_s.shape[0]
  if isinstance(chunk_size, bool) or int(chunk_size) < 1:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size}.")
  chunk_size = min(int(chunk_size), max(n, 1))  # No padding past N.
  num_chunks = -(-n // chunk_size)
  total_rows = num_chunks * chunk_size
  padded = {name: _pad_rows(a, total_rows) for name, a in rows.items()}
  if "indices" in padded and total_rows > n:  # Distinct, valid indices.
    k = padded["indices"].shape[1]
    pad_idx = jnp.broadcast_to(jnp.arange(k, dtype=padded["indices"].dtype),
                               (total_rows - n, k))
    padded["indices"] = jnp.concatenate([rows["indices"], pad_idx])
  h_pad = _pad_rows(h_s, total_rows)
  if reduction == "none":
    return _per_position_chunked(
        per_position, h_pad, w_s, b_s, consts, padded, hp, num_chunks,
        chunk_size)[:n]
  static_hp = tuple((k, _static(v)) for k, v in sorted(hp.items())
                    if _static(v) is not None)
  mode, tail, has_labels, divergence = key
  fused = _make_fused(mode, tail, has_labels, num_chunks, chunk_size,
                      static_hp, divergence)
  return fused(h_pad, w_s, b_s, consts, padded, hp)


def _student_head(h_s, w_s, b_s):
  """``(h_s [N, D], W_s [D, V], b_s [V])`` as arrays, shapes checked."""
  h_s, w_s = jnp.asarray(h_s), jnp.asarray(w_s)
  if h_s.ndim != 2 or w_s.ndim != 2 or h_s.shape[1] != w_s.shape[0]:
    raise ValueError(
        f"h_s must be [N, D] and w_s [D, V], got h_s.shape={h_s.shape} and "
        f"w_s.shape={w_s.shape}.")
  num_classes = w_s.shape[1]
  b_s = (jnp.zeros((num_classes,), jnp.float32) if b_s is None
         else jnp.asarray(b_s))
  if b_s.shape != (num_classes,):
    raise ValueError(f"b_s.shape={b_s.shape} must be (V,) = ({num_classes},).")
  return h_s, w_s, b_s


def _label_weight_rows(labels, weights, alpha, n: int) -> dict:
  """The ``labels`` (if any) and ``weights`` rows, shapes checked."""
  rows = {}
  if labels is not None:
    rows["labels"] = jnp.asarray(labels)
    if rows["labels"].shape != (n,):
      raise ValueError(f"labels.shape={rows['labels'].shape} must be (N,) = "
                       f"({n},).")
  else:
    a = losses._concrete(alpha)  # pylint: disable=protected-access
    if a is None or np.any(a != 0):
      raise ValueError("alpha > 0 (or a traced alpha) needs labels.")
  w = (jnp.ones((n,), jnp.float32) if weights is None
       else jnp.asarray(weights, jnp.float32))
  if w.shape != (n,):
    raise ValueError(f"weights.shape={w.shape} must be (N,) = ({n},).")
  rows["weights"] = w
  return rows


def chunked_distillation_loss(
    h_s: ArrayLike, w_s: ArrayLike, b_s: Optional[ArrayLike] = None, *,
    temperature: float | ArrayLike,
    teacher: Optional[Sequence[ArrayLike]] = None,
    topk: Optional[Sequence[ArrayLike]] = None,
    tail: str = "renormalize",
    labels: Optional[ArrayLike] = None,
    alpha: float | ArrayLike = 0.0,
    weights: Optional[ArrayLike] = None,
    reduction: str = "mean",
    chunk_size: Optional[int] = 512,
    divergence: str = "forward_kl",
    beta: float | ArrayLike = 0.5,
    teacher_vocab_padding: int = 0) -> Array:
  r"""A distillation loss from hidden states, ``chunk_size`` rows at a time.

  With student logits :math:`z_n = h_{s,n} W_s + b_s` and teacher logits
  :math:`v_n = h_{t,n} W_t + b_t` (or cached top-k targets):

  .. math::
    \ell_n = \alpha\, \mathrm{CE}(y_n, \mathrm{softmax}(z_n))
      + (1 - \alpha)\, T^2\, \mathrm{KL}(\mathrm{softmax}(v_n / T)
        \,\|\, \mathrm{softmax}(z_n / T)), \qquad
    L = \frac{\sum_n w_n \ell_n}{\sum_n w_n}\ (\text{"mean"}),

  and :math:`\partial L / \partial z_n = (w_n / \sum w)\,[\alpha (q^{(1)}_n
  - \mathrm{onehot}(y_n)) + (1 - \alpha) T (q_n - p_n)]`, chained into
  :math:`\partial L/\partial W_s = \sum_n h_{s,n}^\top \partial L/\partial
  z_n` etc. ``divergence="reverse_kl"``: the soft term is :math:`T^2
  \mathrm{KL}(q_n \| p_n)`; ``"jsd"``: the normalised generalised JSD of
  :func:`kdjax.losses.generalized_jsd_loss` (mixture in probability
  space); each depends on one position's logits, so fits the same custom
  VJP. ``topk``: :func:`kdjax.losses.topk.topk_distillation_loss`,
  forward KL only (the reverse KL and JSD need :math:`p_i` on every class).
  Values and gradients equal ``chunk_size=None``'s to float32 rounding.

  Args:
    h_s: ``[N, D]`` student final hidden states (any float dtype; logits
      and all loss math are float32).
    w_s: ``[D, V]`` student output projection.
    b_s: optional ``[V]`` output bias.
    temperature: ``T > 0``.
    teacher: ``(h_t [N, D_t], W_t [D_t, V])`` or with a bias ``b_t [V]``;
      frozen (no gradient flows into it). Exactly one of ``teacher`` and
      ``topk`` must be given.
    topk: cached ``(values [N, k], indices [N, k])``, plus
      ``tail_logit [N]`` for ``tail="bucket"``.
    tail: the top-k tail mode (``"renormalize"`` or ``"bucket"``).
    labels: optional ``[N]`` integer labels for the hard term.
    alpha: weight of the hard term, in ``[0, 1]``; non-zero needs labels.
    weights: optional ``[N]`` non-negative position weights (0 for padding;
      default all 1). Positions of weight 0 must still hold finite numbers.
    reduction: ``"mean"`` (weighted mean), ``"sum"`` (weighted sum) or
      ``"none"`` (``[N]`` weighted per-position values ``w_n l_n``).
    chunk_size: positions per chunk (default 512: see the module doc for
      the measured memory and time); ``None`` for the unchunked reference.
    divergence: ``"forward_kl"`` (the default, kdjax's ``kd``),
      ``"reverse_kl"`` or ``"jsd"`` (``teacher`` only).
    beta: the JSD's teacher weight in ``[0, 1]`` (``"jsd"`` only).
    teacher_vocab_padding: ``P`` trailing padding columns of ``W_t [D_t,
      V + P]``, dropped (the teacher renormalised: :mod:`kdjax.vocab`).

  Returns:
    A float32 scalar (``"mean"``, ``"sum"``) or ``[N]`` values (``"none"``).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from kdjax import chunked
    >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    >>> h = jax.random.normal(k1, (10, 4)); w = jax.random.normal(k2, (4, 7))
    >>> teacher = (h, jax.random.normal(k3, (4, 7)))
    >>> kw = dict(temperature=2.0, teacher=teacher)
    >>> a = chunked.chunked_distillation_loss(h, w, chunk_size=3, **kw)
    >>> b = chunked.chunked_distillation_loss(h, w, chunk_size=None, **kw)
    >>> bool(jnp.allclose(a, b, rtol=1e-6))
    True
  """
  if reduction not in _REDUCTIONS:
    raise ValueError(f"reduction must be one of {_REDUCTIONS}, got "
                     f"{reduction!r}.")
  key, h_s, w_s, b_s, consts, rows, hp = _prepare(
      h_s, w_s, b_s, temperature=temperature, teacher=teacher, topk=topk,
      tail=tail, labels=labels, alpha=alpha, weights=weights,
      divergence=divergence, beta=beta, padding=teacher_vocab_padding)
  w = rows["weights"]
  per_position = _make_per_position(*key)
  if chunk_size is None:  # The unchunked reference: plain autodiff.
    ell, _ = per_position(_logits(h_s, w_s, b_s), consts, rows, hp)
    weighted = jnp.where(w != 0, w * ell, 0.0)
    total = jnp.sum(weighted)
  elif reduction == "none":
    weighted = _chunked(per_position, key, h_s, w_s, b_s, consts, rows, hp,
                        chunk_size, reduction)
  else:
    total, _ = _chunked(per_position, key, h_s, w_s, b_s, consts, rows, hp,
                        chunk_size, reduction)
  if reduction != "mean":
    return weighted if reduction == "none" else total
  denom = jnp.sum(w)
  return jnp.where(denom > 0, total / jnp.where(denom > 0, denom, 1.0), 0.0)


def _prepare(h_s, w_s, b_s, *, temperature, teacher, topk, tail, labels,
             alpha, weights, divergence, beta, padding=0):
  """Checks the arguments; ``(key, h_s, w_s, b_s, consts, rows, hp)``."""
  if (teacher is None) == (topk is None):
    raise ValueError("give exactly one of teacher=(h_t, W_t[, b_t]) and "
                     "topk=(values, indices[, tail_logit]).")
  if divergence not in DIVERGENCES:
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got "
                     f"{divergence!r}.")
  if topk is not None and divergence != "forward_kl":
    raise ValueError(
        f"divergence={divergence!r} needs the teacher's whole distribution; "
        "cached top-k targets give only the forward KL (pass "
        "teacher=(h_t, W_t[, b_t]) for the reverse KL or the JSD).")
  losses._check_temperature(temperature)  # pylint: disable=protected-access
  losses._check_alpha(alpha)  # pylint: disable=protected-access
  if divergence == "jsd":
    losses._check_beta(beta, True)  # pylint: disable=protected-access
  h_s, w_s, b_s = _student_head(h_s, w_s, b_s)
  n, num_classes = h_s.shape[0], w_s.shape[1]
  mode, rows, consts = _targets(teacher, topk, tail, n, num_classes,
                                padding)
  rows.update(_label_weight_rows(labels, weights, alpha, n))
  hp = {"temperature": temperature, "alpha": alpha, "beta": beta}
  key = (mode, tail, labels is not None, divergence)
  return key, h_s, w_s, b_s, consts, rows, hp


def chunked_sums(h_s: ArrayLike, w_s: ArrayLike,
                 b_s: Optional[ArrayLike] = None, *,
                 temperature: float | ArrayLike,
                 teacher: Optional[Sequence[ArrayLike]] = None,
                 topk: Optional[Sequence[ArrayLike]] = None,
                 tail: str = "renormalize",
                 labels: Optional[ArrayLike] = None,
                 alpha: float | ArrayLike = 0.0,
                 weights: Optional[ArrayLike] = None,
                 chunk_size: int = 512,
                 divergence: str = "forward_kl",
                 beta: float | ArrayLike = 0.5,
                 teacher_vocab_padding: int = 0) -> tuple[Array, dict]:
  r"""``(sum_n w_n l_n, terms)``: the fused loss and its metrics' sums.

  The loss is :func:`chunked_distillation_loss`'s ``reduction="sum"``
  (same arguments, same custom VJP: no recomputation); ``terms`` holds the
  weighted sums :math:`\sum_n w_n t_n` of the per-position ``soft_loss``
  (the divergence), ``agreement`` (student top-1 equals the teacher's) and,
  with ``labels``, ``hard_loss`` and ``accuracy``, computed from the same
  ``[chunk_size, V]`` logits. The terms are metrics: no gradient flows
  through them (their cotangent is ignored). What the hidden-state
  objectives of :mod:`kdjax.fused` call; the train step divides both by the
  global batch's weight.
  """
  key, h_s, w_s, b_s, consts, rows, hp = _prepare(
      h_s, w_s, b_s, temperature=temperature, teacher=teacher, topk=topk,
      tail=tail, labels=labels, alpha=alpha, weights=weights,
      divergence=divergence, beta=beta, padding=teacher_vocab_padding)
  return _chunked(_make_per_position(*key), key, h_s, w_s, b_s, consts, rows,
                  hp, chunk_size, "sum")
