"""The teacher-logit cache: run the teacher over the transfer set once.

Without augmentation the teacher's logits for a given image never change,
so computing them once (jitted, in batches) and training from
``data['teacher_logits']`` removes the teacher's forward pass from every
step. The result is the same as an online teacher (tested).

With augmentation the cache would be stale (the teacher must see the same
jittered image as the student): :func:`kdjax.make_train_step` refuses
that combination with a ValueError.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from kdjax import evaluate
from kdjax.fields import Fields
from kdjax.teacher import Teacher

__all__ = ["compute_teacher_logits", "with_teacher_logits"]


def compute_teacher_logits(teacher: Teacher, *inputs, batch_size: int = 1000,
                           input_transform: Optional[Callable] = None
                           ) -> jax.Array:
  """The teacher's logits on ``inputs``, computed in fixed-size batches.

  Args:
    teacher: the frozen teacher (inference mode).
    *inputs: the teacher's inputs, ``[N, ...]`` each (one array for an
      image classifier), as the train step passes them.
    batch_size: examples per forward pass (the last batch is padded).
    input_transform: the train step's ``input_transform`` (e.g.
      :func:`kdjax.preprocess.scale_pixels`), so that cached and online
      logits are identical.

  Returns:
    ``[N, ..., C]`` float32 logits.
  """
  if input_transform is not None:
    inputs = [input_transform(jnp.asarray(x)) for x in inputs]
  return evaluate.predict_logits(_teacher_logits, teacher, *inputs,
                                 batch_size=batch_size)


def _teacher_logits(teacher, *inputs):
  return teacher(*inputs).astype(jnp.float32)


def with_teacher_logits(data: dict, teacher: Teacher, *,
                        batch_size: int = 1000,
                        fields: Optional[Fields] = None,
                        input_transform: Optional[Callable] = None) -> dict:
  """A copy of ``data`` with the teacher's logits added.

  They go under ``fields.teacher_logits`` (``'teacher_logits'`` by
  default), computed from ``fields``' teacher inputs.
  """
  fields = Fields() if fields is None else fields
  logits = compute_teacher_logits(
      teacher, *fields.teacher_inputs_of(data), batch_size=batch_size,
      input_transform=input_transform)
  return {**data, fields.teacher_logits: logits}
