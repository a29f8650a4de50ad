"""Tests for experiments.specialists.data: the 100-class MNIST pairs.

On synthetic digits (fast) and on the real MNIST files (the ``mnist_dir``
fixture skips when they are absent): no image crosses splits (index
bookkeeping, checked against the images' content), balanced classes,
determinism by seed, shapes and dtypes, and ``label = 10 * left + right``.
"""

import numpy as np
import pytest

from experiments.specialists import data as pair_data
from kdjax.paper import data as kd_data


def _digits(n=500, seed=0):
  """Images whose content encodes their own index (to check bookkeeping)."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 10, size=n).astype(np.int32)
  images = rng.integers(0, 256, size=(n, 28, 28)).astype(np.uint8)
  return images, labels


@pytest.mark.parametrize("num_pairs", [100, 1000, 257])
def test_make_pairs_balanced_and_labelled(num_pairs):
  x, y = _digits()
  p = pair_data.make_pairs(x, y, num_pairs, seed=3)
  assert p.images.shape == (num_pairs, 28, 56) and p.images.dtype == np.uint8
  assert p.labels.dtype == np.int32 and len(p) == num_pairs
  counts = np.bincount(p.labels, minlength=100)
  assert counts.sum() == num_pairs and counts.max() - counts.min() <= 1
  assert counts.min() == num_pairs // 100
  np.testing.assert_array_equal(p.labels, 10 * y[p.left] + y[p.right])
  np.testing.assert_array_equal(p.images[:, :, :28], x[p.left])
  np.testing.assert_array_equal(p.images[:, :, 28:], x[p.right])


def test_make_pairs_deterministic_by_seed():
  x, y = _digits()
  a = pair_data.make_pairs(x, y, 300, seed=1)
  b = pair_data.make_pairs(x, y, 300, seed=1)
  c = pair_data.make_pairs(x, y, 300, seed=2)
  for f in ("images", "labels", "left", "right"):
    np.testing.assert_array_equal(getattr(a, f), getattr(b, f))
  assert not np.array_equal(a.left, c.left)


def test_make_pairs_without_replacement_within_a_class():
  x, y = _digits(n=2000)
  p = pair_data.make_pairs(x, y, 1000, seed=0)  # 10 per class, ~200 per digit
  for c in range(100):
    rows = p.labels == c
    assert len(np.unique(p.left[rows])) == rows.sum()
    assert len(np.unique(p.right[rows])) == rows.sum()


def test_make_pairs_rejects():
  x, y = _digits()
  with pytest.raises(ValueError, match="digits"):
    pair_data.make_pairs(x[y != 3], y[y != 3], 100, seed=0)
  with pytest.raises(ValueError):
    pair_data.make_pairs(x, y, 0, seed=0)
  with pytest.raises(ValueError):
    pair_data.make_pairs(x, y[:10], 100, seed=0)


@pytest.fixture(scope="module")
def real_pairs(mnist_dir):
  return pair_data.load_pair_splits(mnist_dir, 3000, 1000, 1000, seed=0)


def test_real_pairs_shapes_and_labels(real_pairs, mnist_dir):
  files = {f: kd_data.load_mnist(f, mnist_dir) for f in ("train", "test")}
  for name, n in (("train", 3000), ("val", 1000), ("test", 1000)):
    p = real_pairs[name]
    assert p.images.shape == (n, 28, 56) and p.images.dtype == np.uint8
    counts = np.bincount(p.labels, minlength=100)
    assert counts.min() == counts.max() == n // 100
    x, y = files[p.file]
    # The bookkeeping is truthful: halves are the recorded source images.
    np.testing.assert_array_equal(p.images[:, :, :28], x[p.source_left])
    np.testing.assert_array_equal(p.images[:, :, 28:], x[p.source_right])
    np.testing.assert_array_equal(p.labels,
                                  10 * y[p.source_left] + y[p.source_right])
  assert real_pairs["test"].file == "test"
  assert real_pairs["train"].file == real_pairs["val"].file == "train"


def test_real_pairs_no_leakage_between_splits(real_pairs, mnist_dir):
  splits = kd_data.load_mnist_splits(mnist_dir, as_float=False)
  ids = np.arange(60_000)
  (_, train_ids), (_, val_ids) = kd_data.train_val_split(ids, ids)
  used = {name: np.union1d(p.source_left, p.source_right)
          for name, p in real_pairs.items()}
  # Train and validation pairs use disjoint images of the 60k file, each
  # only from its own part of kdjax.paper.data's split.
  assert np.intersect1d(used["train"], used["val"]).size == 0
  assert np.all(np.isin(used["train"], train_ids))
  assert np.all(np.isin(used["val"], val_ids))
  # ... and those parts are the ones load_mnist_splits returns.
  x_file, _ = kd_data.load_mnist("train", mnist_dir)
  np.testing.assert_array_equal(x_file[train_ids], splits.train_images)
  np.testing.assert_array_equal(x_file[val_ids], splits.val_images)
  # Test pairs come from the 10k test file only.
  assert np.all(used["test"] < 10_000)
  # Content: no train-pair half equals a test-pair half unless MNIST itself
  # holds that exact image in both files.
  def digests(x):
    return {x[i].tobytes() for i in range(len(x))}
  x_test, _ = kd_data.load_mnist("test", mnist_dir)
  train_halves = digests(np.concatenate([real_pairs["train"].images[:, :, :28],
                                         real_pairs["train"].images[
                                             :, :, 28:]]))
  test_halves = digests(np.concatenate([real_pairs["test"].images[:, :, :28],
                                        real_pairs["test"].images[:, :, 28:]]))
  shared = train_halves & test_halves
  assert shared <= (digests(x_file) & digests(x_test))


def test_real_pairs_deterministic(real_pairs, mnist_dir):
  again = pair_data.load_pair_splits(mnist_dir, 3000, 1000, 1000, seed=0)
  other = pair_data.load_pair_splits(mnist_dir, 3000, 1000, 1000, seed=1)
  for name in ("train", "val", "test"):
    np.testing.assert_array_equal(again[name].source_left,
                                  real_pairs[name].source_left)
    np.testing.assert_array_equal(again[name].labels, real_pairs[name].labels)
    assert not np.array_equal(other[name].source_left,
                              real_pairs[name].source_left)
