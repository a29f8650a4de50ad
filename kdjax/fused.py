r"""The fused chunked loss as an objective of :func:`kdjax.fit`.

A *hidden-state objective* (``Objective.form == "hidden"``) receives the
student's and the teacher's final hidden states and output projections
(:class:`kdjax.heads.Hidden`, from a student and teacher built with
``head=``) instead of logits, and computes the loss with the fused chunked
loss of :mod:`kdjax.chunked`: ``chunk_size`` positions at a time inside one
``lax.scan`` whose custom VJP forms each chunk's gradient as it goes, so the
``[tokens, V]`` logits, softmaxes and cotangents of the logits objective
never exist. Everything else is the train step's own (:mod:`kdjax.step`):
fields, weights, schedules and sweeps of the hyperparameters, the mesh,
checkpoints, the non-finite guard, mixed precision.

The contract. The step calls

``fn(student: Hidden, teacher: Hidden | None, batch, weights, *,
<hyperparameters>) -> (total, terms)``

with the positions flattened: ``student.states`` is ``[N, D]`` (``N`` the
batch's positions, e.g. ``B * L``), the batch's per-position fields
(``"label"``, the cached ``"topk_values"`` ...) are ``[N, ...]`` and
``weights`` is ``[N]`` float32 (the ``fields.weights`` field, or ones).
It returns the **weighted sums** ``total = sum_n w_n l_n`` and ``terms =
{name: sum_n w_n t_n}`` (not per-position values: the chunked loss reduces
inside its scan). The step divides both by the global batch's
``sum_n w_n`` (``psum``-ed under ``pmap``), so the loss is
:math:`\sum_n w_n \ell_n / \sum_n w_n`, exactly what the logits objectives
give. Positions of weight 0 count nothing: the step zeroes their hidden
states (and labels) before the objective, so NaN there cannot leak into
the loss or the gradients (the logits path zeroes their logits the same
way).

Built-ins (registered in :mod:`kdjax.objectives`; each equals the logits
objective named beside it, to float32 rounding, in loss, gradients and
trained params; ``T^2`` on every one):

========================  ==================================================
``"chunked_kd"``          ``"kd"``: ``alpha CE + (1 - alpha) T^2 KL(p || q)``
``"chunked_soft"``        ``"soft"``: ``T^2 KL(p || q)``
``"chunked_reverse_kl"``  ``"reverse_kl"``: ``T^2 KL(q || p)``
``"chunked_jsd"``         ``"jsd"``: ``T^2 JSD_beta / (beta (1 - beta))``,
                          the mixture ``beta p + (1 - beta) q`` in
                          probability space; reads ``beta`` (0.5 when the
                          state has none)
``"chunked_topk"``        ``"topk"``: ``T^2 KL`` from the batch's cached
                          ``"topk_values"`` / ``"topk_indices"``; no teacher
========================  ==================================================

:func:`kdjax.objectives.chunked` makes the others: any divergence with the
hard labels mixed in (``alpha``), another chunk size, the top-k ``tail``.
Missing: the reverse KL and the JSD from cached top-k targets (they need
the teacher's probability of every class the student gives mass to, which
a top-k cache does not hold) and ``"logit_matching"`` (not a softmax
divergence; no large-vocabulary use asks for it). The metrics are those of
the logits objectives: ``soft_loss``, ``hard_loss`` (with labels),
``accuracy`` (with labels) and ``agreement`` (student and teacher top-1;
with top-k targets, the cache's first index), computed inside the same
scan from each chunk's logits at no extra matmul.

Precision: the logits and all loss math are float32 whatever the hidden
states' dtype (a bf16 step's chunk logits are a bf16 matmul accumulated in
float32), so the loss is float32 and at least as accurate as the logits
path's.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from kdjax import validate
from kdjax.losses import chunked
from kdjax import student as student_lib
from kdjax.heads import Hidden

__all__ = ["ChunkedObjective", "make_loss_fn", "metrics", "TOPK_FIELDS"]

TOPK_FIELDS = ("topk_values", "topk_indices")


@dataclasses.dataclass(frozen=True)
class ChunkedObjective:
  """A hidden-state objective's function: the chunked loss's weighted sums.

  Attributes:
    divergence: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"``.
    hard_labels: mix in ``alpha CE(y, softmax(z))`` (reads ``alpha``).
    topk: the teacher is the batch's cached top-k targets.
    chunk_size: positions per chunk (:func:`kdjax.chunked.chunked_sums`).
    tail: the top-k tail mode (``"renormalize"``; ``"bucket"`` reads the
      batch's ``"topk_tail"`` too).
  """
  divergence: str = "forward_kl"
  hard_labels: bool = False
  topk: bool = False
  chunk_size: int = 512
  tail: str = "renormalize"

  def __call__(self, student: Hidden, teacher, batch, weights, *,
               temperature, alpha=0.0, beta=0.5):
    labels = batch.get("label")
    if self.hard_labels and labels is None:
      raise ValueError("a chunked objective with hard labels needs the "
                       "batch's labels (kdjax.Fields(labels=...)).")
    kw = {}
    if self.topk:
      missing = [f for f in TOPK_FIELDS if f not in batch]
      if missing:
        raise ValueError(
            f"a chunked top-k objective reads the batch's cached {missing} "
            "(kdjax.topk.topk_targets); declare them with "
            "kdjax.Fields(extra=('topk_values', 'topk_indices')).")
      kw["topk"] = tuple(batch[f] for f in TOPK_FIELDS) + (
          (batch["topk_tail"],) if self.tail == "bucket" else ())
      kw["tail"] = self.tail
    else:
      kw["teacher"] = (teacher.states, teacher.kernel) + (
          () if teacher.bias is None else (teacher.bias,))
    return chunked.chunked_sums(
        student.states, student.kernel, student.bias,
        temperature=temperature, labels=labels,
        alpha=alpha if self.hard_labels else 0.0, weights=weights,
        chunk_size=self.chunk_size, divergence=self.divergence, beta=beta,
        **kw)


def _require_hidden(out, obj, who: str) -> Hidden:
  if isinstance(out, Hidden):
    return out
  fix = ("kdjax.Student.from_linen(module, variables, head='<output layer>')"
         if who == "student" else
         "kdjax.Teacher.from_linen(module, variables, head='<output layer>')")
  raise ValueError(
      f"objective {obj.name!r} works from hidden states, but the {who} "
      f"returns logits (shape {getattr(out, 'shape', None)}). Build the "
      f"{who} with its output layer named: {fix} (or from_nnx(model, "
      "head=...)); see kdjax.heads.")


def _flatten_batch(batch: dict, lead: tuple, keep) -> dict:
  """The batch's per-position leaves as ``[N, ...]``, labels masked."""
  n = math.prod(lead)
  out = {}
  for name, x in batch.items():
    if hasattr(x, "shape") and tuple(x.shape[:len(lead)]) == lead:
      if name == "label":
        x = jnp.where(keep, x, 0)  # A padding label may be anything.
      x = x.reshape((n,) + tuple(x.shape[len(lead):]))
    out[name] = x
  return out


def make_loss_fn(spec, state, inputs, teacher_out, batch, hp, rng_drop, cast,
                 cast_inputs, axis_name):
  """``params -> (loss, (aux, student, model_state, w, denominator))``.

  The hidden-state counterpart of the logits objectives' loss function in
  :mod:`kdjax.step` (see the module docstring for the contract).
  """
  fields, obj = spec.fields, spec.objective
  objective_batch = dict(batch)
  if fields.labels is not None:
    objective_batch["label"] = batch[fields.labels]
  teacher = (None if teacher_out is None
             else _require_hidden(teacher_out, obj, "teacher"))

  def loss_fn(params):
    out, new_model_state = student_lib.student_forward(
        state.apply_fn, cast(params), state.model_state,
        cast_inputs(list(inputs)), train=True, rng=rng_drop)
    student = _require_hidden(out, obj, "student")
    lead = tuple(student.states.shape[:-1])
    if fields.weights is None:
      w = jnp.ones(lead, jnp.float32)
    else:
      validate.check_weights(batch[fields.weights].shape, student.shape,
                             fields.weights)
      w = batch[fields.weights].astype(jnp.float32)
    keep = w > 0
    n = math.prod(lead)

    def flat(h: Hidden) -> Hidden:
      states = jnp.where(keep[..., None], h.states, 0)
      return h.replace(states=states.reshape(n, states.shape[-1]))

    if teacher is not None and tuple(teacher.states.shape[:-1]) != lead:
      raise ValueError(
          f"the teacher's hidden states have shape {teacher.states.shape}, "
          f"the student's {student.states.shape}: they need the same "
          "positions (the same batch and sequence length).")
    total, terms = obj(flat(student),
                       None if teacher is None else flat(teacher),
                       _flatten_batch(objective_batch, lead, keep),
                       w.reshape(n), **obj.select(hp))
    denominator = jnp.sum(w)
    if axis_name is not None:
      denominator = jax.lax.psum(denominator, axis_name)
    denominator = jax.lax.stop_gradient(
        jnp.where(denominator > 0, denominator, 1.0))
    aux = {k: v / denominator for k, v in terms.items()}
    return total / denominator, (aux, student, new_model_state, w,
                                 denominator)

  return loss_fn


def metrics(loss, aux) -> dict:
  """The step's metrics of a hidden-state objective (loss and its terms)."""
  return {"loss": loss, **aux}
