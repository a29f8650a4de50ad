r"""The divergences of the language-model example, as kdjax objectives.

Each row's objective is one of kdjax's registered divergences with the
hard labels mixed in by :func:`kdjax.objectives.with_hard_labels`:
``alpha CE(y, softmax(z)) + (1 - alpha) * divergence`` (``alpha = 0``: the
divergence alone). Each reads ``temperature`` and ``alpha`` from the state
(:mod:`kdjax.objectives`). With ``p = softmax(v/T)`` the teacher and
``q = softmax(z/T)`` the student:

=================  =========================================================
``forward_kl``     ``T^2 KL(p || q)`` (kdjax's ``"soft"``)
``reverse_kl``     ``T^2 KL(q || p)`` (``"reverse_kl"``)
``jsd``            ``T^2 JSD_beta(p, q) / (beta (1 - beta))``, ``beta = 0.5``
                   (``objectives.jsd(0.5)``; the mixture
                   ``m = beta p + (1 - beta) q`` taken in probability
                   space; endpoints are the two KLs)
``logit_matching`` eq. 4's squared logit difference (``"logit_matching"``)
``topk``           ``T^2 KL`` from the teacher's top ``k`` logits only,
                   renormalised over them, the student's full softmax
                   (``"topk"``, read from cached ``topk_values`` /
                   ``topk_indices`` fields: the teacher never runs in
                   training)
=================  =========================================================

The rows mix in the hard labels, with ``alpha`` chosen on validation,
which is what top-k targets need (without labels the student learns
nothing about the characters outside the teacher's top k). The per-position
functions below (:func:`reverse_kl`, :func:`jsd`, :func:`topk_loss`) are
kdjax's losses, kept for the example's tests.
"""

from __future__ import annotations

from kdjax import losses
from kdjax.losses import topk as _topk

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


# The rows' divergences, each a kdjax objective (the hard labels mixed in).
_DIVERGENCES = {"forward_kl": "soft", "reverse_kl": "reverse_kl",
                "logit_matching": "logit_matching", "topk": "topk"}


def objective(name: str):
  """The :class:`kdjax.objectives.Objective` of a row.

  ``"topk"`` reads the cached top-k fields (no teacher runs).
  """
  from kdjax import objectives  # pylint: disable=import-outside-toplevel
  if name == "jsd":
    return objectives.with_hard_labels(objectives.jsd(0.5))
  if name in _DIVERGENCES:
    return objectives.with_hard_labels(_DIVERGENCES[name])
  raise ValueError(f"unknown objective {name!r}; one of "
                   f"{sorted([*_DIVERGENCES, 'jsd'])}.")
