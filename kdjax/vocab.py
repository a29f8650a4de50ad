r"""Teacher and student vocabularies that differ: the padding rule.

Language models often pad their output layer to a round number of rows:
Qwen's larger models emit ``V_t = 152,064`` logits, its smaller ones
``V_s = 151,936``, over the same tokenizer. The extra ``P = V_t - V_s``
columns are **vocabulary padding**: ids that no token maps to, whose rows
were never a training target. kdjax's losses compare the two models class
by class, so they must agree on what to do with those columns.

**The rule: the padding columns are dropped and the teacher's distribution
is renormalised over the student's vocabulary.** With the teacher's
tempered softmax :math:`p_i = e^{v_i/T} / \sum_{j < V_t} e^{v_j/T}` and its
mass on the padding :math:`\varepsilon = \sum_{j \ge V_s} p_j`
(:func:`padding_mass`), the target is

.. math::
  p'_i = \frac{e^{v_i/T}}{\sum_{j < V_s} e^{v_j/T}}
       = \frac{p_i}{1 - \varepsilon}, \qquad i < V_s,

the teacher's distribution *conditioned on the next token being a real
token*. Dropping the columns before the softmax is exactly this, at every
temperature (it is what :func:`align_vocab` does, a slice). Every loss then
keeps its own form on :math:`V_s` classes; for the forward KL

.. math::
  L = T^2\, \mathrm{KL}(p' \,\|\, q), \qquad
  \frac{\partial L}{\partial z_i} = T\,(q_i - p'_i),

a gradient that sums to 0 over the student's classes, as any softmax
gradient must.

Why not keep the padding's mass as a tail (a bucket, as
:mod:`kdjax.losses.topk`'s ``tail="bucket"`` does for the classes it leaves
out)?
The top-k tail stands for classes the student *has* (its bucket holds the
student's mass on them). Here the student has no such classes: its mass on
the padding is 0, so a tail term :math:`\varepsilon \log(\varepsilon / 0)`
is infinite for any :math:`\varepsilon > 0`, and the only finite
comparison on the student's classes is the conditional one. Nor is the
padding knowledge to transfer: no text contains those ids, so
:math:`\varepsilon` is the teacher's error. A trained teacher typically
puts little mass there (its padding rows only ever get the softmax's
push-down), and then :math:`p' \approx p`; :func:`padding_mass`
measures it, to check.

**It is opt-in.** Slicing a teacher of 152,064 columns to a student of
32,000 (a different tokenizer) would pair unrelated token ids without a
word. So the losses take ``teacher_vocab_padding=P``, the number of the
teacher's trailing padding columns, and drop them only when ``V_t = V_s +
P`` exactly; any other mismatch (a teacher with more columns and no
``P``, a ``P`` that does not account for them, a teacher *smaller* than
the student, whose extra classes would have no target) is refused with one
error that names both sizes (:func:`check_vocab`). Where that is:

* :mod:`kdjax.losses`: the divergences and ``kd_objective`` take
  ``teacher_vocab_padding=``;
* :mod:`kdjax.losses.topk`: the cache is built from the aligned logits
  (``topk_targets``, ``tail_logit`` and ``topk_cache`` take it), so its
  indices are student classes and its tail logit has no padding mass;
  :func:`kdjax.losses.topk.topk_distillation_loss` gives NaN (and refuses
  eagerly, when the indices are concrete) for an index outside the
  student's ``[0, V_s)``;
* :mod:`kdjax.losses.chunked`: ``chunked_distillation_loss(...,
  teacher_vocab_padding=P)`` drops the teacher projection's last ``P``
  columns chunk by chunk;
* :func:`kdjax.fit`: wrap the teacher, :func:`aligned_teacher`; with the
  ``"topk"`` objective, ``fit`` refuses (before compiling) cached indices
  that are not student classes.

>>> import jax.numpy as jnp
>>> from kdjax import vocab
>>> v = jnp.array([2.0, 1.0, 0.0, -3.0, -3.0])     # 3 classes + 2 padding
>>> vocab.align_vocab(v, 3, padding=2)
Array([2., 1., 0.], dtype=float32)
>>> round(float(vocab.padding_mass(v, 3)), 4)       # what the rule drops
0.0089
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax import precision

__all__ = ["check_vocab", "align_vocab", "padding_mass", "aligned_teacher"]

Array = jax.Array
ArrayLike = jax.typing.ArrayLike


def _check_padding(padding) -> int:
  if isinstance(padding, bool) or not isinstance(padding, int) or (
      padding < 0):
    raise ValueError(f"teacher_vocab_padding must be an int >= 0 (the number "
                     f"of the teacher's trailing padding columns), got "
                     f"{padding!r}.")
  return padding


def check_vocab(student_vocab: int, teacher_vocab: int, padding: int = 0,
                *, what: str = "teacher_logits") -> None:
  """The teacher's classes are the student's plus ``padding`` padding columns.

  Args:
    student_vocab: ``V_s``, the student's number of classes.
    teacher_vocab: ``V_t``, the teacher's.
    padding: ``P``, the teacher's trailing padding columns (declared).
    what: how the message names the teacher's side.

  Raises:
    ValueError: ``V_t != V_s + P``, naming both sizes and the fix.
  """
  padding = _check_padding(padding)
  if teacher_vocab == student_vocab + padding:
    return
  sizes = (f"{what} have {teacher_vocab} classes and the student "
           f"{student_vocab}")
  if teacher_vocab < student_vocab:
    raise ValueError(
        f"{sizes}: a teacher with fewer classes than the student is "
        "refused (the student's classes past the teacher's would have no "
        "target); distil between models of one vocabulary.")
  extra = teacher_vocab - student_vocab
  declared = (f"teacher_vocab_padding={padding} accounts for {padding} of "
              f"the {extra} extra columns; " if padding else "")
  raise ValueError(
      f"{sizes}: {declared}if the teacher's last {extra} columns are "
      f"vocabulary padding (ids no token maps to), pass "
      f"teacher_vocab_padding={extra} (they are dropped and the teacher "
      "renormalised over the student's classes, kdjax.vocab); otherwise "
      "the vocabularies differ and cannot be compared class by class.")


def align_vocab(teacher_logits: ArrayLike, student_vocab: int, *,
                padding: int) -> Array:
  """The teacher's logits on the student's classes: padding dropped.

  ``teacher_logits[..., :V_s]`` after :func:`check_vocab`; a softmax of the
  result is the teacher's distribution renormalised over the student's
  classes (see the module docstring). Dtype unchanged.

  Args:
    teacher_logits: ``[..., V_s + padding]`` logits.
    student_vocab: ``V_s``.
    padding: the teacher's trailing padding columns (0: nothing dropped,
      and the sizes must agree).

  Raises:
    ValueError: the sizes do not fit the rule (both named).
  """
  teacher_logits = jnp.asarray(teacher_logits)
  if teacher_logits.ndim == 0:
    raise ValueError("teacher_logits must have a class axis, got a scalar.")
  check_vocab(student_vocab, teacher_logits.shape[-1], padding)
  if padding == 0:
    return teacher_logits
  return teacher_logits[..., :student_vocab]


def padding_mass(teacher_logits: ArrayLike, student_vocab: int,
                 temperature: float = 1.0) -> Array:
  r"""The teacher's probability on its padding columns, per position.

  .. math::
    \varepsilon = \sum_{j \ge V_s} \mathrm{softmax}(v / T)_j,

  in float32 (a logsumexp difference, accurate for tiny masses). The rule
  of this module drops it and divides the rest by :math:`1 - \varepsilon`;
  a teacher whose padding is real padding has :math:`\varepsilon \approx 0`
  (grows with ``T``).

  Returns:
    ``[...]`` float32 masses in ``[0, 1]``.
  """
  v = precision.at_least_float32(jnp.asarray(teacher_logits)) / temperature
  if v.shape[-1] <= student_vocab:
    raise ValueError(f"teacher_logits have {v.shape[-1]} classes: no "
                     f"padding past the student's {student_vocab}.")
  pad = jax.nn.logsumexp(v[..., student_vocab:], axis=-1)
  return jnp.exp(pad - jax.nn.logsumexp(v, axis=-1))


def aligned_teacher(teacher, student_vocab: int, *, padding: int):
  """A :class:`kdjax.Teacher` whose logits have the padding dropped.

  For :func:`kdjax.fit` (whose objectives compare teacher and student
  logits class by class): ``kdjax.fit(state, aligned_teacher(teacher,
  151_936, padding=128), ...)``. The sizes are checked when the logits'
  shape is first known (``fit`` traces the teacher abstractly before
  compiling).
  """
  from kdjax.teacher import Teacher  # pylint: disable=g-import-not-at-top
  if not isinstance(teacher, Teacher):
    raise TypeError(f"teacher must be a kdjax.Teacher, got "
                    f"{type(teacher).__name__}.")
  _check_padding(padding)
  inner = teacher.apply_fn

  def apply_fn(params, state, *inputs):
    return align_vocab(inner(params, state, *inputs), student_vocab,
                       padding=padding)

  return teacher.replace(apply_fn=apply_fn)

