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
from typing import Callable

import jax
import jax.numpy as jnp

from kdjax.records import describe, same_fit_record  # noqa: F401

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

# describe and same_fit_record are fit-record logic: their home is the core
# (kdjax.records); they stay importable from here.
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
    >>> from kdjax.paper import augment
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
    >>> from kdjax.paper import augment
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

  The function describes itself: ``kdjax.records.describe(make_jitter(2))`` is
  ``'jitter(max_shift=2)'``, which :func:`kdjax.fit` records in a workdir's
  ``fit.json``.
  """
  _check_max_shift(max_shift)
  fn = functools.partial(jitter, max_shift=max_shift)
  fn.description = f"jitter(max_shift={max_shift!r})"
  return fn
