"""Input preprocessing: the one pixel-scaling rule, applied only where asked.

kdjax never rescales a batch behind the caller's back. Pixel scaling is a
choice made explicitly:

* kdjax's image models (:mod:`kdjax.models`) scale their own uint8 inputs
  with :func:`scale_pixels`;
* for a model of your own that expects floats, pass
  ``input_transform=kdjax.preprocess.scale_pixels`` to the train step
  (:func:`kdjax.train.make_train_step`, :func:`kdjax.fit`) and to the
  teacher-logit cache (:func:`kdjax.cache.with_teacher_logits`); teacher
  and student then see the same floats.

The rule: ``uint8`` pixels become float32 ``x / 255`` in ``[0, 1]``; every
other dtype is returned unchanged. Integer token ids are not uint8 in
practice, and a byte-level model with uint8 tokens simply does not pass the
transform.

>>> import numpy as np
>>> from kdjax import preprocess
>>> preprocess.scale_pixels(np.array([0, 255], np.uint8))
Array([0., 1.], dtype=float32)
>>> preprocess.scale_pixels(np.array([3, 7], np.int32))
Array([3, 7], dtype=int32)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["scale_pixels"]


def scale_pixels(x: jax.typing.ArrayLike) -> jax.Array:
  """uint8 pixels -> float32 ``x / 255``; any other dtype unchanged."""
  x = jnp.asarray(x)
  if x.dtype == jnp.uint8:
    return x.astype(jnp.float32) / 255.0
  return x
