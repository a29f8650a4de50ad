"""Divergences and the KD objective as pure JAX functions.

Every function here follows optax's conventions:

* it takes arrays of logits with arbitrary leading axes ``[..., C]`` and
  returns **per-example** values of shape ``[...]``; the caller reduces;
* it is pure and safe under ``jax.jit``, ``jax.vmap`` and ``jax.grad``;
* it computes in (at least) float32 whatever the input dtype, so bf16 logits
  never go through a bf16 softmax;
* an optional ``where=`` boolean class mask of shape broadcastable to the
  logits leaves masked classes out of *both* distributions (as if their
  logits were ``-inf``), without producing NaN values or NaN gradients, as
  long as every row keeps at least one class (a row with every class masked
  has no distribution, and its loss is NaN) and a hard label names an
  unmasked class (a masked one has probability 0: infinite loss).

Conventions (Hinton, Vinyals & Dean, 2015, "Distilling the Knowledge in a
Neural Network", arXiv:1503.02531):

* ``temperature`` is :math:`T`; soft targets are
  :math:`q_i = \\exp(z_i/T) / \\sum_j \\exp(z_j/T)`.
* ``alpha`` weights the **hard labels**:
  ``kd_objective = alpha * CE(labels, softmax(z_s)) +
  (1 - alpha) * T^2 * KL(softmax(z_t/T) || softmax(z_s/T))``.
  The paper uses a small ``alpha``.
* The KL divergence is a **sum** over classes (then the caller takes a mean
  over examples), never a mean over classes.
* The :math:`T^2` factor lives inside :func:`distillation_loss`, so it is
  applied on every code path, including ``alpha = 0``. The other
  divergences (:func:`reverse_distillation_loss`,
  :func:`generalized_jsd_loss`) carry it too.
"""

from __future__ import annotations

import numbers
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax import precision, validate

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

__all__ = [
    "tempered_softmax",
    "tempered_log_softmax",
    "soft_target_cross_entropy",
    "distillation_loss",
    "reverse_distillation_loss",
    "generalized_jsd_loss",
    "logit_matching_loss",
    "hard_label_loss",
    "kd_objective",
]


# ----------------------------------------------------------------------------
# Input checks (cheap, trace-time only).
# ----------------------------------------------------------------------------


# The temperature and alpha checks have one home, kdjax.validate.
_check_temperature = validate.check_temperature
_check_alpha = validate.check_alpha
_concrete = validate.concrete


def _check_same_shape(student_logits, teacher_logits) -> None:
  s, t = jnp.shape(student_logits), jnp.shape(teacher_logits)
  if s != t:
    raise ValueError(
        f"student_logits and teacher_logits must have the same shape, got "
        f"student_logits.shape={s} and teacher_logits.shape={t}.")
  if len(s) == 0:
    raise ValueError("logits must have at least one axis (the class axis), "
                     "got a scalar.")


_as_float = precision.at_least_float32


def _apply_where(logits: Array, where: Optional[ArrayLike]) -> Array:
  if where is None:
    return logits
  where = jnp.asarray(where, dtype=bool)
  try:
    jnp.broadcast_shapes(where.shape, logits.shape)
  except ValueError:
    raise ValueError(
        f"where.shape={where.shape} does not broadcast against logits.shape="
        f"{logits.shape}.") from None
  return jnp.where(where, logits, -jnp.inf)


def _scaled(logits: ArrayLike, temperature, where) -> Array:
  _check_temperature(temperature)
  logits = _apply_where(_as_float(logits), where)
  t = jnp.asarray(temperature, dtype=logits.dtype)
  return logits / t


# ----------------------------------------------------------------------------
# Tempered softmax.
# ----------------------------------------------------------------------------


def tempered_log_softmax(logits: ArrayLike,
                         temperature: float | ArrayLike = 1.0,
                         *, where: Optional[ArrayLike] = None) -> Array:
  r"""Log-probabilities of the softmax at temperature ``T``.

  .. math::
    \log q_i = z_i / T - \log \sum_j \exp(z_j / T)

  Args:
    logits: ``[..., C]`` logits ``z``; any float dtype (computed in >= f32).
    temperature: ``T > 0``; a Python number is checked eagerly, an array may
      be traced (e.g. vmapped over in a temperature sweep).
    where: optional boolean mask of classes to keep; masked classes get
      ``log q = -inf``.

  Returns:
    ``[..., C]`` log-probabilities.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> losses.tempered_log_softmax(jnp.array([0.0, 0.0]), 5.0)
    Array([-0.6931472, -0.6931472], dtype=float32)
  """
  return jax.nn.log_softmax(_scaled(logits, temperature, where), axis=-1)


def tempered_softmax(logits: ArrayLike, temperature: float | ArrayLike = 1.0,
                     *, where: Optional[ArrayLike] = None) -> Array:
  r"""The paper's soft targets: softmax of ``logits / T``.

  .. math::
    q_i = \frac{\exp(z_i / T)}{\sum_j \exp(z_j / T)}

  Higher ``T`` gives a softer distribution over classes; ``T = 1`` is the
  ordinary softmax.

  Args:
    logits: ``[..., C]`` logits.
    temperature: ``T > 0``.
    where: optional boolean class mask; masked classes get probability 0.

  Returns:
    ``[..., C]`` probabilities summing to one over the last axis.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> q = losses.tempered_softmax(jnp.array([2.0, 0.0]), 2.0)
    >>> [round(float(x), 4) for x in q]
    [0.7311, 0.2689]
  """
  return jax.nn.softmax(_scaled(logits, temperature, where), axis=-1)


def _safe_log_targets(teacher_logits, temperature, where):
  """Teacher log-probs and probs, with ``log q`` zeroed where ``q == 0``.

  The double ``where`` keeps both the value and the gradient free of
  ``0 * (-inf)`` NaNs when a teacher class is masked (logit ``-inf``).
  """
  log_q = tempered_log_softmax(teacher_logits, temperature, where=where)
  q = jnp.exp(log_q)
  support = q > 0
  safe_log_q = jnp.where(support, log_q, 0.0)
  return q, safe_log_q, support


def _safe_cross_term(q, support, log_p):
  """``sum_i q_i log p_i`` over the support of ``q`` (NaN-free)."""
  safe_log_p = jnp.where(support, log_p, 0.0)
  return jnp.sum(jnp.where(support, q * safe_log_p, 0.0), axis=-1)


# ----------------------------------------------------------------------------
# Soft-target losses.
# ----------------------------------------------------------------------------


def soft_target_cross_entropy(student_logits: ArrayLike,
                              teacher_logits: ArrayLike,
                              temperature: float | ArrayLike,
                              *, where: Optional[ArrayLike] = None) -> Array:
  r"""Cross-entropy of the student's tempered softmax against the soft targets.

  With soft targets :math:`p = \mathrm{softmax}(v / T)` from the teacher's
  logits :math:`v`, and :math:`q = \mathrm{softmax}(z / T)` from the student's
  logits :math:`z`:

  .. math::
    C = -\sum_i p_i \log q_i, \qquad
    \frac{\partial C}{\partial z_i} = \frac{1}{T}(q_i - p_i)
    \quad \text{(paper, eq. 2)}.

  There is **no** :math:`T^2` factor here; see :func:`distillation_loss`.

  Args:
    student_logits: ``[..., C]`` student logits ``z``.
    teacher_logits: ``[..., C]`` teacher logits ``v`` (same shape).
    temperature: ``T > 0``.
    where: optional boolean class mask, applied to both distributions.

  Returns:
    ``[...]`` per-example cross-entropies.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> z = jnp.array([[1.0, 2.0, 3.0]])
    >>> float(losses.soft_target_cross_entropy(z, z, 1.0)[0])  # the entropy
    0.8323...
  """
  _check_same_shape(student_logits, teacher_logits)
  p, _, support = _safe_log_targets(teacher_logits, temperature, where)
  log_q = tempered_log_softmax(student_logits, temperature, where=where)
  return -_safe_cross_term(p, support, log_q)


# A finite stand-in for ``-inf`` logits (masked classes): they then contribute
# ``0 * finite = 0`` (not ``0 * inf = NaN``) to values and gradients.
_NEG_LARGE = -1e30
# From this temperature on, distillation_loss computes its *value* without
# the cancellation of the plain formula, whose absolute float32 error is
# ~eps * log(C) * T^2 (~1e-4 at T = 8, ~1e-2 at T = 100, ~1 at T = 1000).
_ACCURATE_FROM_T = 8.0


@jax.custom_jvp
def _clamp_masked(x: Array) -> Array:
  """``max(x, _NEG_LARGE)`` with a straight-through (identity) derivative.

  The clamp only touches ``-inf`` logits, whose cotangent in the KL is zero
  anyway; the identity derivative keeps a select out of the backward pass.
  """
  return jnp.maximum(x, _NEG_LARGE)


@_clamp_masked.defjvp
def _clamp_masked_jvp(primals, tangents):
  return _clamp_masked(primals[0]), tangents[0]


def _clamped_logits(student_logits, teacher_logits, temperature, where):
  """Float32+ logits with masked classes (``where`` or ``-inf``) at -1e30."""
  _check_temperature(temperature)
  v = _clamp_masked(_apply_where(_as_float(teacher_logits), where))
  z = _clamp_masked(_apply_where(_as_float(student_logits), where))
  return z, v, jnp.asarray(temperature, dtype=v.dtype)


def _kl_divergence(z, v, t):
  """``KL(softmax(v/t) || softmax(z/t))`` summed over the last axis.

  ``sum_i p_i ((h_i - g_i) - log(s_v / s_z))`` with the max-centred tempered
  logits ``h = (v - max v) / t``, ``g = (z - max z) / t`` and the softmax
  denominators ``s_v``, ``s_z``. With the logits clamped at ``_NEG_LARGE``, a
  masked class has ``p_i = 0`` times a *finite* log-ratio, so the value and
  its autodiff gradient (``t (q - p)`` per unit of ``t^2``) are NaN-free
  without any ``where``/select on ``[..., C]`` arrays: XLA fuses the loss
  into one kernel, as for optax's (unguarded)
  ``kl_divergence_with_log_targets``.
  """
  v_max = jax.lax.stop_gradient(jnp.max(v, axis=-1, keepdims=True))
  z_max = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
  h = (v - v_max) / t
  g = (z - z_max) / t
  log_s_v = jnp.log(jnp.sum(jnp.exp(h), axis=-1, keepdims=True))
  log_s_z = jnp.log(jnp.sum(jnp.exp(g), axis=-1, keepdims=True))
  p = jnp.exp(h - log_s_v)
  return jnp.sum(p * ((h - g) - (log_s_v - log_s_z)), axis=-1)


def _accurate_kl_divergence(z, v, t, kl):
  """The value of :func:`_kl_divergence` without its cancellation error.

  ``kl = sum_i p_i d_i - log(s_v / s_z)`` subtracts two ``O(|d|)`` numbers
  to get an ``O(|d|^2)`` one when teacher and student are close (large T),
  so its absolute error ``~eps log C`` can be 100% of the KL. Here ``d_i``
  comes from the *raw* logit differences (exact when close) and
  ``log(s_v / s_z) = log1p(sum_i e_i expm1(d_i) / s_z)`` (``e_i = exp(g_i)``)
  is summed without cancellation (for ``d_i > 1`` the plain difference of the
  exponentials is accurate and cannot overflow): relative error ``~eps/|d|``.
  Rows with ``kl >= 1``, where the plain formula is already accurate, keep
  ``kl``. For values only (no gradient is taken through this).
  """
  v_max = jnp.max(v, axis=-1, keepdims=True)
  z_max = jnp.max(z, axis=-1, keepdims=True)
  e_v = jnp.exp((v - v_max) / t)
  e_z = jnp.exp((z - z_max) / t)
  d = jnp.maximum(((v - z) - (v_max - z_max)) / t, _NEG_LARGE)
  diff = jnp.where(d > 1.0, e_v - e_z, e_z * jnp.expm1(jnp.minimum(d, 1.0)))
  s_z = jnp.sum(e_z, axis=-1)
  log_ratio = jnp.log1p(jnp.sum(diff, axis=-1) / s_z)
  m = jnp.sum(e_v * d, axis=-1) / jnp.sum(e_v, axis=-1)
  return jnp.where(kl < 1.0, m - log_ratio, kl)


def distillation_loss(student_logits: ArrayLike,
                      teacher_logits: ArrayLike,
                      temperature: float | ArrayLike,
                      *, where: Optional[ArrayLike] = None) -> Array:
  r"""The paper's soft-target loss: :math:`T^2 \, \mathrm{KL}(p \,\|\, q)`.

  With :math:`p = \mathrm{softmax}(v/T)` (teacher) and
  :math:`q = \mathrm{softmax}(z/T)` (student):

  .. math::
    L = T^2 \sum_i p_i \left(\log p_i - \log q_i\right), \qquad
    \frac{\partial L}{\partial z_i} = T\,(q_i - p_i).

  The KL equals the soft cross-entropy minus the (constant) teacher entropy,
  so it has the same gradient, scaled by :math:`T^2`. The factor keeps the
  gradient's magnitude roughly independent of ``T``: as :math:`T \to \infty`,
  :math:`T (q_i - p_i) \to ((z_i - \bar z) - (v_i - \bar v)) / N`, the
  gradient of :func:`logit_matching_loss` (paper, eq. 4).

  The loss is zero iff the two tempered distributions agree, and never
  negative. The teacher's probabilities are the *first* argument of the KL
  (the target); the student's log-probabilities are the second.

  Precision: the gradient is always the autodiff gradient of the KL, i.e.
  ``T (q - p)`` to float32 rounding. The float32 *value* of ``T^2 KL``
  computed the plain way has an absolute error of ``~eps log(C) T^2``
  (100% of the value at ``T = 1000``); from ``T = 8`` on it is computed
  without that cancellation (relative error ``~eps T / |z - v|``).

  Args:
    student_logits: ``[..., C]`` student logits ``z``.
    teacher_logits: ``[..., C]`` teacher logits ``v``. Entries of ``-inf``
      (masked classes) are allowed and give finite values and gradients,
      also where the student is ``-inf`` too. (A student ``-inf`` where the
      teacher has mass means an infinite KL: the value is then ``>= 1e30``.)
    temperature: ``T > 0``.
    where: optional boolean class mask, applied to both distributions.

  Returns:
    ``[...]`` per-example losses (KL summed over classes, times ``T^2``).

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> z = jnp.array([[1.0, 2.0, 3.0]])
    >>> losses.distillation_loss(z, z + 7.0, 4.0)  # shift-invariant: zero
    Array([0.], dtype=float32)
  """
  _check_same_shape(student_logits, teacher_logits)
  z, v, t = _clamped_logits(student_logits, teacher_logits, temperature, where)
  kl = _kl_divergence(z, v, t)
  # At high T, replace the value (not the gradient, which stays the exact
  # autodiff gradient of ``kl``) by the cancellation-free one. Static for a
  # Python temperature (no cost at low T). A traced one (e.g. a TrainState's)
  # selects elementwise instead of branching: a ``lax.cond`` here would be a
  # conditional in every train step, which breaks fusion on XLA:CPU and
  # needs the predicate on the host on GPU; the select costs a few
  # elementwise passes that fuse into the loss.
  sg = jax.lax.stop_gradient
  if isinstance(temperature, numbers.Real):
    if temperature >= _ACCURATE_FROM_T:
      kl = kl + sg(_accurate_kl_divergence(z, v, t, kl) - kl)
  else:
    zs, vs, ts, kls = sg((z, v, t, kl))
    kl = kl + jnp.where(jnp.any(ts >= _ACCURATE_FROM_T),
                        _accurate_kl_divergence(zs, vs, ts, kls) - kls, 0.0)
  # KL >= 0 mathematically; clip the tiny negative rounding error of the
  # value only: ``jnp.maximum(kl, 0)`` would also zero those rows' gradient.
  kl = kl + sg(jnp.maximum(-kl, 0.0))
  return jnp.square(t) * kl


def reverse_distillation_loss(student_logits: ArrayLike,
                              teacher_logits: ArrayLike,
                              temperature: float | ArrayLike,
                              *, where: Optional[ArrayLike] = None) -> Array:
  r"""Reverse KL: :math:`T^2 \, \mathrm{KL}(q \,\|\, p)`, student first.

  With :math:`q = \mathrm{softmax}(z/T)` (student) and
  :math:`p = \mathrm{softmax}(v/T)` (teacher):

  .. math::
    L = T^2 \sum_i q_i \left(\log q_i - \log p_i\right), \qquad
    \frac{\partial L}{\partial z_i} =
      T\, q_i \left(\log \frac{q_i}{p_i} - \mathrm{KL}(q \,\|\, p)\right),
    \qquad
    \frac{\partial L}{\partial v_i} = T\,(p_i - q_i).

  Mode-seeking: the student is penalised for mass where the teacher has
  little, not for missing some of the teacher's modes (the forward
  :func:`distillation_loss` is mass-covering). It is exactly
  ``distillation_loss(teacher_logits, student_logits, T)`` (the arguments
  swapped), and is computed that way, so it shares its precision: the
  gradient is the autodiff gradient to float32 rounding, and from ``T = 8``
  on the value is computed without cancellation.

  Args:
    student_logits: ``[..., C]`` student logits ``z``.
    teacher_logits: ``[..., C]`` teacher logits ``v`` (same shape). A class
      that is ``-inf`` in both (or masked by ``where``) is absent: it
      contributes 0 and gets a zero, finite gradient. A teacher ``-inf``
      where the *student* has mass means an infinite reverse KL: the value
      is then a huge finite number (about ``T * q_i * 1e30`` for each such
      class, ``-inf`` being replaced by ``-1e30``), never ``inf`` or NaN,
      and the gradients are finite.
    temperature: ``T > 0``.
    where: optional boolean class mask, applied to both distributions.

  Returns:
    ``[...]`` per-example losses (reverse KL summed over classes, times
    ``T^2``).

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> z = jnp.array([[0.0, 0.0]]); v = jnp.array([[0.0, jnp.log(3.0)]])
    >>> # log(4/3) - log(3)/2:
    >>> losses.reverse_distillation_loss(z, v, 1.0).round(4)
    Array([0.1438], dtype=float32)
  """
  return distillation_loss(teacher_logits, student_logits, temperature,
                           where=where)


def _check_beta(beta, normalize: bool) -> None:
  """Rejects a concrete beta outside [0, 1] (or (0, 1) when unnormalised)."""
  if isinstance(beta, bool):
    raise TypeError(f"beta must be a number in [0, 1], got {beta!r}.")
  b = _concrete(beta)
  if b is None:
    return
  if b.dtype.kind not in "iuf":
    raise TypeError(f"beta must be a number in [0, 1], got {beta!r}.")
  if not np.all((b >= 0.0) & (b <= 1.0)):  # also catches NaN
    raise ValueError(
        f"beta must lie in [0, 1], got {beta!r}. beta is the teacher's weight "
        "in the mixture m = beta * p_teacher + (1 - beta) * q_student.")
  if not normalize and not np.all((b > 0.0) & (b < 1.0)):
    raise ValueError(
        f"with normalize=False, beta must lie in the open interval (0, 1), "
        f"got {beta!r}: at beta = 0 or 1 the mixture equals one of the two "
        "distributions and JSD_beta is identically 0 (no gradient at all). "
        "Use normalize=True (the default), whose endpoints are the forward "
        "(beta = 0) and reverse (beta = 1) KL.")


def _log_probs_and_ratio(z, v, t):
  """``log p``, ``log q`` and ``d = log p - log q``, accurate when p ~ q.

  ``p = softmax(v/t)``, ``q = softmax(z/t)`` from clamped logits. ``d`` is
  taken from the raw logit differences and a cancellation-free
  ``log(s_v / s_z)`` (as in :func:`_accurate_kl_divergence`), so its error
  is relative to ``|d|``, not ``~eps log C``; gradients flow through it.
  """
  v_max = jax.lax.stop_gradient(jnp.max(v, axis=-1, keepdims=True))
  z_max = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
  h = (v - v_max) / t
  g = (z - z_max) / t
  e_v, e_z = jnp.exp(h), jnp.exp(g)
  s_v = jnp.sum(e_v, axis=-1, keepdims=True)
  s_z = jnp.sum(e_z, axis=-1, keepdims=True)
  log_p = h - jnp.log(s_v)
  log_q = g - jnp.log(s_z)
  raw = ((v - z) - (v_max - z_max)) / t
  diff = jnp.where(raw > 1.0, e_v - e_z,
                   e_z * jnp.expm1(jnp.minimum(raw, 1.0)))
  log_ratio = jnp.log1p(jnp.sum(diff, axis=-1, keepdims=True) / s_z)
  return log_p, log_q, raw - log_ratio


def _log_mixture_ratio(x, b, log_b, log_1mb):
  """``log((1 - b) + b e^x)`` for ``b`` in [0, 1], finite for finite ``x``.

  It is ``logsumexp([log(1 - b), log b + x])`` (the mixture taken in
  probability space), evaluated as ``log1p(b expm1(x))`` for ``|x| <= 1``,
  where it is ``O(b x)`` and the ``logsumexp`` would cancel. Both branches
  are finite everywhere, so the select keeps gradients NaN-free.
  """
  small = jnp.abs(x) <= 1.0
  near = jnp.log1p(b * jnp.expm1(jnp.clip(x, -1.0, 1.0)))
  far = jnp.logaddexp(log_1mb, log_b + x)
  return jnp.where(small, near, far)


def _mixture_kls(z, v, t, b):
  r"""``(KL(p || m), KL(q || m))`` of :func:`generalized_jsd_loss`.

  The mixture is taken in probability space, never by averaging
  log-probabilities: :math:`\log(m_i/q_i) = \mathrm{logsumexp}(\log(1 -
  \beta), \log\beta + \log p_i - \log q_i)`, evaluated as
  ``log1p(beta * expm1(log p_i - log q_i))`` where that is small (the
  ``logsumexp`` would cancel there), and likewise :math:`\log(m_i/p_i)`.
  The log-ratio :math:`\log p_i - \log q_i` comes from the raw logit
  differences, so there is no ``eps T^2 log C`` error floor: equal inputs
  give exactly 0, the value is accurate at small ``beta``, and its absolute
  error is ``~eps T max|z - v|`` (relative ``~eps T / |z - v|`` for a
  value of order ``|z - v|^2``), as for :func:`distillation_loss` from
  ``T = 8`` on.
  """
  log_p, log_q, d = _log_probs_and_ratio(z, v, t)
  b_k = b[..., None] if b.ndim else b  # Broadcasts against [..., C].
  one_minus_b = 1.0 - b_k
  log_b, log_1mb = jnp.log(b_k), jnp.log1p(-b_k)
  log_m_over_q = _log_mixture_ratio(d, b_k, log_b, log_1mb)
  log_m_over_p = _log_mixture_ratio(-d, one_minus_b, log_1mb, log_b)
  p, q = jnp.exp(log_p), jnp.exp(log_q)
  kl_p_m = -jnp.sum(p * log_m_over_p, axis=-1)
  kl_q_m = -jnp.sum(q * log_m_over_q, axis=-1)
  # Each KL is >= 0; clip the rounding error of the value only.
  sg = jax.lax.stop_gradient
  return (kl_p_m + sg(jnp.maximum(-kl_p_m, 0.0)),
          kl_q_m + sg(jnp.maximum(-kl_q_m, 0.0)))


def generalized_jsd_loss(student_logits: ArrayLike,
                         teacher_logits: ArrayLike,
                         temperature: float | ArrayLike,
                         *, beta: float | ArrayLike = 0.5,
                         normalize: bool = True,
                         where: Optional[ArrayLike] = None) -> Array:
  r"""Generalised Jensen-Shannon divergence, normalised: its endpoints are KLs.

  With the teacher's :math:`p = \mathrm{softmax}(v/T)`, the student's
  :math:`q = \mathrm{softmax}(z/T)` and the mixture (``beta`` weights the
  **teacher**, as in TRL's GKD and Agarwal et al., 2024)

  .. math::
    m = \beta\, p + (1 - \beta)\, q, \qquad
    \mathrm{JSD}_\beta = \beta\, \mathrm{KL}(p \,\|\, m)
      + (1 - \beta)\, \mathrm{KL}(q \,\|\, m),

  this returns, with ``normalize=True`` (the default),

  .. math::
    L = T^2\, \frac{\mathrm{JSD}_\beta}{\beta (1 - \beta)}
      = T^2 \left(\frac{\mathrm{KL}(p\,\|\,m)}{1 - \beta}
      + \frac{\mathrm{KL}(q\,\|\,m)}{\beta}\right), \qquad
    \frac{\partial L}{\partial z_i} = \frac{T}{\beta}\, q_i
      \left(\log \frac{q_i}{m_i} - \mathrm{KL}(q \,\|\, m)\right),

  and :math:`T^2 \mathrm{JSD}_\beta` with ``normalize=False`` (gradient
  :math:`(1 - \beta)\beta` times the above).

  **Endpoints.** :math:`\mathrm{JSD}_\beta \to 0` at both ends (``m``
  becomes one of the two distributions): the bug of implementations whose
  loss "silently collapses to 0" there. Since
  :math:`\mathrm{KL}(q\|m) = O(\beta^2)` and
  :math:`\mathrm{KL}(p\|m) \to \mathrm{KL}(p\|q)` as :math:`\beta \to 0`
  (and symmetrically at 1), the normalised loss is continuous on
  :math:`[0, 1]`, in value and gradient, with

  * ``beta -> 0``: :math:`L \to T^2 \mathrm{KL}(p \| q)`, the forward KL
    (:func:`distillation_loss`), gradient :math:`T (q_i - p_i)`; the error
    is :math:`O(\beta)`;
  * ``beta -> 1``: :math:`L \to T^2 \mathrm{KL}(q \| p)`, the reverse KL
    (:func:`reverse_distillation_loss`); the error is :math:`O(1 - \beta)`;

  and ``beta = 0`` or ``1`` (Python or traced) give those limits exactly
  (to rounding), never 0. Near convergence every ``beta`` has the same
  curvature as the KL (:math:`L \approx \tfrac{T^2}{2}\chi^2(p, q)`), so
  learning rates carry over between values of ``beta``. ``beta = 0.5`` is
  **4 times** the usual symmetric JSD (symmetric in the two arguments). With
  ``normalize=False`` (TRL's values inside ``(0, 1)``) a concrete ``beta``
  of 0 or 1 raises ``ValueError``; a traced one cannot be checked.

  Numerics (details in ``_mixture_kls``): the mixture is taken in
  probability space from the raw logit differences, with no ``eps T^2 log
  C`` error floor: equal inputs give exactly 0, the value is accurate at
  small ``beta``, its absolute error is ``~eps T max|z - v|``. Always
  finite for finite ``beta`` in ``[0, 1]`` (:math:`\mathrm{KL}(p\|m)
  \le \log(1/\beta)`), except at the endpoints where the KL itself is
  infinite (then a huge finite value, as for the two KLs). ``beta`` is a
  hyperparameter: no gradient w.r.t. it is promised.

  Args:
    student_logits: ``[..., C]`` student logits ``z``.
    teacher_logits: ``[..., C]`` teacher logits ``v`` (same shape). ``-inf``
      entries (masked classes, in one or both) give finite values and
      gradients; a class ``-inf`` in both is absent.
    temperature: ``T > 0``.
    beta: the teacher's weight in the mixture, in ``[0, 1]`` (``(0, 1)``
      with ``normalize=False``); a scalar, or an array broadcastable to
      ``[...]`` (per-example) may be traced.
    normalize: divide by :math:`\beta(1 - \beta)` (see above).
    where: optional boolean class mask, applied to both distributions.

  Returns:
    ``[...]`` per-example losses (``T^2`` included).

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> z = jnp.array([[0.0, 0.0]]); v = jnp.array([[0.0, jnp.log(3.0)]])
    >>> losses.generalized_jsd_loss(z, v, 1.0, beta=0.5).round(4)  # 4 x JSD
    Array([0.1353], dtype=float32)
    >>> losses.generalized_jsd_loss(z, v, 1.0, beta=0.0).round(4)  # forward KL
    Array([0.1308], dtype=float32)

  References:
    Agarwal et al., 2024, "On-Policy Distillation of Language Models:
    Learning from Self-Generated Mistakes" (GKD), arXiv:2306.13649, eq. 3
    (their :math:`\beta` is our ``beta``; they do not normalise).
  """
  _check_same_shape(student_logits, teacher_logits)
  _check_beta(beta, normalize)
  z, v, t = _clamped_logits(student_logits, teacher_logits, temperature, where)
  b = jnp.asarray(beta, dtype=v.dtype)
  kl_p_m, kl_q_m = _mixture_kls(z, v, t, b)
  return jnp.square(t) * _jsd(kl_p_m, kl_q_m, b, normalize)


def _jsd(kl_p_m, kl_q_m, b, normalize: bool):
  """``JSD_beta``, divided by ``beta (1 - beta)`` if ``normalize``."""
  if not normalize:
    return b * kl_p_m + (1.0 - b) * kl_q_m
  # KL(q||m) / beta -> 0 as beta -> 0 (it is O(beta^2)), and likewise at
  # 1: selects (with safe divisors) instead of 0/0 at the endpoints.
  safe_b = jnp.where(b > 0.0, b, 1.0)
  safe_1mb = jnp.where(b < 1.0, 1.0 - b, 1.0)
  return (jnp.where(b < 1.0, kl_p_m / safe_1mb, 0.0) +
          jnp.where(b > 0.0, kl_q_m / safe_b, 0.0))


def logit_matching_loss(student_logits: ArrayLike, teacher_logits: ArrayLike,
                        *, zero_mean: bool = True,
                        where: Optional[ArrayLike] = None) -> Array:
  r"""Squared-error logit matching (Caruana et al.), scaled as in eq. 4.

  .. math::
    L = \frac{1}{2N} \sum_i \left((z_i - \bar z) - (v_i - \bar v)\right)^2,
    \qquad
    \frac{\partial L}{\partial z_i} =
    \frac{1}{N}\left((z_i - \bar z) - (v_i - \bar v)\right),

  where :math:`N` is the number of classes and the means are subtracted only
  when ``zero_mean`` is set. With ``zero_mean=True`` this gradient is
  *exactly* the :math:`T \to \infty` limit of the gradient of
  :func:`distillation_loss` (paper, eq. 4, which includes the :math:`T^2`
  factor), for any logits.

  With ``zero_mean=False`` this is Caruana's plain squared error
  :math:`\sum_i (z_i - v_i)^2` divided by :math:`2N`: the two have the same
  minimiser and differ by a constant factor in the gradient (i.e. in the
  effective learning rate). The default ``zero_mean=True`` also ignores the
  part of :math:`z - v` that is the same for every class, which no softmax
  can see; it is the form the paper's eq. 4 arrives at.

  Args:
    student_logits: ``[..., C]`` student logits ``z``.
    teacher_logits: ``[..., C]`` teacher logits ``v`` (finite).
    zero_mean: subtract each row's mean (over unmasked classes) first.
    where: optional boolean class mask; masked classes are left out of the
      means and the sum, and ``N`` counts unmasked classes only.

  Returns:
    ``[...]`` per-example losses.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> losses.logit_matching_loss(jnp.array([1.0, 3.0]), jnp.array([0.0, 0.0]))
    Array(0.5, dtype=float32)
  """
  _check_same_shape(student_logits, teacher_logits)
  z = _as_float(student_logits)
  v = _as_float(teacher_logits)
  if where is None:
    mask = jnp.ones(z.shape, dtype=bool)
  else:
    mask = jnp.broadcast_to(jnp.asarray(where, dtype=bool), z.shape)
  n = jnp.sum(mask, axis=-1).astype(z.dtype)
  z = jnp.where(mask, z, 0.0)
  v = jnp.where(mask, v, 0.0)
  d = z - v
  if zero_mean:
    d = d - (jnp.sum(d, axis=-1, keepdims=True) / n[..., None])
  d = jnp.where(mask, d, 0.0)
  return 0.5 * jnp.sum(jnp.square(d), axis=-1) / n


def hard_label_loss(student_logits: ArrayLike, labels: ArrayLike,
                    *, where: Optional[ArrayLike] = None) -> Array:
  r"""Cross-entropy with integer labels at temperature 1 (through optax).

  .. math::
    L = -\log \mathrm{softmax}(z)_y

  Args:
    student_logits: ``[..., C]`` logits.
    labels: ``[...]`` integer class indices in ``[0, C)``.
    where: optional boolean class mask. A label whose class is masked out
      gets an infinite loss (its probability is 0).

  Returns:
    ``[...]`` per-example cross-entropies. A label outside ``[0, C)`` gives
    NaN, never the loss of some other class (optax alone wraps ``-1``
    around to class ``C - 1``): inside a train step, the non-finite guard
    then skips the batch instead of training on a wrong label.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> losses.hard_label_loss(jnp.array([[0.0, 0.0]]), jnp.array([1])).round(4)
    Array([0.6931], dtype=float32)
  """
  logits = _as_float(student_logits)
  labels = jnp.asarray(labels)
  if labels.shape != logits.shape[:-1]:
    raise ValueError(
        f"labels.shape={labels.shape} must equal student_logits.shape[:-1]="
        f"{logits.shape[:-1]} (integer labels, one per example).")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"labels must be integers, got dtype {labels.dtype}.")
  num_classes = logits.shape[-1]
  valid = (labels >= 0) & (labels < num_classes)
  safe = jnp.where(valid, labels, 0)
  if where is None:
    ce = optax.losses.softmax_cross_entropy_with_integer_labels(logits, safe)
  else:
    where = jnp.broadcast_to(jnp.asarray(where, dtype=bool), logits.shape)
    ce = optax.losses.softmax_cross_entropy_with_integer_labels(
        logits, safe, where=where)
  return jnp.where(valid, ce, jnp.nan)


def kd_objective(student_logits: ArrayLike, teacher_logits: ArrayLike,
                 labels: ArrayLike, *, temperature: float | ArrayLike,
                 alpha: float | ArrayLike,
                 where: Optional[ArrayLike] = None) -> Array:
  r"""The paper's full objective: hard labels plus ``T^2``-scaled soft targets.

  .. math::
    L = \alpha \, \mathrm{CE}(y, \mathrm{softmax}(z))
      + (1 - \alpha)\, T^2\, \mathrm{KL}\!\left(\mathrm{softmax}(v/T)
        \,\|\, \mathrm{softmax}(z/T)\right)

  ``alpha`` weights the **hard labels**: ``alpha = 1`` is plain
  cross-entropy (the student trained alone), ``alpha = 0`` is pure
  distillation, which reads no label (an unlabelled transfer set may hold
  any integer there, e.g. ``-1``). The :math:`T^2` factor is part of the
  soft term on every path.

  Args:
    student_logits: ``[..., C]`` student logits ``z``.
    teacher_logits: ``[..., C]`` teacher logits ``v``.
    labels: ``[...]`` integer labels.
    temperature: ``T > 0``.
    alpha: weight of the hard-label term, in ``[0, 1]``.
    where: optional boolean class mask.

  Returns:
    ``[...]`` per-example objective values.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import losses
    >>> z = jnp.array([[0.0, 0.0]]); y = jnp.array([0])
    >>> losses.kd_objective(z, z, y, temperature=20.0, alpha=0.1).round(4)
    Array([0.0693], dtype=float32)
  """
  _check_alpha(alpha)
  _check_same_shape(student_logits, teacher_logits)
  hard = hard_label_loss(student_logits, labels, where=where)
  soft = distillation_loss(student_logits, teacher_logits, temperature,
                           where=where)
  a = jnp.asarray(alpha, dtype=hard.dtype)
  # At alpha = 0 the hard term is 0 even where it is NaN (a label outside
  # [0, C)); a select, not a product, so that 0 * NaN does not leak in.
  return jnp.where(a > 0, a * hard, 0.0) + (1.0 - a) * soft
