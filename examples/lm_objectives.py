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

The divergences are kdjax's (:func:`kdjax.losses.reverse_distillation_loss`,
:func:`kdjax.losses.generalized_jsd_loss`,
:func:`kdjax.topk.topk_distillation_loss`, merged from the ``divergences``
branch). kdjax's registered ``"reverse_kl"``, ``"jsd"`` and ``"topk"``
objectives are the pure divergences (they ignore ``alpha``); the rows here
also mix in the hard labels, with ``alpha`` chosen on validation, which is
what top-k targets need (without labels the student learns nothing about
the characters outside the teacher's top k). The field names
``topk_values`` / ``topk_indices`` are kdjax's.
"""

from __future__ import annotations

from kdjax import losses
from kdjax import topk as _topk

IMPLEMENTATION = "kdjax.losses / kdjax.topk (library)"

__all__ = ["IMPLEMENTATION", "reverse_kl", "jsd", "topk_loss",
           "topk_targets", "objective", "TOPK_FIELDS"]

TOPK_FIELDS = ("topk_values", "topk_indices")


def reverse_kl(s, t, temperature):
  """``T^2 KL(q || p)``, per position."""
  return losses.reverse_distillation_loss(s, t, temperature)


def jsd(s, t, temperature, beta: float = 0.5):
  """``T^2 JSD_beta(p, q) / (beta (1 - beta))`` (``beta`` weights p)."""
  return losses.generalized_jsd_loss(s, t, temperature, beta=beta)


def topk_targets(teacher_logits, k: int):
  """``(values, indices)``: the teacher's ``k`` largest logits per position."""
  return _topk.topk_targets(teacher_logits, k)


def topk_loss(s, values, indices, temperature):
  """``T^2 KL(p_K || q)`` with ``p`` renormalised over the top k classes."""
  return _topk.topk_distillation_loss(s, values, indices, temperature)


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
