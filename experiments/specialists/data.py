"""A 100-class task from real MNIST: two digits side by side.

A pair is a left and a right MNIST image concatenated along the width
(``uint8 [28, 56]``); its class is ``10 * left_label + right_label``, so the
100 classes come in confusable families (``37`` shares a digit with ``30..39``
and ``07..97``), which is what the paper's specialists are for.

Pairs of a split are drawn **only from that split's images** (the 50k / 10k
train / validation split of :func:`kdjax.paper.data.train_val_split` and the 10k
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

from kdjax.paper import data as kd_data

__all__ = ["NUM_CLASSES", "Pairs", "make_pairs", "load_pair_splits",
           "FreshPairs", "subset_probs", "row_column_families",
           "split_images"]

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

  The 60k training file is split as :func:`kdjax.paper.data.load_mnist_splits`
  does (``num_val``, ``split_seed``: 50k train, 10k validation); the test
  pairs come from the 10k test file. Split ``i`` (train, val, test) draws
  with seed ``[seed, i]`` (``np.random.default_rng``).

  Args:
    data_dir: the MNIST IDX directory (see :func:`kdjax.paper.data.load_mnist`).
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


# ----------------------------------------------------------------------------
# Fresh pairs every epoch (the paper's regime: abundant data).
# ----------------------------------------------------------------------------


def row_column_families() -> list[list[int]]:
  """The task's natural overlapping subsets: rows ``a*`` then columns ``*b``.

  Row ``a`` holds the ten classes with left digit ``a`` (``10a .. 10a+9``),
  column ``b`` the ten with right digit ``b``; each class is in one row and
  one column. A pair whose left digit is misread stays in its column, one
  whose right digit is misread stays in its row.
  """
  rows = [[10 * a + b for b in range(10)] for a in range(10)]
  return rows + [[10 * a + b for a in range(10)] for b in range(10)]


def _allocate(n: int, probs: np.ndarray, rng) -> np.ndarray:
  """Counts summing to ``n``, each ``floor`` or ``ceil`` of ``n * probs``.

  The ``n - sum(floor)`` extra ones go to classes drawn without replacement
  with probability proportional to their fractional parts.
  """
  want = n * probs
  counts = np.floor(want).astype(np.int64)
  rest = n - int(counts.sum())
  frac = want - counts
  if rest:
    extra = rng.choice(len(probs), size=rest, replace=False,
                       p=frac / frac.sum())
    counts[extra] += 1
  return counts


class FreshPairs:
  """Pairs drawn afresh each epoch from one split's images, class-balanced.

  Epoch ``e`` draws ``num_pairs`` pairs with ``np.random.default_rng([seed,
  e])``: class ``c`` gets ``floor`` or ``ceil`` of ``num_pairs * probs[c]``
  pairs (:func:`_allocate`), each taking a uniformly random image of digit
  ``c // 10`` on the left and one of digit ``c % 10`` on the right (with
  replacement: there are about 25 million pairs per class in the 50k
  training images), in a random order. Only the ``images`` given are ever
  used, so a generator built from one split's images cannot leak another
  split's (tested). Called with an epoch it returns that epoch's batches,
  a sequence of ``num_pairs // batch_size`` dicts (the remainder is
  dropped), which is a host source :func:`kdjax.fit` accepts; the same
  epoch always gives the same batches (a resumed run can replay it).

  A batch holds ``"image"`` (``uint8 [B, 28, 56]``), ``"label"``
  (``label_map[c]``, ``int32``) and, with ``in_subset`` given,
  ``"in_subset"`` (``bool``, ``in_subset[c]``).

  Args:
    images: ``[N, 28, 28]`` one split's images.
    labels: ``[N]`` their digits; every digit must occur.
    num_pairs: pairs per epoch (``>= batch_size``).
    batch_size: pairs per batch.
    seed: the generator's seed.
    probs: ``[100]`` class probabilities (default uniform), e.g. half on a
      specialist's subset (:func:`subset_probs`).
    label_map: ``int [100]`` the target of each class (default identity),
      e.g. :func:`kdjax.specialists.specialist_labels` of ``arange(100)``.
    in_subset: optional ``bool [100]``.
  """

  def __init__(self, images, labels, *, num_pairs: int, batch_size: int,
               seed, probs=None, label_map=None, in_subset=None):
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim != 3 or len(images) != len(labels):
      raise ValueError(f"images must be [N, H, W] with one label each, got "
                       f"{images.shape} and {labels.shape}.")
    for name, v in (("num_pairs", num_pairs), ("batch_size", batch_size)):
      if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}.")
    if batch_size > num_pairs:
      raise ValueError(f"batch_size={batch_size} exceeds num_pairs="
                       f"{num_pairs}.")
    self.images, self.num_pairs, self.batch_size = images, num_pairs, batch_size
    self.seed = seed
    self.pools = [np.flatnonzero(labels == d) for d in range(10)]
    missing = [d for d in range(10) if not len(self.pools[d])]
    if missing:
      raise ValueError(f"digits {missing} have no image in this split.")
    p = (np.full(NUM_CLASSES, 1.0 / NUM_CLASSES) if probs is None
         else np.asarray(probs, np.float64))
    if p.shape != (NUM_CLASSES,) or np.any(p < 0) or not np.isclose(
        p.sum(), 1.0):
      raise ValueError("probs must be 100 non-negative numbers summing to 1.")
    self.probs = p / p.sum()
    self.label_map = (np.arange(NUM_CLASSES, dtype=np.int32)
                      if label_map is None
                      else np.asarray(label_map, np.int32))
    self.in_subset = None if in_subset is None else np.asarray(in_subset, bool)

  def epoch_indices(self, epoch: int):
    """``(left, right, classes)`` of epoch ``epoch``: indices into images."""
    rng = np.random.default_rng([*np.atleast_1d(self.seed), int(epoch)])
    counts = _allocate(self.num_pairs, self.probs, rng)
    classes = rng.permutation(np.repeat(np.arange(NUM_CLASSES), counts))
    left = np.empty(len(classes), np.int64)
    right = np.empty(len(classes), np.int64)
    for d in range(10):
      for side, digit in ((left, classes // 10), (right, classes % 10)):
        rows = np.flatnonzero(digit == d)
        side[rows] = self.pools[d][rng.integers(len(self.pools[d]),
                                                size=len(rows))]
    return left, right, classes.astype(np.int32)

  def __call__(self, epoch: int) -> "_EpochBatches":
    return _EpochBatches(self, *self.epoch_indices(epoch))


class _EpochBatches:
  """One epoch of :class:`FreshPairs`: batch ``i`` built when asked for."""

  def __init__(self, gen: FreshPairs, left, right, classes):
    self.gen, self.left, self.right, self.classes = gen, left, right, classes

  def __len__(self) -> int:
    return self.gen.num_pairs // self.gen.batch_size

  def __getitem__(self, i: int) -> dict:
    if not 0 <= i < len(self):
      raise IndexError(i)
    b = slice(i * self.gen.batch_size, (i + 1) * self.gen.batch_size)
    x = self.gen.images
    batch = {"image": np.concatenate([x[self.left[b]], x[self.right[b]]],
                                     axis=2),
             "label": self.gen.label_map[self.classes[b]]}
    if self.gen.in_subset is not None:
      batch["in_subset"] = self.gen.in_subset[self.classes[b]]
    return batch


def subset_probs(subset, fraction_in_subset: float = 0.5) -> np.ndarray:
  """Class probabilities: ``f`` spread evenly on ``subset``, the rest evenly
  on the other classes (a specialist's data, half from its subset)."""
  subset = np.asarray(subset)
  inside = np.zeros(NUM_CLASSES, bool)
  inside[subset] = True
  if inside.all() or not inside.any():
    raise ValueError("a specialist's subset must hold some classes, not all.")
  f = float(fraction_in_subset)
  if not 0.0 < f < 1.0:
    raise ValueError(f"fraction_in_subset must lie in (0, 1), got {f!r}.")
  return np.where(inside, f / inside.sum(), (1.0 - f) / (~inside).sum())


def split_images(data_dir, *, num_val: int = 10_000, split_seed: int = 0):
  """The three splits' digit images: ``{name: (images, labels, file ids)}``.

  ``train`` and ``val`` are :func:`kdjax.paper.data.train_val_split` of the 60k
  training file (as in :func:`load_pair_splits`), ``test`` the 10k test
  file; ``file ids`` index each image in its MNIST file.
  """
  x_file, y_file = kd_data.load_mnist("train", data_dir)
  x_test, y_test = kd_data.load_mnist("test", data_dir)
  ids = np.arange(len(y_file))
  (_, train_ids), (_, val_ids) = kd_data.train_val_split(
      ids, ids, num_val=num_val, seed=split_seed)
  return {"train": (x_file[train_ids], y_file[train_ids], train_ids),
          "val": (x_file[val_ids], y_file[val_ids], val_ids),
          "test": (x_test, y_test, np.arange(len(y_test)))}
