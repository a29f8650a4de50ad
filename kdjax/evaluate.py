"""Evaluation: logits in fixed-size chunks, and error counts.

One chunked prediction function serves the teacher-logit cache
(:mod:`kdjax.cache`), the experiments and the benchmarks:
:func:`predict_logits` runs a model over ``[N, ...]`` inputs in chunks of
``batch_size`` inside one compiled ``lax.map`` (the memory of one chunk,
one dispatch), padding the last chunk so that any ``N`` works.

>>> import jax.numpy as jnp
>>> from kdjax import evaluate
>>> w = jnp.eye(3)
>>> logits = evaluate.predict_logits(lambda w, x: x @ w, w, jnp.ones((5, 3)),
...                                  batch_size=2)
>>> logits.shape
(5, 3)
>>> evaluate.errors(logits, jnp.array([0, 1, 2, 0, 0]))  # argmax is 0
2
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["predict_logits", "errors"]


@functools.partial(jax.jit, static_argnums=(0, 3))
def _chunked(fn, params, inputs, batch_size):
  n = jax.tree.leaves(inputs)[0].shape[0]
  num = -(-n // batch_size)
  pad = num * batch_size - n

  def chunks(x):
    if pad:
      x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
    return x.reshape((num, batch_size) + x.shape[1:])

  out = jax.lax.map(lambda xs: fn(params, *xs), jax.tree.map(chunks, inputs))
  return jax.tree.map(
      lambda y: y.reshape((num * batch_size,) + y.shape[2:])[:n], out)


def predict_logits(fn: Callable, params, *inputs, batch_size: int = 1000):
  """``fn(params, *inputs)`` over ``[N, ...]`` inputs, ``batch_size`` at a time.

  Args:
    fn: ``(params, *chunk_inputs) -> logits``, e.g. ``lambda p, x:
      module.apply({'params': p}, x)`` or a teacher's apply. Static: pass the
      same function object each time to reuse the compilation.
    params: traced (any pytree, a :class:`kdjax.Teacher` too).
    *inputs: arrays with a common leading axis ``N``.
    batch_size: examples per chunk; the last chunk is padded (its padding
      rows are dropped from the result).

  Returns:
    ``[N, ...]`` outputs (a device array).
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}.")
  inputs = tuple(jnp.asarray(x) for x in inputs)
  return _chunked(fn, params, inputs, int(batch_size))


def errors(logits, labels, *, on_class: Optional[int] = None) -> int:
  """Misclassified examples (only those labelled ``on_class`` if given)."""
  wrong = np.argmax(np.asarray(logits), -1) != np.asarray(labels)
  if on_class is not None:
    wrong &= np.asarray(labels) == on_class
  return int(np.sum(wrong))
