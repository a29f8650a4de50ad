"""Input preprocessing: the one pixel-scaling rule, applied only where asked.

kdjax never rescales a batch behind the caller's back. Pixel scaling is a
choice made explicitly:

* kdjax's image models (:mod:`kdjax.paper.models`) scale their own uint8 inputs
  with :func:`scale_pixels`;
* for a model of your own that expects floats, pass
  ``input_transform=kdjax.preprocess.scale_pixels`` to the train step
  (:func:`kdjax.make_train_step`, :func:`kdjax.fit`) and to the
  teacher-logit cache (:func:`kdjax.cache.with_teacher_logits`); teacher
  and student then see the same floats.

The rule: ``uint8`` pixels become float32 ``x / 255`` in ``[0, 1]``; every
other dtype is returned unchanged. Integer token ids are not uint8 in
practice, and a byte-level model with uint8 tokens simply does not pass the
transform.

>>> import numpy as np, jax.numpy as jnp
>>> from kdjax import preprocess
>>> preprocess.scale_pixels(jnp.array([0, 255], jnp.uint8))
Array([0., 1.], dtype=float32)
>>> preprocess.scale_pixels(jnp.array([3, 7], jnp.int32))
Array([3, 7], dtype=int32)
>>> preprocess.scale_pixels(np.array([0, 51], np.uint8))  # NumPy stays NumPy
array([0. , 0.2], dtype=float32)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["scale_pixels"]


def scale_pixels(x: jax.typing.ArrayLike) -> jax.Array:
  """uint8 pixels -> float32 ``x / 255``; any other dtype unchanged.

  A NumPy array gives a NumPy array (the host-side loaders,
  :func:`kdjax.paper.data.load_mnist` with ``as_float=True``); anything else a
  JAX array. Both round the same way (one float32 division).
  """
  if isinstance(x, np.ndarray):
    if x.dtype == np.uint8:
      return x.astype(np.float32) / np.float32(255.0)
    return x
  x = jnp.asarray(x)
  if x.dtype == jnp.uint8:
    return x.astype(jnp.float32) / 255.0
  return x
