"""Mixed precision: forward passes in a compute dtype, everything else float32.

With ``compute_dtype=jnp.bfloat16`` the train step
(:func:`kdjax.make_train_step`) casts, for the forward passes only,

* the student's and the teacher's floating-point params,
* the floating-point model inputs (integer inputs such as token ids are
  never touched),

to bfloat16. The params and the optimizer state stay float32 (the gradient
of the cast is taken back to float32), the model state (BatchNorm
statistics) is not cast, and the losses see float32 logits: they promote
whatever they get (:mod:`kdjax.losses`), so no softmax runs in bfloat16.

Advice: keep the output layer in float32 (``keep_float32=("logits",)`` for
kdjax's models, whose last layer is named ``logits``). Its matmul then
produces float32 logits from float32 weights. At high ``T`` the soft
targets live in the small differences between logits, which bfloat16's
8-bit mantissa rounds away (a logit of 10 is rounded to a multiple of
0.0625, a difference that moves ``softmax(z / 20)`` by ~0.3%). The test
``tests/test_student.py::test_bfloat16_mnist_run_ends_near_the_float32_run``
states the tolerance a bf16 MNIST run meets. The speed-up itself shows only
on GPUs and TPUs; on a CPU bfloat16 matmuls are emulated and usually
slower.

>>> import jax.numpy as jnp
>>> from kdjax import precision
>>> p = {"hidden": {"kernel": jnp.ones((2, 2))},
...      "logits": {"kernel": jnp.ones(2)}}
>>> c = precision.cast_floating(p, jnp.bfloat16, keep_float32=("logits",))
>>> c["hidden"]["kernel"].dtype, c["logits"]["kernel"].dtype
(dtype(bfloat16), dtype('float32'))
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from kdjax._types import PyTree

__all__ = ["cast_floating", "check_compute_dtype", "at_least_float32"]



def _names(path) -> set[str]:
  out = set()
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        out.add(str(getattr(k, attr)))
        break
  return out


def cast_floating(tree: PyTree, dtype, *,
                  keep_float32: Optional[Sequence[str]] = None) -> PyTree:
  """``tree`` with its floating leaves cast to ``dtype``.

  Integer and boolean leaves (token ids, labels, counters) are left as they
  are, and so is every leaf whose key path has a component named in
  ``keep_float32`` (e.g. ``("logits",)``).
  """
  keep = frozenset(keep_float32 or ())

  def cast(path, x):
    if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    if keep and keep & _names(path):
      return x
    return x.astype(dtype)

  return jax.tree_util.tree_map_with_path(cast, tree)


def check_compute_dtype(dtype) -> Optional[jnp.dtype]:
  """None, or a floating dtype; anything else raises a ValueError."""
  if dtype is None:
    return None
  d = jnp.dtype(dtype)
  if not jnp.issubdtype(d, jnp.floating):
    raise ValueError(f"compute_dtype must be a floating dtype such as "
                     f"jnp.bfloat16, got {dtype!r}.")
  return d


def at_least_float32(x) -> jax.Array:
  """Promotes to at least float32 (bf16/f16 -> f32, f64 stays f64).

  The losses' rule: whatever the input dtype, they compute in at least
  float32, so no softmax ever runs in bfloat16.
  """
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))
