r"""Training objectives: functions, found by name in one registry.

An objective is a function

``objective(student_logits, teacher_logits, batch, *, temperature, alpha)
-> loss`` or ``-> (loss, aux)``

returning the **per-position** loss, of shape ``student_logits.shape[:-1]``
(one value per example, or per token for sequences), and optionally a dict
``aux`` of per-position values to be logged (weighted like the loss). The
train step reduces it as ``sum(w * loss) / sum(w)`` over the global batch
(:mod:`kdjax.step`). ``batch`` is the step's batch, with the labels under
``"label"`` whatever field :class:`kdjax.fields.Fields` names them;
``teacher_logits`` is None for an objective that needs no teacher.

Built-ins (``alpha`` weights the hard labels, ``T`` is the temperature):

====================  ======================================================
``"kd"``              :func:`kdjax.losses.kd_objective`:
                      ``alpha CE(y, softmax(z)) + (1 - alpha) T^2 KL(p_T||q_T)``
``"soft"``            :func:`kdjax.losses.distillation_loss`: ``T^2 KL``
``"logit_matching"``  :func:`kdjax.losses.logit_matching_loss` (eq. 4)
``"hard"``            :func:`kdjax.losses.hard_label_loss` (no teacher)
``"reverse_kl"``      :func:`kdjax.losses.reverse_distillation_loss`:
                      ``T^2 KL(q_T||p_T)`` (mode-seeking)
``"jsd"``             :func:`kdjax.losses.generalized_jsd_loss`, beta 0.5;
                      :func:`jsd` for another beta
``"topk"``            :func:`kdjax.topk.topk_distillation_loss` from the
                      batch's cached ``"topk_values"``/``"topk_indices"``
                      (declare them: ``Fields(extra=("topk_values",
                      "topk_indices"))``); no teacher is run
====================  ======================================================

The soft objectives (``"soft"``, ``"reverse_kl"``, ``"jsd"``, ``"topk"``,
``"logit_matching"``) ignore ``alpha``; ``"kd"`` mixes in the hard labels.

A new loss plugs in without editing kdjax: pass the function itself as the
step's ``objective``, or :func:`register` it under a name:

>>> import jax.numpy as jnp
>>> from kdjax import losses, objectives
>>> def reverse_ce(s, t, batch, *, temperature, alpha):
...   p = losses.tempered_softmax(s, temperature)
...   return -jnp.sum(p * losses.tempered_log_softmax(t, temperature), -1)
>>> _ = objectives.register("reverse_ce", reverse_ce)
>>> objectives.get("reverse_ce").needs_teacher
True
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Callable, Union

from kdjax import losses

__all__ = ["Objective", "register", "get", "names", "jsd", "REGISTRY"]


@dataclasses.dataclass(frozen=True)
class Objective:
  """An objective function and what it needs from the step.

  Attributes:
    fn: ``(student_logits, teacher_logits, batch, *, temperature, alpha)
      -> loss | (loss, aux)``, per position.
    name: a name for records (``fit.json``) and messages.
    needs_teacher: the step must supply teacher logits (online or cached).
    needs_labels: the batch must carry labels.
  """
  fn: Callable
  name: str
  needs_teacher: bool = True
  needs_labels: bool = False

  def __call__(self, student_logits, teacher_logits, batch, *, temperature,
               alpha):
    out = self.fn(student_logits, teacher_logits, batch,
                  temperature=temperature, alpha=alpha)
    loss, aux = out if isinstance(out, tuple) else (out, {})
    return loss, dict(aux)


def _check_signature(fn: Callable, name: str) -> None:
  """The objective must accept ``(s, t, batch, *, temperature, alpha)``."""
  if not callable(fn):
    raise TypeError(f"objective {name!r} is not callable: got "
                    f"{type(fn).__name__}.")
  try:
    sig = inspect.signature(fn)
  except (TypeError, ValueError):
    return  # A builtin or C function: cannot be inspected, trust it.
  try:
    sig.bind(None, None, None, temperature=1.0, alpha=0.0)
  except TypeError as e:
    raise TypeError(
        f"objective {name!r} has signature {name}{sig}, but an objective is "
        "called as fn(student_logits, teacher_logits, batch, *, "
        f"temperature, alpha) -> per-position loss ({e}).") from None


def _kd(s, t, batch, *, temperature, alpha):
  hard = losses.hard_label_loss(s, batch["label"])
  soft = losses.distillation_loss(s, t, temperature)
  total = losses.kd_objective(s, t, batch["label"], temperature=temperature,
                              alpha=alpha)
  return total, {"hard_loss": hard, "soft_loss": soft}


def _soft(s, t, batch, *, temperature, alpha):
  del alpha
  soft = losses.distillation_loss(s, t, temperature)
  aux = {"soft_loss": soft}
  if "label" in batch:
    aux["hard_loss"] = losses.hard_label_loss(s, batch["label"])
  return soft, aux


def _logit_matching(s, t, batch, *, temperature, alpha):
  del temperature, alpha
  soft = losses.logit_matching_loss(s, t)
  aux = {"soft_loss": soft}
  if "label" in batch:
    aux["hard_loss"] = losses.hard_label_loss(s, batch["label"])
  return soft, aux


def _hard(s, t, batch, *, temperature, alpha):
  del t, temperature, alpha
  hard = losses.hard_label_loss(s, batch["label"])
  return hard, {"hard_loss": hard}


def _with_hard(soft, batch, s):
  aux = {"soft_loss": soft}
  if "label" in batch:
    aux["hard_loss"] = losses.hard_label_loss(s, batch["label"])
  return soft, aux


def _reverse_kl(s, t, batch, *, temperature, alpha):
  del alpha
  return _with_hard(losses.reverse_distillation_loss(s, t, temperature),
                    batch, s)


def jsd(beta: float = 0.5) -> "Objective":
  """The generalised JSD objective at ``beta`` (the teacher's weight)."""
  loss = losses.generalized_jsd_loss  # It checks beta when called.

  def fn(s, t, batch, *, temperature, alpha):
    del alpha
    return _with_hard(loss(s, t, temperature, beta=beta), batch, s)

  return Objective(fn, f"jsd(beta={beta:g})", needs_teacher=True)


def _topk_loss(s, t, batch, *, temperature, alpha):
  from kdjax import topk  # pylint: disable=g-import-not-at-top
  del t, alpha
  if "topk_values" not in batch or "topk_indices" not in batch:
    raise ValueError(
        "objective 'topk' reads the batch's cached 'topk_values' and "
        "'topk_indices' (kdjax.topk.topk_targets); add them and declare "
        "them with kdjax.Fields(extra=('topk_values', 'topk_indices')).")
  soft = topk.topk_distillation_loss(s, batch["topk_values"],
                                     batch["topk_indices"], temperature)
  return _with_hard(soft, batch, s)


REGISTRY: dict[str, Objective] = {}


def register(name: str, fn: Callable, *, needs_teacher: bool = True,
             needs_labels: bool = False, overwrite: bool = False) -> Objective:
  """Registers ``fn`` as the objective ``name`` (see the module docstring).

  Raises:
    TypeError: ``fn`` does not have an objective's signature.
    ValueError: ``name`` is taken (unless ``overwrite``).
  """
  _check_signature(fn, name)
  if name in REGISTRY and not overwrite:
    raise ValueError(f"objective {name!r} is already registered; pass "
                     "overwrite=True to replace it.")
  REGISTRY[name] = Objective(fn, name, needs_teacher=needs_teacher,
                             needs_labels=needs_labels)
  return REGISTRY[name]


register("kd", _kd, needs_teacher=True, needs_labels=True)
register("soft", _soft, needs_teacher=True)
register("logit_matching", _logit_matching, needs_teacher=True)
register("hard", _hard, needs_teacher=False, needs_labels=True)
register("reverse_kl", _reverse_kl, needs_teacher=True)
REGISTRY["jsd"] = dataclasses.replace(jsd(0.5), name="jsd")
register("topk", _topk_loss, needs_teacher=False)


def names() -> tuple[str, ...]:
  return tuple(REGISTRY)


def get(objective: Union[str, Objective, Callable]) -> Objective:
  """The :class:`Objective` for a registered name, an Objective or a function.

  A bare function is taken to need a teacher and no labels; wrap it in
  :class:`Objective` (or :func:`register` it) to say otherwise.

  Raises:
    ValueError: an unknown name (the registered ones are listed).
    TypeError: a function with the wrong signature.
  """
  if isinstance(objective, Objective):
    _check_signature(objective.fn, objective.name)
    return objective
  if isinstance(objective, str):
    if objective not in REGISTRY:
      raise ValueError(f"objective must be one of {names()} or a function, "
                       f"got {objective!r}.")
    return REGISTRY[objective]
  name = getattr(objective, "__qualname__", type(objective).__name__)
  _check_signature(objective, name)
  return Objective(objective, name)
