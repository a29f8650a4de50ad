"""The paper's transfer sets: the data a student is distilled on (§3).

The MNIST experiment's protocol, not library code: the library's
:mod:`kdjax.paper.data` only loads and splits MNIST.
"""

from __future__ import annotations

import numpy as np

__all__ = ["TRANSFER_VARIANTS", "transfer_set"]

TRANSFER_VARIANTS = ("all", "no3", "only78", "subset")


def _check_pair(images, labels) -> None:
  if len(images) != len(labels):
    raise ValueError(f"images and labels differ in length: {len(images)} vs "
                     f"{len(labels)}.")


def transfer_set(images: np.ndarray, labels: np.ndarray, variant: str, *,
                 seed: int = 0, fraction: float = 0.03):
  """The data a student is distilled on, in one of the paper's variants.

  * ``"all"``: everything, unchanged.
  * ``"no3"``: every example of digit 3 removed (the student never sees a 3;
    the paper then corrects the bias of class 3).
  * ``"only78"``: only the 7s and 8s.
  * ``"subset"``: a seeded random ``round(fraction * N)`` examples (default
    3%), drawn without replacement and kept in their original order.

  Args:
    images: ``[N, ...]`` images.
    labels: ``[N]`` integer labels.
    variant: one of :data:`TRANSFER_VARIANTS`.
    seed: seed of the ``"subset"`` draw (ignored otherwise).
    fraction: the ``"subset"`` fraction, in ``(0, 1]``.

  Returns:
    ``(images, labels)`` of the transfer set.

  Raises:
    ValueError: unknown ``variant`` (the message lists the valid ones), or
      ``fraction`` outside ``(0, 1]``.

  Example:
    >>> import numpy as np
    >>> y = np.array([3, 7, 8, 1, 3])
    >>> (transfer_set(y, y, "no3")[1].tolist(),
    ...  transfer_set(y, y, "only78")[1].tolist())
    ([7, 8, 1], [7, 8])
  """
  _check_pair(images, labels)
  labels_np = np.asarray(labels)
  if variant == "all":
    return images, labels
  if variant == "no3":
    keep = labels_np != 3
  elif variant == "only78":
    keep = (labels_np == 7) | (labels_np == 8)
  elif variant == "subset":
    if not 0.0 < fraction <= 1.0:
      raise ValueError(f"fraction must lie in (0, 1], got {fraction!r}.")
    n = len(labels_np)
    k = int(round(fraction * n))
    keep = np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))
  else:
    raise ValueError(f"unknown transfer-set variant {variant!r}; valid "
                     f"variants: {', '.join(map(repr, TRANSFER_VARIANTS))}.")
  return images[keep], labels[keep]
