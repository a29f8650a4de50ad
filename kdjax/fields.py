"""Which fields of a batch are what: the step's batch contract.

A batch is any ``dict`` whose leaves share a leading (example) axis. The
train step reads it by name, through a :class:`Fields`:

==================  =========================================================
``inputs``          the model inputs (one name, or a tuple of names passed
                    to the models as positional arguments in that order);
                    default ``"image"``
``teacher_inputs``  the teacher's inputs, if they differ (default: the same
                    as ``inputs``)
``labels``          integer labels ``[...]`` (default ``"label"``; ``None``
                    for an unlabelled transfer set)
``weights``         optional weight per example or per position, of shape
                    ``logits.shape[:-1]`` (0 for padding); default ``None``
``teacher_logits``  cached teacher logits (:mod:`kdjax.cache`), used instead
                    of running the teacher when present
``extra``           further fields a custom objective reads
==================  =========================================================

Every top-level field of a batch must be one of these: an unknown field
(a ``"mask"`` the step would silently not use, say) is refused with an error
that names it and says how to declare it. Checks run on shapes only, at
trace time, so a bad batch fails before anything compiles.

>>> import numpy as np
>>> from kdjax import fields
>>> f = fields.Fields(inputs="tokens", labels="targets", weights="mask")
>>> batch = {"tokens": np.zeros((2, 5), np.int32),
...          "targets": np.zeros((2, 5), np.int32),
...          "mask": np.ones((2, 5), np.float32)}
>>> fields.check_batch(batch, f)
2
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Mapping, Optional, Sequence, Union

import jax
import numpy as np

__all__ = ["Fields", "BatchError", "check_batch", "leading_size",
           "check_weights"]

Names = Union[str, Sequence[str]]


class BatchError(ValueError):
  """A batch that does not match the step's :class:`Fields`."""


def _names(value: Optional[Names]) -> tuple[str, ...]:
  if value is None:
    return ()
  if isinstance(value, str):
    return (value,)
  return tuple(value)


@dataclasses.dataclass(frozen=True)
class Fields:
  """The names of a batch's fields (see the module docstring).

  Attributes:
    inputs: model input field(s); several names are passed positionally.
    labels: integer label field, or None (no labels).
    weights: per-example / per-position weight field, or None (all ones).
    teacher_inputs: the teacher's input field(s); None: same as ``inputs``.
    teacher_logits: the cached-teacher-logits field.
    extra: more fields that a custom objective reads from the batch.
  """
  inputs: Names = "image"
  labels: Optional[str] = "label"
  weights: Optional[str] = None
  teacher_inputs: Optional[Names] = None
  teacher_logits: str = "teacher_logits"
  extra: Sequence[str] = ()

  def __post_init__(self):
    for name in ("inputs", "teacher_inputs", "extra"):
      value = getattr(self, name)
      if value is not None and not isinstance(value, str):
        object.__setattr__(self, name, tuple(value))
    if not _names(self.inputs):
      raise ValueError("Fields.inputs must name at least one field.")
    for name in ("labels", "weights", "teacher_logits"):
      value = getattr(self, name)
      if value is not None and not isinstance(value, str):
        raise TypeError(f"Fields.{name} must be a field name (str) or None, "
                        f"got {value!r}.")

  @property
  def input_names(self) -> tuple[str, ...]:
    return _names(self.inputs)

  @property
  def teacher_input_names(self) -> tuple[str, ...]:
    return (self.input_names if self.teacher_inputs is None
            else _names(self.teacher_inputs))

  def known(self) -> tuple[str, ...]:
    """Every field name the step may read, in a stable order."""
    names = [*self.input_names, *self.teacher_input_names,
             *(n for n in (self.labels, self.weights, self.teacher_logits)
               if n is not None), *_names(self.extra)]
    return tuple(dict.fromkeys(names))

  def inputs_of(self, batch: Mapping) -> tuple:
    return tuple(batch[n] for n in self.input_names)

  def teacher_inputs_of(self, batch: Mapping) -> tuple:
    return tuple(batch[n] for n in self.teacher_input_names)

  def describe(self) -> dict:
    """A JSON-able record (for ``fit.json``)."""
    return {"inputs": list(self.input_names),
            "teacher_inputs": list(self.teacher_input_names),
            "labels": self.labels, "weights": self.weights,
            "teacher_logits": self.teacher_logits,
            "extra": list(_names(self.extra))}


def leading_size(batch: Mapping, *, what: str = "batch") -> int:
  """The common leading axis of every leaf of ``batch``.

  Raises:
    BatchError: a leaf is a scalar, or the leaves' leading axes differ
      (every top-level field's shapes are named).
  """
  sizes = {}
  for name, value in batch.items():
    for path, leaf in jax.tree_util.tree_flatten_with_path(value)[0]:
      key = name + jax.tree_util.keystr(path)
      if not np.shape(leaf):
        raise BatchError(
            f"{what} field {key!r} is a scalar; every leaf of a {what} needs "
            "a leading example axis.")
      sizes[key] = np.shape(leaf)
  if not sizes:
    raise BatchError(f"the {what} has no arrays.")
  leading = {s[0] for s in sizes.values()}
  if len(leading) > 1:
    shapes = ", ".join(f"{k}: {'x'.join(map(str, s))}"
                       for k, s in sizes.items())
    raise BatchError(
        f"the {what}'s leaves must share their leading (example) axis, got "
        f"{shapes}. Give every field one row per example.")
  return int(leading.pop())


def check_batch(batch, fields: Fields, *, needs_labels: bool = False,
                what: str = "batch") -> int:
  """Checks ``batch`` against ``fields`` (shapes only); returns its size.

  Raises:
    BatchError: ``batch`` is not a dict, its leaves' leading axes differ,
      a configured field is missing (the fields present are named), a
      field is not one the step reads (with the :class:`Fields` argument
      that would use it), or ``needs_labels`` and ``fields.labels`` is None.
  """
  if not isinstance(batch, Mapping):
    raise BatchError(
        f"a {what} must be a dict of arrays (e.g. {{'image': ..., "
        f"'label': ...}}), got {type(batch).__name__}.")
  present = sorted(map(str, batch))
  required = [*fields.input_names]
  if fields.teacher_logits not in batch:
    required += [n for n in fields.teacher_input_names if n not in required]
  if fields.labels is not None:
    required.append(fields.labels)
  if fields.weights is not None:
    required.append(fields.weights)
  missing = [n for n in required if n not in batch]
  if missing:
    hint = ""
    if missing == [fields.labels] and not needs_labels:
      hint = (" This objective reads no labels: pass "
              "fields=kdjax.Fields(labels=None) for an unlabelled batch.")
    raise BatchError(
        f"the {what} has no field {', '.join(repr(m) for m in missing)} "
        f"(fields present: {', '.join(present) or 'none'}).{hint} Name the "
        "fields with kdjax.Fields(inputs=..., labels=..., weights=...).")
  if needs_labels and fields.labels is None:
    raise BatchError(
        "this objective needs labels, but Fields(labels=None) says the "
        "batch has none.")
  known = fields.known()
  unknown = [k for k in present if k not in known]
  if unknown:
    raise BatchError(_unknown_message(unknown, known, what))
  return leading_size(batch, what=what)


def _unknown_message(unknown, known, what) -> str:
  parts = []
  for k in unknown:
    close = difflib.get_close_matches(k, known, n=1, cutoff=0.6)
    parts.append(repr(k) + (f" (did you mean {close[0]!r}?)" if close else ""))
  return (
      f"the {what} has field(s) {', '.join(parts)} that the step does not "
      f"read (it reads: {', '.join(known)}); a field is never silently "
      "ignored. Use it (kdjax.Fields(weights='mask') for a padding mask, "
      "labels=..., inputs=(...) for more model inputs), declare it for a "
      "custom objective (Fields(extra=('name',))), or drop it.")


def check_weights(weights_shape, logits_shape, name: str) -> None:
  """Weights must have the logits' shape without the class axis.

  Raises:
    BatchError: naming both shapes.
  """
  want = tuple(logits_shape)[:-1]
  if tuple(weights_shape) != want:
    raise BatchError(
        f"weights field {name!r} has shape {tuple(weights_shape)}, but the "
        f"logits have shape {tuple(logits_shape)}: weights need shape {want} "
        "(one per example, or per position for sequences; 0 for padding).")
