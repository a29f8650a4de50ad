r"""Top-k teacher targets: distillation from a compact teacher cache.

A sequence model's teacher logits are ``[N, L, V]`` with ``V`` in the tens of
thousands: 1M tokens at ``V = 32,000`` is 128 GB of float32. Caching only the
teacher's ``k`` largest logits per position (and their class indices) cuts
that to

.. math::
  \text{bytes} = N L k\,(4 + 4)\ \big[ + N L \cdot 4 \text{ for the tail logit
  (bucket mode)} \big],

e.g. 1M tokens at ``k = 64``: 512 MB (516 MB with the tail logit), about
250 times less than the 128 GB of full float32 logits (see
:func:`cache_bytes`).

What the cache must hold depends on the ``tail`` mode of
:func:`topk_distillation_loss`:

* ``tail="renormalize"``: ``(values, indices)``, the raw top-k logits.
  The top-k *set* of ``v / T`` is the same at every ``T`` (division by ``T``
  is monotone), and renormalising over it removes the unknown full-vocabulary
  normaliser, so **the temperature stays a free argument at training time**.
* ``tail="bucket"``: ``(values, indices, tail_logit)`` where
  ``tail_logit = T_c * logsumexp(v_tail / T_c)`` summarises the teacher's
  ``V - k`` other classes at the caching temperature ``T_c``. It is only
  valid at ``T = T_c``: the tail's mass at another temperature needs the tail
  logits themselves. **Bucket mode fixes T at caching time** (cache one
  ``tail_logit`` per temperature you want, 4 bytes per position each).

The tail modes' errors. With the teacher's top-k classes :math:`K`, the
student's full tempered softmax :math:`q` and its tail mass
:math:`Q = \sum_{i \notin K} q_i`, :func:`topk_distillation_loss` is a KL
over ``k + 1`` outcomes with targets :math:`\hat p_j` on :math:`K`, tail
target :math:`\hat\varepsilon` and gradient :math:`T (q_i - \tilde p_i)`:

* ``tail="renormalize"`` (cache: values, indices; any ``T``): the teacher
  is renormalised over its top k,
  :math:`\hat p_j = e^{v_j/T} / \sum_{l \in K} e^{v_l/T}`,
  :math:`\hat\varepsilon = 0`; :math:`\tilde p = \hat p` on :math:`K`,
  0 elsewhere. With :math:`p` the teacher's full softmax at ``T`` and
  :math:`\varepsilon = 1 - \sum_K p_j` its mass outside the top k (which
  grows with ``T``), against the full loss :math:`L_V`:

  .. math::
    L - L_V = \varepsilon L + T^2 H_2(\varepsilon)
              - T^2 \varepsilon\, C_{\rm tail} \le
              \varepsilon L + T^2 H_2(\varepsilon), \qquad
    \|\nabla_z L - \nabla_z L_V\|_1 = 2 T \varepsilon,

  with :math:`H_2(\varepsilon) = -\varepsilon\log\varepsilon -
  (1-\varepsilon)\log(1-\varepsilon)` and :math:`C_{\rm tail} =
  \sum_{i \notin K} (p_i/\varepsilon) \log((p_i/\varepsilon)/q_i) \ge 0`
  (an exact identity; the top-k loss misses the tail's term and
  overweights the head by :math:`1/(1-\varepsilon)`).
* ``tail="bucket"`` (cache: values, indices, ``tail_logit`` at this very
  ``T``; see :func:`tail_logit`): the teacher keeps its true top-k
  probabilities :math:`\hat p_j = p_j` and its tail mass
  :math:`\hat\varepsilon = \varepsilon`;
  :math:`\tilde p_i = \varepsilon q_i / Q` outside :math:`K`. By the
  chain rule of the KL,
  :math:`L_V - L = T^2 \varepsilon\, \mathrm{KL}(p^{\rm tail} \|
  q^{\rm tail}) \ge 0` (tail distributions renormalised) and
  :math:`\|\nabla_z L - \nabla_z L_V\|_1 \le 2 T \varepsilon`; at
  ``k = V - 1`` it is exact too.

All functions are pure and follow :mod:`kdjax.losses.divergences`'
conventions: float32 (or wider) computation, per-position outputs
``[...]``, ``T^2`` included.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.losses import divergences as losses

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

__all__ = [
    "topk_targets",
    "tail_logit",
    "topk_cache",
    "cache_bytes",
    "topk_distillation_loss",
]

_TAILS = ("renormalize", "bucket")


def _check_k(k, num_classes: int) -> None:
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
    raise TypeError(f"k must be a Python int, got {k!r}.")
  if not 1 <= k <= num_classes:
    raise ValueError(
        f"k must lie in [1, V] = [1, {num_classes}], got k={k}.")


def topk_targets(teacher_logits: ArrayLike, k: int) -> tuple[Array, Array]:
  """The teacher's ``k`` largest logits per position, and their classes.

  Args:
    teacher_logits: ``[..., V]`` logits; any float dtype (the values are
      returned in >= float32). ``-inf`` entries (masked classes) are allowed
      and come last.
    k: number of classes to keep, ``1 <= k <= V``.

  Returns:
    ``(values [..., k] float32, indices [..., k] int32)``, by decreasing
    value (``jax.lax.top_k``; ties keep the lower index first).

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import topk
    >>> topk.topk_targets(jnp.array([0.5, 3.0, -1.0, 2.0]), 2)
    (Array([3., 2.], dtype=float32), Array([1, 3], dtype=int32))
  """
  v = losses._as_float(teacher_logits)  # pylint: disable=protected-access
  if v.ndim == 0:
    raise ValueError("teacher_logits must have a class axis, got a scalar.")
  _check_k(k, v.shape[-1])
  values, indices = jax.lax.top_k(v, k)
  return values, indices.astype(jnp.int32)


def _membership(indices: Array, num_classes: int) -> Array:
  """``[..., V]`` booleans: True at the classes listed in ``indices``."""
  lead = indices.shape[:-1]
  rows = int(np.prod(lead, dtype=np.int64))
  flat = indices.reshape(rows, indices.shape[-1])
  member = jnp.zeros((rows, num_classes), bool)
  member = member.at[jnp.arange(rows)[:, None], flat].set(True)
  return member.reshape(lead + (num_classes,))


def _tail_logit(logits: Array, indices: Array, t: Array) -> Array:
  """``T * logsumexp(x / T)`` over the classes *not* in ``indices``.

  Listed classes (and ``-inf`` logits) are replaced by ``-1e30`` rather than
  ``-inf``, so an empty tail gives a finite ``~ -1e30`` (absent, to
  :func:`kdjax.losses.distillation_loss`) with finite gradients.
  """
  member = _membership(indices, logits.shape[-1])
  x = jnp.where(member, losses._NEG_LARGE,  # pylint: disable=protected-access
                jnp.maximum(logits, losses._NEG_LARGE))  # pylint: disable=protected-access
  return t * jax.nn.logsumexp(x / t, axis=-1)


def tail_logit(teacher_logits: ArrayLike, indices: ArrayLike,
               temperature: float | ArrayLike) -> Array:
  r"""One logit standing for all of the teacher's classes outside the top k.

  .. math::
    \tilde v = T \log \sum_{i \notin K} e^{v_i / T}, \qquad
    e^{\tilde v / T} = \sum_{i \notin K} e^{v_i / T},

  so that ``softmax([v_K, ṽ] / T)`` is the teacher's distribution at ``T``
  with its tail merged into one bucket. Needed (at the training temperature)
  by ``tail="bucket"`` of :func:`topk_distillation_loss`. An empty tail
  (``k = V``) gives about ``-1e30`` (a class of probability 0).

  Args:
    teacher_logits: ``[..., V]`` logits ``v``.
    indices: ``[..., k]`` the top-k classes (from :func:`topk_targets`).
    temperature: the caching temperature ``T_c > 0``.

  Returns:
    ``[...]`` float32 tail logits.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import topk
    >>> v = jnp.log(jnp.array([4.0, 1.0, 2.0, 1.0]))
    >>> float(jnp.exp(topk.tail_logit(v, jnp.array([0, 2]), 1.0)))  # 1 + 1
    2.0
  """
  losses._check_temperature(temperature)  # pylint: disable=protected-access
  v = losses._as_float(teacher_logits)  # pylint: disable=protected-access
  indices = jnp.asarray(indices)
  if indices.shape[:-1] != v.shape[:-1]:
    raise ValueError(
        f"indices.shape={indices.shape} must be teacher_logits.shape[:-1] + "
        f"(k,) = {v.shape[:-1]} + (k,).")
  return _tail_logit(v, indices, jnp.asarray(temperature, v.dtype))


def cache_bytes(num_positions: int, k: int, *, bucket: bool = False,
                value_bytes: int = 4, index_bytes: int = 4) -> int:
  """Bytes of a top-k cache: ``positions * k * (4 + 4) [+ positions * 4]``.

  Example:
    >>> from kdjax import topk
    >>> topk.cache_bytes(1_000_000, 64) / 1e6  # MB, against 128,000 MB
    512.0
    >>> topk.cache_bytes(1_000_000, 64, bucket=True) / 1e6
    516.0
  """
  per_position = k * (value_bytes + index_bytes) + (4 if bucket else 0)
  return int(num_positions) * per_position


def topk_cache(teacher_logits: Any, k: int, *, chunk_size: int = 256,
               bucket_temperature: Optional[float] = None
               ) -> dict[str, np.ndarray]:
  """Top-k targets of a big ``[N, ..., V]`` array, one chunk at a time.

  ``teacher_logits`` may live on the host (a NumPy array or ``np.memmap``
  of the teacher's logits): chunks of ``chunk_size`` rows along the first
  axis are moved to the device, reduced to their top k there, and brought
  back, so the device never holds more than one ``[chunk_size, ..., V]``
  chunk. The last chunk is padded to ``chunk_size`` (one compile).

  Args:
    teacher_logits: ``[N, ..., V]`` array (anything ``np.asarray`` accepts
      chunk by chunk).
    k: classes kept per position.
    chunk_size: rows along the first axis per device transfer.
    bucket_temperature: if given, also the ``tail_logit`` at this
      temperature (for ``tail="bucket"``, valid at this temperature only).

  Returns:
    ``{"values": [N, ..., k] float32, "indices": [N, ..., k] int32}`` NumPy
    arrays, plus ``"tail_logit": [N, ...] float32`` with a
    ``bucket_temperature``; :func:`cache_bytes` gives their size.
  """
  n = int(np.shape(teacher_logits)[0])
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
  _check_k(k, int(np.shape(teacher_logits)[-1]))
  if bucket_temperature is not None:
    losses._check_temperature(bucket_temperature)  # pylint: disable=protected-access

  @jax.jit
  def reduce(chunk):
    values, indices = topk_targets(chunk, k)
    out = {"values": values, "indices": indices}
    if bucket_temperature is not None:
      out["tail_logit"] = tail_logit(chunk, indices, bucket_temperature)
    return out

  parts = []
  for start in range(0, n, chunk_size):
    chunk = np.asarray(teacher_logits[start:start + chunk_size])
    rows = chunk.shape[0]
    if rows < chunk_size:
      pad = [(0, chunk_size - rows)] + [(0, 0)] * (chunk.ndim - 1)
      chunk = np.pad(chunk, pad)
    out = jax.device_get(reduce(chunk))
    parts.append({name: a[:rows] for name, a in out.items()})
  return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def _check_topk_args(student_logits, topk_values, topk_indices, temperature,
                     tail, tail_logit):
  """``(z, v, indices)`` as arrays; every argument of the loss checked."""
  if tail not in _TAILS:
    raise ValueError(f"tail must be one of {_TAILS}, got {tail!r}.")
  if tail == "bucket" and tail_logit is None:
    raise ValueError(
        "tail='bucket' needs the teacher's tail_logit at this temperature "
        "(topk.tail_logit, or topk_cache(..., bucket_temperature=T)).")
  if tail == "renormalize" and tail_logit is not None:
    raise ValueError(
        "tail_logit is only used by tail='bucket'; with tail='renormalize' "
        "it would be silently ignored.")
  z = losses._as_float(student_logits)  # pylint: disable=protected-access
  v = losses._as_float(topk_values)  # pylint: disable=protected-access
  indices = jnp.asarray(topk_indices)
  if z.ndim == 0:
    raise ValueError("student_logits must have a class axis, got a scalar.")
  if v.shape != indices.shape or v.shape[:-1] != z.shape[:-1]:
    raise ValueError(
        f"topk_values.shape={v.shape} and topk_indices.shape={indices.shape} "
        f"must both be student_logits.shape[:-1] + (k,) = {z.shape[:-1]} + "
        "(k,).")
  if not jnp.issubdtype(indices.dtype, jnp.integer):
    raise TypeError(f"topk_indices must be integers, got {indices.dtype}.")
  _check_k(v.shape[-1], z.shape[-1])
  losses._check_temperature(temperature)  # pylint: disable=protected-access
  return z, v, indices


def _mask_positions(where, lead, z, v, indices):
  """``(valid, z, v, indices)`` with masked (padding) rows made harmless."""
  where = jnp.asarray(where, bool)
  try:
    valid = jnp.broadcast_to(where, lead)
  except ValueError:
    raise ValueError(
        f"where.shape={where.shape} must broadcast to the positions' shape "
        f"{lead} (a position mask).") from None
  # Padding may hold garbage: make those rows harmless before any math.
  z = jnp.where(valid[..., None], z, 0.0)
  v = jnp.where(valid[..., None], v, 0.0)
  indices = jnp.where(valid[..., None], indices,
                      jnp.arange(v.shape[-1], dtype=indices.dtype))
  return valid, z, v, indices


def topk_distillation_loss(student_logits: ArrayLike,
                           topk_values: ArrayLike,
                           topk_indices: ArrayLike,
                           temperature: float | ArrayLike,
                           *, tail: str = "renormalize",
                           tail_logit: Optional[ArrayLike] = None,  # pylint: disable=redefined-outer-name
                           where: Optional[ArrayLike] = None) -> Array:
  r"""``T^2 KL`` from cached top-k teacher targets (full student softmax).

  With the teacher's top-k classes :math:`K` (logits :math:`v_K`), the
  student's full tempered softmax :math:`q = \mathrm{softmax}(z / T)` over
  all ``V`` classes and its tail mass :math:`Q = \sum_{i \notin K} q_i`,
  both modes compute a KL over ``k + 1`` outcomes, the ``k`` cached classes
  and one bucket for all the others:

  .. math::
    L = T^2 \Big[ \sum_{j \in K} \hat p_j \log \frac{\hat p_j}{q_j}
        + \hat\varepsilon \log \frac{\hat\varepsilon}{Q} \Big],
    \qquad
    \frac{\partial L}{\partial z_i} = T\,(q_i - \tilde p_i).

  The **student is never renormalised**: :math:`q_j` are full-softmax
  probabilities gathered at :math:`K`, so mass the student puts outside
  :math:`K` is penalised, and at ``k = V`` both modes are
  :func:`kdjax.losses.distillation_loss` (to float32 rounding: only the
  order of the sum over classes differs).

  The two modes, and their error against the full loss :math:`L_V`, are
  derived in the module docstring (*The tail modes' errors*).

  It is computed as ``distillation_loss([z_K, z_tail], [v_K, ṽ], T)`` on
  the ``k + 1`` bucket logits (``z_tail`` the student's :func:`tail_logit`,
  ``ṽ = -inf`` when renormalising), so it inherits that function's
  NaN-safety and precision.

  Args:
    student_logits: ``[..., V]`` student logits ``z`` (``-inf`` allowed).
    topk_values: ``[..., k]`` the teacher's top-k logits (raw, ``T = 1``
      units; ``-inf`` allowed), from :func:`topk_targets`.
    topk_indices: ``[..., k]`` their classes, distinct, in ``[0, V)``.
    temperature: ``T > 0``.
    tail: ``"renormalize"`` or ``"bucket"`` (see above).
    tail_logit: ``[...]`` the teacher's tail logit at ``T``; required for
      ``"bucket"``, and must be absent for ``"renormalize"``.
    where: optional boolean **position** mask broadcastable to ``[...]``
      (not a class mask: apply those as ``-inf`` logits before caching).
      Masked positions (padding) give exactly 0 and zero gradients, even if
      their logits or indices are garbage.

  Returns:
    ``[...]`` per-position losses (``T^2`` included).

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses, topk
    >>> v = jnp.array([[2.0, 0.0, 1.0]]); z = jnp.array([[1.0, 1.0, 0.0]])
    >>> values, indices = topk.topk_targets(v, 3)
    >>> topk.topk_distillation_loss(z, values, indices, 2.0).round(4)
    Array([0.3657], dtype=float32)
    >>> losses.distillation_loss(z, v, 2.0).round(4)  # k = V: the same
    Array([0.3657], dtype=float32)
  """
  z, v, indices = _check_topk_args(student_logits, topk_values, topk_indices,
                                   temperature, tail, tail_logit)
  t = jnp.asarray(temperature, z.dtype)
  lead = z.shape[:-1]
  valid = None
  if where is not None:
    valid, z, v, indices = _mask_positions(where, lead, z, v, indices)
  z_k = jnp.take_along_axis(z, indices, axis=-1)
  z_tail = _tail_logit(z, indices, t)
  if tail == "bucket":
    v_tail = losses._as_float(tail_logit)  # pylint: disable=protected-access
    if v_tail.shape != lead:
      raise ValueError(
          f"tail_logit.shape={v_tail.shape} must be the positions' shape "
          f"{lead}.")
    if valid is not None:
      v_tail = jnp.where(valid, v_tail, 0.0)
  else:
    v_tail = jnp.full(lead, -jnp.inf, v.dtype)
  student_b = jnp.concatenate([z_k, z_tail[..., None]], axis=-1)
  teacher_b = jnp.concatenate([v, v_tail[..., None]], axis=-1)
  if valid is not None:  # Equal rows: exactly 0, zero gradient.
    teacher_b = jnp.where(valid[..., None], teacher_b, student_b)
  loss = losses.distillation_loss(student_b, teacher_b, temperature)
  if valid is not None:
    loss = jnp.where(valid, loss, 0.0)
  return loss
