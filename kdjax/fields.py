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
from typing import Mapping, Optional, Sequence, Union

# The batch checks live with the other input checks, in kdjax.validate.
from kdjax.validate import (BatchError, check_batch, check_weights,  # noqa: F401
                            leading_size)

__all__ = ["Fields", "BatchError", "check_batch", "leading_size",
           "check_weights"]

Names = Union[str, Sequence[str]]


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
