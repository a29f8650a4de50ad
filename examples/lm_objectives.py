r"""The divergences of the language-model example, as kdjax objectives.

Each is an objective ``(student_logits, teacher_logits, batch, *,
temperature, alpha) -> per-position loss`` (:mod:`kdjax.objectives`),
passed to :func:`kdjax.fit` as a function: a user's own objective plugging
into the train step. With ``p = softmax(v/T)`` the teacher and
``q = softmax(z/T)`` the student:

=================  =========================================================
``forward_kl``     ``T^2 KL(p || q)`` (kdjax's ``"soft"``)
``reverse_kl``     ``T^2 KL(q || p)``
``jsd``            ``T^2 JSD_beta(p, q) / (beta (1 - beta))``, ``beta = 0.5``
                   (the mixture ``m = beta p + (1 - beta) q`` taken in
                   probability space; endpoints are the two KLs)
``topk(k)``        ``T^2 KL`` from the teacher's top ``k`` logits only,
                   renormalised over them, the student's full softmax
                   (read from cached ``topk_values`` / ``topk_indices``
                   fields: the teacher never runs in training)
=================  =========================================================

``alpha`` mixes in the hard-label cross entropy:
``alpha CE(y, softmax(z)) + (1 - alpha) * divergence`` (``alpha = 0``: the
divergence alone).

Where they come from: the branch ``divergences`` adds
``kdjax.losses.reverse_distillation_loss``, ``generalized_jsd_loss`` and
``kdjax.topk.topk_distillation_loss``. When this kdjax has them they are
used; until then the same formulas are computed here from
:func:`kdjax.losses.tempered_log_softmax` (``IMPLEMENTATION`` says which).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax import losses

try:  # The library's versions, once `divergences` is merged.
  from kdjax.losses import generalized_jsd_loss as _lib_jsd
  from kdjax.losses import reverse_distillation_loss as _lib_reverse
  from kdjax.topk import topk_distillation_loss as _lib_topk
  IMPLEMENTATION = "kdjax.losses / kdjax.topk (library)"
except ImportError:
  _lib_jsd = _lib_reverse = _lib_topk = None
  IMPLEMENTATION = ("examples/lm_objectives.py (local, from "
                    "kdjax.losses.tempered_log_softmax)")

__all__ = ["IMPLEMENTATION", "reverse_kl", "jsd", "topk_loss",
           "topk_targets", "objective", "TOPK_FIELDS"]

TOPK_FIELDS = ("topk_values", "topk_indices")


def reverse_kl(s, t, temperature):
  """``T^2 KL(q || p)``, per position."""
  if _lib_reverse is not None:
    return _lib_reverse(s, t, temperature)
  log_q = losses.tempered_log_softmax(s, temperature)
  log_p = losses.tempered_log_softmax(t, temperature)
  q = jnp.exp(log_q)
  return temperature ** 2 * jnp.sum(q * (log_q - log_p), axis=-1)


def jsd(s, t, temperature, beta: float = 0.5):
  """``T^2 JSD_beta(p, q) / (beta (1 - beta))`` (``beta`` weights p)."""
  if _lib_jsd is not None:
    return _lib_jsd(s, t, temperature, beta=beta)
  log_q = losses.tempered_log_softmax(s, temperature)
  log_p = losses.tempered_log_softmax(t, temperature)
  # log m = logsumexp(log beta + log p, log(1 - beta) + log q): stable and
  # in probability space (the mixture of the probabilities, not of logs).
  log_m = jnp.logaddexp(jnp.log(beta) + log_p, jnp.log1p(-beta) + log_q)
  kl_pm = jnp.sum(jnp.exp(log_p) * (log_p - log_m), axis=-1)
  kl_qm = jnp.sum(jnp.exp(log_q) * (log_q - log_m), axis=-1)
  return temperature ** 2 * (kl_pm / (1 - beta) + kl_qm / beta)


def topk_targets(teacher_logits, k: int):
  """``(values, indices)``: the teacher's ``k`` largest logits per position."""
  values, indices = jax.lax.top_k(jnp.asarray(teacher_logits, jnp.float32),
                                  k)
  return values, indices.astype(jnp.int32)


def topk_loss(s, values, indices, temperature):
  """``T^2 KL(p_K || q)`` with ``p`` renormalised over the top k classes."""
  if _lib_topk is not None:
    return _lib_topk(s, values, indices, temperature)
  log_q = losses.tempered_log_softmax(s, temperature)
  log_q_k = jnp.take_along_axis(log_q, indices, axis=-1)
  log_p_k = jax.nn.log_softmax(values / temperature, axis=-1)
  return temperature ** 2 * jnp.sum(jnp.exp(log_p_k) * (log_p_k - log_q_k),
                                    axis=-1)


def _mix(divergence, s, batch, alpha):
  if "label" not in batch:
    return divergence, {"soft_loss": divergence}
  hard = losses.hard_label_loss(s, batch["label"])
  return (alpha * hard + (1 - alpha) * divergence,
          {"soft_loss": divergence, "hard_loss": hard})


def _forward_kl_objective(s, t, batch, *, temperature, alpha):
  return _mix(losses.distillation_loss(s, t, temperature), s, batch, alpha)


def _reverse_kl_objective(s, t, batch, *, temperature, alpha):
  return _mix(reverse_kl(s, t, temperature), s, batch, alpha)


def _jsd_objective(s, t, batch, *, temperature, alpha):
  return _mix(jsd(s, t, temperature), s, batch, alpha)


def _logit_objective(s, t, batch, *, temperature, alpha):
  del temperature
  return _mix(losses.logit_matching_loss(s, t), s, batch, alpha)


def _topk_objective(s, t, batch, *, temperature, alpha):
  del t  # The teacher does not run: its top-k targets are in the batch.
  values, indices = (batch[name] for name in TOPK_FIELDS)
  return _mix(topk_loss(s, values, indices, temperature), s, batch, alpha)


def objective(name: str):
  """The objective for a row name (``"topk"`` reads cached top-k fields).

  Returns:
    a function, or a :class:`kdjax.objectives.Objective` saying it needs no
    teacher (``"topk"``).
  """
  from kdjax import objectives  # pylint: disable=import-outside-toplevel
  table = {"forward_kl": _forward_kl_objective,
           "reverse_kl": _reverse_kl_objective,
           "jsd": _jsd_objective,
           "logit_matching": _logit_objective}
  if name in table:
    return objectives.Objective(table[name], name, needs_teacher=True,
                                needs_labels=True)
  if name == "topk":
    return objectives.Objective(_topk_objective, "topk", needs_teacher=False,
                                needs_labels=True)
  raise ValueError(f"unknown objective {name!r}; one of {sorted(table)} or "
                   "'topk'.")
