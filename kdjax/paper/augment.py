r"""Jitter augmentation: small random translations with zero fill.

Hinton, Vinyals & Dean (2015) train their MNIST teacher on images "jittered
by up to two pixels in any direction". For every example :math:`b`
independently, an integer shift :math:`(\delta_y, \delta_x)` is drawn
uniformly from :math:`\{-m, \dots, m\}^2` (:math:`m` = ``max_shift``) and

.. math::
  \tilde x_b[i, j] = \begin{cases}
    x_b[i - \delta_y,\ j - \delta_x]
      & \text{if that pixel is inside the image,} \\
    0 & \text{otherwise,}
  \end{cases}

so content moves down by :math:`\delta_y` and right by :math:`\delta_x`;
pixels pushed over the border are dropped and the uncovered border is filled
with zeros (no wrap-around). Everything is jittable and vmappable;
``max_shift`` is a static Python int.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

__all__ = ["jitter", "make_jitter", "translate", "describe",
           "same_fit_record"]


def _check_max_shift(max_shift) -> None:
  if (isinstance(max_shift, bool) or not isinstance(max_shift, numbers.Integral)
      or max_shift < 0):
    raise ValueError(
        f"max_shift must be a non-negative Python int, got {max_shift!r}.")


def _check_images(images: Array) -> None:
  if images.ndim not in (3, 4):
    raise ValueError(
        f"images must be [B, H, W] or [B, H, W, C], got shape {images.shape}.")


def translate(images: ArrayLike, shifts: ArrayLike, *, max_shift: int) -> Array:
  r"""Translates each image by its own integer ``(dy, dx)``, filling with zeros.

  ``out[b, i, j] = images[b, i - dy_b, j - dx_b]`` where that index is inside
  the image, else 0. Implemented by zero-padding ``max_shift`` pixels on each
  side of ``H`` and ``W`` and taking a per-example ``lax.dynamic_slice``.

  Args:
    images: ``[B, H, W]`` or ``[B, H, W, C]``, any dtype (preserved).
    shifts: integer ``[B, 2]`` array of ``(dy, dx)``; values must lie in
      ``[-max_shift, max_shift]`` (larger ones are clamped to it).
    max_shift: static bound on ``|dy|`` and ``|dx|`` (the padding width).

  Returns:
    The translated images, same shape and dtype as ``images``.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import augment
    >>> x = jnp.zeros((1, 3, 3), jnp.uint8).at[0, 1, 1].set(7)
    >>> augment.translate(x, jnp.array([[1, -1]]), max_shift=1)[0]
    Array([[0, 0, 0],
           [0, 0, 0],
           [7, 0, 0]], dtype=uint8)
  """
  _check_max_shift(max_shift)
  images = jnp.asarray(images)
  _check_images(images)
  if max_shift == 0:
    return images
  m = max_shift
  h, w = images.shape[1:3]
  pad = [(0, 0), (m, m), (m, m)] + [(0, 0)] * (images.ndim - 3)
  padded = jnp.pad(images, pad)  # zeros of images.dtype
  starts = m - jnp.clip(jnp.asarray(shifts, jnp.int32), -m, m)  # [B, 2]
  sizes = (h, w) + images.shape[3:]

  def one(img, start):
    idx = (start[0], start[1]) + (0,) * (img.ndim - 2)
    return jax.lax.dynamic_slice(img, idx, sizes)

  return jax.vmap(one)(padded, starts)


def jitter(rng: jax.Array, images: ArrayLike, max_shift: int = 2) -> Array:
  r"""Randomly translates each image by up to ``max_shift`` pixels in x and y.

  Shifts :math:`\delta_y, \delta_x \sim \mathcal{U}\{-m, \dots, m\}` are drawn
  independently for every example and axis; see :func:`translate`.

  Args:
    rng: a PRNG key (new-style ``jax.random.key`` or raw ``PRNGKey``).
    images: ``[B, H, W]`` or ``[B, H, W, C]``, any dtype (preserved).
    max_shift: static non-negative int :math:`m`; ``0`` is the identity.

  Returns:
    Jittered images with the shape and dtype of ``images``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from kdjax import augment
    >>> x = jnp.ones((8, 28, 28), jnp.uint8)
    >>> y = augment.jitter(jax.random.key(0), x)
    >>> y.shape, y.dtype
    ((8, 28, 28), dtype('uint8'))
  """
  _check_max_shift(max_shift)
  images = jnp.asarray(images)
  _check_images(images)
  if max_shift == 0:
    return images
  shifts = jax.random.randint(rng, (images.shape[0], 2), -max_shift,
                              max_shift + 1, dtype=jnp.int32)
  return translate(images, shifts, max_shift=max_shift)


def make_jitter(max_shift: int = 2) -> Callable[[jax.Array, ArrayLike], Array]:
  """Returns ``fn(rng, images)`` = :func:`jitter` with a fixed ``max_shift``.

  The function describes itself: ``describe(make_jitter(2))`` is
  ``'jitter(max_shift=2)'``, which :func:`kdjax.fit` records in a workdir's
  ``fit.json``.
  """
  _check_max_shift(max_shift)
  fn = functools.partial(jitter, max_shift=max_shift)
  fn.description = f"jitter(max_shift={max_shift!r})"
  return fn


# ----------------------------------------------------------------------------
# Describing an augmentation (for the records of kdjax.fit).
# ----------------------------------------------------------------------------

# What fit.json recorded for every make_jitter result before augmentations
# described themselves (the __qualname__ of functools.partial).
_LEGACY_JITTER_RECORD = "partial"


def describe(fn: Optional[Callable]) -> Optional[str]:
  """A short, stable description of an augmentation, for a run's records.

  * ``None`` (no augmentation) gives ``None``;
  * a function with a string ``description`` attribute gives that (so
    ``describe(make_jitter(2)) == 'jitter(max_shift=2)'``);
  * a ``functools.partial`` gives ``name(arg, kw=value)`` with the wrapped
    function's description and the bound arguments' ``repr``;
  * anything else its ``__qualname__`` (a plain function, a lambda's
    ``'<lambda>'``), or its type's name for a callable object.

  Args:
    fn: an augmentation ``fn(rng, images) -> images``, or ``None``.

  Returns:
    The description, or ``None`` when ``fn`` is ``None``.

  Example:
    >>> import functools
    >>> from kdjax import augment
    >>> augment.describe(augment.make_jitter(1))
    'jitter(max_shift=1)'
    >>> augment.describe(functools.partial(augment.jitter, max_shift=3))
    'jitter(max_shift=3)'
    >>> augment.describe(augment.translate)
    'translate'
  """
  if fn is None:
    return None
  description = getattr(fn, "description", None)
  if isinstance(description, str):
    return description
  if isinstance(fn, functools.partial):
    args = [repr(a) for a in fn.args]
    args += [f"{k}={v!r}" for k, v in fn.keywords.items()]
    return f"{describe(fn.func)}({', '.join(args)})"
  # The same name fit.json recorded before descriptions existed, so the
  # records of plain functions are unchanged.
  return getattr(fn, "__qualname__", type(fn).__name__)


def _same_augment(recorded: Any, current: Any) -> bool:
  if recorded == current:
    return True
  # Records written before descriptions existed name every make_jitter
  # result "partial"; they match a jitter of any max_shift.
  return (recorded == _LEGACY_JITTER_RECORD and isinstance(current, str)
          and current.startswith("jitter("))


def same_fit_record(recorded: Mapping, current: Mapping) -> bool:
  """Whether two ``fit.json`` records describe the same run.

  Equal records match, and so does an old record whose ``'augment'`` is
  ``'partial'`` (what ``fit.json`` said for :func:`make_jitter` before
  :func:`describe` existed) against a current ``'jitter(...)'``, so a
  workdir written then still resumes. Every other key must be equal.

  Example:
    >>> from kdjax import augment
    >>> augment.same_fit_record({"augment": "partial", "batch_size": 128},
    ...                         {"augment": "jitter(max_shift=2)",
    ...                          "batch_size": 128})
    True
    >>> augment.same_fit_record({"augment": "partial"}, {"augment": None})
    False
  """
  if set(recorded) != set(current):
    return False
  return all(_same_augment(recorded[k], current[k]) if k == "augment"
             else recorded[k] == current[k] for k in recorded)
