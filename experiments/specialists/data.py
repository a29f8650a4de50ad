"""A 100-class task from real MNIST: two digits side by side.

A pair is a left and a right MNIST image concatenated along the width
(``uint8 [28, 56]``); its class is ``10 * left_label + right_label``, so the
100 classes come in confusable families (``37`` shares a digit with ``30..39``
and ``07..97``), which is what the paper's specialists are for.

Pairs of a split are drawn **only from that split's images** (the 50k / 10k
train / validation split of :func:`kdjax.data.train_val_split` and the 10k
test images), so no image of one split appears in another split's pairs.
Every pair records the indices of its two images in their MNIST file
(``source``), which is what the no-leakage tests check.

Balanced rule (:func:`make_pairs`): class ``c`` gets ``num_pairs // 100``
pairs, plus one for ``num_pairs % 100`` classes chosen at random; each of
its pairs takes a random image of digit ``c // 10`` on the left and one of
digit ``c % 10`` on the right (without replacement within a class while the
digit's images last). The pairs are then shuffled. Everything is seeded by
``np.random.default_rng(seed)``.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Optional, Sequence

import numpy as np

from kdjax import data as kd_data

__all__ = ["NUM_CLASSES", "Pairs", "make_pairs", "load_pair_splits"]

NUM_CLASSES = 100


@dataclasses.dataclass(frozen=True, eq=False)
class Pairs:
  """Pairs of digits and where they came from.

  Attributes:
    images: ``[n, 28, 56]`` (the dtype of the source images; ``uint8`` from
      :func:`load_pair_splits`).
    labels: ``int32 [n]``, ``10 * left_label + right_label``.
    left, right: ``int64 [n]`` indices of the two images in the ``images``
      given to :func:`make_pairs`.
    source_left, source_right: ``int64 [n]`` the same images' indices in
      their MNIST file (``file``), set by :func:`load_pair_splits`.
    file: ``"train"`` (the 60k training file) or ``"test"`` (the 10k one).
  """
  images: np.ndarray
  labels: np.ndarray
  left: np.ndarray
  right: np.ndarray
  source_left: Optional[np.ndarray] = None
  source_right: Optional[np.ndarray] = None
  file: str = ""

  def __len__(self) -> int:
    return len(self.labels)


def _draw(rng, pool, n):
  """``n`` draws from ``pool``, without replacement while it lasts."""
  reps = -(-n // len(pool))
  return np.concatenate([rng.permutation(pool) for _ in range(reps)])[:n]


def make_pairs(images: np.ndarray, labels: np.ndarray, num_pairs: int, *,
               seed: int | Sequence[int]) -> Pairs:
  """Balanced pairs of digits from one split's images.

  Args:
    images: ``[N, 28, 28]`` MNIST images of one split.
    labels: ``[N]`` their digits, ``0..9`` (every digit must occur).
    num_pairs: ``n >= 1``; class counts differ by at most one.
    seed: seed of the draw (anything ``np.random.default_rng`` takes).

  Returns:
    :class:`Pairs` with ``images [n, 28, 56]``, ``labels``, ``left``, ``right``.

  Example:
    >>> import numpy as np
    >>> x = (np.arange(10, dtype=np.uint8)[:, None, None]
    ...      * np.ones((1, 28, 28), np.uint8))
    >>> p = make_pairs(x, np.arange(10), 200, seed=0)
    >>> p.images.shape, np.bincount(p.labels).tolist() == [2] * 100
    ((200, 28, 56), True)
    >>> bool(np.all(p.images[:, 0, 0] * 10 + p.images[:, 0, 28] == p.labels))
    True
  """
  images, labels = np.asarray(images), np.asarray(labels)
  if images.ndim != 3 or len(images) != len(labels):
    raise ValueError(f"images must be [N, H, W] with one label each, got "
                     f"{images.shape} and {labels.shape}.")
  if (isinstance(num_pairs, bool) or not isinstance(num_pairs, numbers.Integral)
      or num_pairs < 1):
    raise ValueError(f"num_pairs must be a positive int, got {num_pairs!r}.")
  pools = [np.flatnonzero(labels == d) for d in range(10)]
  missing = [d for d in range(10) if not len(pools[d])]
  if missing:
    raise ValueError(f"digits {missing} have no image in this split.")
  rng = np.random.default_rng(seed)
  counts = np.full(NUM_CLASSES, num_pairs // NUM_CLASSES)
  counts[rng.permutation(NUM_CLASSES)[:num_pairs % NUM_CLASSES]] += 1
  left, right, y = [], [], []
  for c in range(NUM_CLASSES):
    left.append(_draw(rng, pools[c // 10], counts[c]))
    right.append(_draw(rng, pools[c % 10], counts[c]))
    y.append(np.full(counts[c], c, np.int32))
  order = rng.permutation(num_pairs)
  left = np.concatenate(left)[order].astype(np.int64)
  right = np.concatenate(right)[order].astype(np.int64)
  return Pairs(images=np.concatenate([images[left], images[right]], axis=2),
               labels=np.concatenate(y)[order], left=left, right=right)


def load_pair_splits(data_dir, train_pairs: int, val_pairs: int,
                     test_pairs: int, seed: int, *, num_val: int = 10_000,
                     split_seed: int = 0) -> dict[str, Pairs]:
  """Pairs for train / validation / test, each from its own split's images.

  The 60k training file is split as :func:`kdjax.data.load_mnist_splits`
  does (``num_val``, ``split_seed``: 50k train, 10k validation); the test
  pairs come from the 10k test file. Split ``i`` (train, val, test) draws
  with seed ``[seed, i]`` (``np.random.default_rng``).

  Args:
    data_dir: the MNIST IDX directory (see :func:`kdjax.data.load_mnist`).
    train_pairs, val_pairs, test_pairs: pairs per split.
    seed: seed of the pairing.
    num_val, split_seed: the train/validation split.

  Returns:
    ``{"train": Pairs, "val": Pairs, "test": Pairs}``, ``uint8`` images, with
    ``source_left``/``source_right`` indices into the MNIST file ``file``.
  """
  x_file, y_file = kd_data.load_mnist("train", data_dir)
  x_test, y_test = kd_data.load_mnist("test", data_dir)
  ids = np.arange(len(y_file))
  (_, train_ids), (_, val_ids) = kd_data.train_val_split(
      ids, ids, num_val=num_val, seed=split_seed)
  parts = {"train": (train_ids, "train", train_pairs),
           "val": (val_ids, "train", val_pairs),
           "test": (np.arange(len(y_test)), "test", test_pairs)}
  files = {"train": (x_file, y_file), "test": (x_test, y_test)}
  out = {}
  for i, (name, (split_ids, file, n)) in enumerate(parts.items()):
    x, y = files[file]
    pairs = make_pairs(x[split_ids], y[split_ids], n, seed=[seed, i])
    out[name] = dataclasses.replace(
        pairs, source_left=split_ids[pairs.left],
        source_right=split_ids[pairs.right], file=file)
  return out
