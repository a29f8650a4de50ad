"""The teacher-logit cache: run the teacher over the transfer set once.

Without augmentation the teacher's logits for a given image never change,
so computing them once (jitted, in batches) and training from
``data['teacher_logits']`` removes the teacher's forward pass from every
step. The result is the same as an online teacher (tested).

With augmentation the cache would be stale (the teacher must see the same
jittered image as the student): :func:`kdjax.train.make_train_step` refuses
that combination with a ValueError.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kdjax.teacher import Teacher
from kdjax.train import prepare_images

__all__ = ["compute_teacher_logits", "with_teacher_logits"]


def compute_teacher_logits(teacher: Teacher, images: jax.Array, *,
                           batch_size: int = 1000) -> jax.Array:
  """The teacher's logits on ``images``, computed in fixed-size batches.

  Args:
    teacher: the frozen teacher (inference mode).
    images: ``[N, ...]`` images, prepared as in the train step
      (:func:`kdjax.train.prepare_images`).
    batch_size: examples per forward pass (the last batch is padded).

  Returns:
    ``[N, C]`` float32 logits.
  """
  images = prepare_images(jnp.asarray(images))
  n = images.shape[0]
  num_batches = -(-n // batch_size)
  pad = num_batches * batch_size - n
  padded = jnp.pad(images, [(0, pad)] + [(0, 0)] * (images.ndim - 1))
  chunks = padded.reshape((num_batches, batch_size) + images.shape[1:])

  @jax.jit
  def run(teacher, chunks):
    return jax.lax.map(lambda x: teacher(x).astype(jnp.float32), chunks)

  logits = run(teacher, chunks)
  return logits.reshape((num_batches * batch_size,) + logits.shape[2:])[:n]


def with_teacher_logits(data: dict, teacher: Teacher, *,
                        batch_size: int = 1000) -> dict:
  """A copy of ``data`` with ``'teacher_logits'`` added."""
  return {**data, "teacher_logits": compute_teacher_logits(
      teacher, data["image"], batch_size=batch_size)}
