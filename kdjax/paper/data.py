"""MNIST for the paper's experiments, as host-side NumPy arrays.

Two ways in, giving identical arrays:

* **Offline IDX reader** (default, ``source="idx"``): reads the four original
  MNIST files from a directory, each either gzip-compressed (``NAME.gz``) or
  raw (``NAME``)::

    train-images-idx3-ubyte   60000 x 28 x 28 uint8
    train-labels-idx1-ubyte   60000 uint8
    t10k-images-idx3-ubyte    10000 x 28 x 28 uint8
    t10k-labels-idx1-ubyte    10000 uint8

  (the dotted spellings ``train-images.idx3-ubyte`` etc. are accepted too).
  The directory is ``data_dir`` if given (``--config.data_dir`` in the
  experiments), else the environment variable ``KDJAX_DATA_DIR``
  (:data:`DATA_DIR_ENV`). Nothing is downloaded; TensorFlow is not needed.

* **TFDS** (``source="tfds"``): ``tfds.load("mnist", batch_size=-1,
  as_supervised=True)``, which downloads on first use and needs TensorFlow
  (``pip install 'kdjax[tf]'``). TensorFlow is imported only on this path,
  never by ``import kdjax.paper.data``.

IDX files are read with the generic codec :mod:`kdjax.paper.idx` (its docstring
describes the format); here :func:`load_mnist` checks that they hold MNIST.

Output conventions: images are ``uint8 [N, 28, 28]`` (or ``float32`` in
``[0, 1]`` with ``as_float=True``, i.e. ``x / 255``), labels ``int32 [N]`` in
``0..9``.

Splits: a *seeded random* 10k of the 60k training images is held out as a
validation set (:func:`train_val_split`,
:func:`load_mnist_splits`). The validation set is what tunes the
temperature, the bias shifts and early stopping; the 10k test set never
chooses anything and is only reported.

The paper's transfer sets (no 3s, only 7s and 8s, a random 3%) are the
experiment's protocol and live in ``experiments/mnist/transfer.py``.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import pathlib
from typing import Optional, Union

import numpy as np

from kdjax.paper.idx import (DataError, DataNotFoundError, IdxFormatError,
                       encode_idx, format_dims, read_idx, write_idx)
from kdjax.preprocess import scale_pixels

PathLike = Union[str, os.PathLike]

__all__ = [
    "DATA_DIR_ENV",
    "DataError",
    "DataNotFoundError",
    "IdxFormatError",
    "MNIST_FILES",
    "MnistSplits",
    "encode_idx",
    "find_mnist_file",
    "load_mnist",
    "load_mnist_splits",
    "read_idx",
    "resolve_data_dir",
    "train_val_split",
    "write_idx",
]

DATA_DIR_ENV = "KDJAX_DATA_DIR"

# split -> (images file, labels file), without the ".gz" suffix.
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28)


_HOW_TO_SUPPLY = (
    "Supply MNIST by passing data_dir=... (--config.data_dir=... in the "
    f"experiments), or set {DATA_DIR_ENV} to a directory holding the four "
    "MNIST IDX files (gzipped NAME.gz or raw NAME): "
    + ", ".join(n for pair in MNIST_FILES.values() for n in pair)
    + "; or, with network access, use the TFDS path (source='tfds', needs "
    "pip install 'kdjax[tf]').")

# ----------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------


# ----------------------------------------------------------------------------
# Locating the files.
# ----------------------------------------------------------------------------


def resolve_data_dir(data_dir: Optional[PathLike] = None) -> pathlib.Path:
  """The MNIST directory: ``data_dir`` if given, else ``$KDJAX_DATA_DIR``.

  Only resolves the path (``~`` is expanded); whether it holds the files is
  checked when they are read, so that the error can say which are missing.

  Args:
    data_dir: explicit directory; ``None`` or ``""`` means "not given".

  Returns:
    The directory as a :class:`pathlib.Path`.

  Raises:
    DataNotFoundError: neither ``data_dir`` nor a non-empty
      ``KDJAX_DATA_DIR`` is set; the message says how to supply the data.
  """
  if data_dir is not None and os.fspath(data_dir) != "":
    return pathlib.Path(data_dir).expanduser()
  env = os.environ.get(DATA_DIR_ENV, "")
  if env:
    return pathlib.Path(env).expanduser()
  raise DataNotFoundError(
      f"No MNIST data directory: data_dir was not given and {DATA_DIR_ENV} "
      f"is not set. {_HOW_TO_SUPPLY}")


def _candidates(name: str) -> list[str]:
  """File names accepted for ``name``: gz first, then raw, then dotted."""
  dotted = name.replace("-idx", ".idx", 1)
  names = [name + ".gz", name]
  if dotted != name:
    names += [dotted + ".gz", dotted]
  return names


def find_mnist_file(data_dir: PathLike, name: str) -> pathlib.Path:
  """Path of ``name`` in ``data_dir``, tolerating ``name.gz`` or raw ``name``.

  Args:
    data_dir: directory to look in.
    name: base name without ``.gz``, e.g. ``"t10k-labels-idx1-ubyte"``.

  Returns:
    The first existing file among ``name.gz``, ``name`` (and the dotted
    spellings ``t10k-labels.idx1-ubyte[.gz]``).

  Raises:
    DataNotFoundError: the directory does not exist or holds none of them.
  """
  d = pathlib.Path(data_dir)
  _check_dir(d)
  for cand in _candidates(name):
    p = d / cand
    if p.is_file():
      return p
  raise DataNotFoundError(
      f"MNIST file {name}(.gz) not found in {d}. {_HOW_TO_SUPPLY}")


def _check_dir(d: pathlib.Path) -> None:
  if not d.is_dir():
    what = "is not a directory" if d.exists() else "does not exist"
    raise DataNotFoundError(
        f"MNIST data directory {d} {what}. {_HOW_TO_SUPPLY}")


def _find_split_files(d: pathlib.Path,
                      split: str) -> tuple[pathlib.Path, pathlib.Path]:
  _check_dir(d)
  found, missing = [], []
  for name in MNIST_FILES[split]:
    hit = next((d / c for c in _candidates(name) if (d / c).is_file()), None)
    (found if hit else missing).append(hit or name)
  if missing:
    present = sorted(p.name for p in d.iterdir())
    raise DataNotFoundError(
        f"MNIST {split} split: missing "
        + ", ".join(f"{m}(.gz)" for m in missing)
        + f" in {d} (directory contains: "
        + (", ".join(present[:10]) + (", ..." if len(present) > 10 else "")
           if present else "nothing")
        + f"). {_HOW_TO_SUPPLY}")
  return found[0], found[1]


# ----------------------------------------------------------------------------
# IDX reading and writing.
# ----------------------------------------------------------------------------


# ----------------------------------------------------------------------------
# MNIST.
# ----------------------------------------------------------------------------


def _check_split(split: str) -> None:
  if split not in MNIST_FILES:
    raise ValueError(
        f"split must be one of {sorted(MNIST_FILES)}, got {split!r}.")


def _finish(images: np.ndarray, labels: np.ndarray, as_float: bool,
            images_name, labels_name) -> tuple[np.ndarray, np.ndarray]:
  """Shared checks and casts of both sources: uint8/f32 images, int32 labels."""
  if (images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE
      or images.dtype != np.uint8):
    raise IdxFormatError(
        f"{images_name} holds {images.dtype} {format_dims(images.shape)}, "
        f"expected uint8 Nx28x28 MNIST images (magic 0x00000803).")
  if labels.ndim != 1:
    raise IdxFormatError(
        f"{labels_name} holds {labels.dtype} {format_dims(labels.shape)}, "
        "expected N labels (magic 0x00000801).")
  if images.shape[0] != labels.shape[0]:
    raise IdxFormatError(
        f"{images_name} has {images.shape[0]} images but {labels_name} has "
        f"{labels.shape[0]} labels; the files are from different splits or "
        "one is corrupt.")
  if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
    raise IdxFormatError(
        f"{labels_name} has labels outside 0..{NUM_CLASSES - 1} "
        f"(min {labels.min()}, max {labels.max()}); the file may be corrupt "
        "or not MNIST.")
  labels = labels.astype(np.int32)
  if as_float:
    images = scale_pixels(images)  # The one pixel-scaling rule.
  return images, labels


def _import_tfds():
  """Imports TensorFlow and TFDS, or explains how to get them."""
  try:
    import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "source='tfds' needs TensorFlow and tensorflow-datasets (TFDS reads "
        "through tf.data): pip install 'kdjax[tf]'. Or use the offline IDX "
        f"reader (source='idx', the default) with {DATA_DIR_ENV} or data_dir "
        f"pointing at the MNIST IDX files. (Import error: {e})") from e
  return tfds


def _load_tfds(split: str, data_dir: Optional[PathLike]):
  tfds = _import_tfds()
  ds = tfds.load("mnist", split=split,
                 data_dir=None if data_dir is None else os.fspath(data_dir),
                 batch_size=-1, as_supervised=True)
  images, labels = tfds.as_numpy(ds)
  images = np.asarray(images)
  if images.ndim == 4 and images.shape[-1] == 1:
    images = images[..., 0]
  name = f"tfds mnist[{split}]"
  return images, np.asarray(labels), f"{name} images", f"{name} labels"


def load_mnist(split: str, data_dir: Optional[PathLike] = None, *,
               as_float: bool = False,
               source: str = "idx") -> tuple[np.ndarray, np.ndarray]:
  """Loads one MNIST split as NumPy arrays.

  Args:
    split: ``"train"`` (60000 examples) or ``"test"`` (10000).
    data_dir: with ``source="idx"``, the directory of the IDX files (default
      ``$KDJAX_DATA_DIR``). With ``source="tfds"``, TFDS's ``data_dir``
      (default: TFDS's own, ``~/tensorflow_datasets``); ``KDJAX_DATA_DIR`` is
      not used there since it holds IDX files, not TFDS records.
    as_float: return images as ``float32`` in ``[0, 1]`` (``x / 255``).
    source: ``"idx"`` (offline, no TensorFlow) or ``"tfds"`` (may download;
      needs ``pip install 'kdjax[tf]'``). Both give identical arrays.

  Returns:
    ``(images, labels)``: images ``uint8 [N, 28, 28]`` (``float32`` if
    ``as_float``), labels ``int32 [N]`` in ``0..9``.

  Raises:
    ValueError: unknown ``split`` or ``source``.
    DataNotFoundError: no directory, or the split's files are missing.
    IdxFormatError: a file is corrupt, the image and label counts differ, or
      a label is outside ``0..9``.
    ImportError: ``source="tfds"`` without TensorFlow/TFDS.
  """
  _check_split(split)
  if source == "idx":
    images_path, labels_path = _find_split_files(resolve_data_dir(data_dir),
                                                 split)
    images, labels = read_idx(images_path), read_idx(labels_path)
    names = (images_path, labels_path)
  elif source == "tfds":
    images, labels, *names = _load_tfds(split, data_dir)
  else:
    raise ValueError(f"source must be 'idx' or 'tfds', got {source!r}.")
  return _finish(images, labels, as_float, *names)


# ----------------------------------------------------------------------------
# Validation split.
# ----------------------------------------------------------------------------


def _check_pair(images, labels) -> None:
  if len(images) != len(labels):
    raise ValueError(f"images and labels differ in length: {len(images)} vs "
                     f"{len(labels)}.")


def _check_int(name: str, value) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(f"{name} must be an int, got {value!r}.")
  return int(value)


def train_val_split(images: np.ndarray, labels: np.ndarray,
                    num_val: int = 10_000, seed: int = 0):
  """Holds out a seeded random ``num_val`` examples as a validation set.

  The split is a permutation ``np.random.default_rng(seed).permutation(N)``:
  its first ``num_val`` indices are the validation set, the rest (kept in
  their original order) the training set. The same seed gives the same split
  on every run; the two parts are disjoint and cover all ``N`` examples.

  Args:
    images: ``[N, ...]`` images.
    labels: ``[N]`` labels.
    num_val: validation-set size, ``0 <= num_val <= N``.
    seed: permutation seed.

  Returns:
    ``((x_train, y_train), (x_val, y_val))``, copies.

  Example:
    >>> import numpy as np
    >>> (xt, yt), (xv, yv) = train_val_split(np.arange(10), np.arange(10), 3)
    >>> len(xt), len(xv), sorted(np.concatenate([xt, xv]).tolist()) == list(
    ...     range(10))
    (7, 3, True)
  """
  _check_pair(images, labels)
  num_val = _check_int("num_val", num_val)
  n = len(labels)
  if not 0 <= num_val <= n:
    raise ValueError(f"num_val must lie in [0, {n}], got {num_val}.")
  perm = np.random.default_rng(seed).permutation(n)
  val_idx, train_idx = perm[:num_val], np.sort(perm[num_val:])
  return ((images[train_idx], labels[train_idx]),
          (images[val_idx], labels[val_idx]))


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class MnistSplits:
  """Train / validation / test arrays (see :func:`load_mnist_splits`)."""
  train_images: np.ndarray
  train_labels: np.ndarray
  val_images: np.ndarray
  val_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray

  @property
  def num_classes(self) -> int:
    """The number of classes (10): what a model's output layer needs."""
    return NUM_CLASSES

  @property
  def input_shape(self) -> tuple[int, ...]:
    """One example's shape, ``(28, 28)``: ``models.init_params(module, rng,
    (1, *splits.input_shape))``."""
    return tuple(self.train_images.shape[1:])

  def __repr__(self) -> str:
    fields = ", ".join(
        f"{f.name}={a.dtype}{list(a.shape)}"
        for f in dataclasses.fields(self) for a in [getattr(self, f.name)])
    return f"MnistSplits({fields})"


def load_mnist_splits(data_dir: Optional[PathLike] = None,
                      num_val: int = 10_000, seed: int = 0,
                      as_float: bool = True, *,
                      source: str = "idx") -> MnistSplits:
  """MNIST as train (50k) / validation (10k) / test (10k).

  The validation set is a seeded random ``num_val`` of the 60k training
  images (:func:`train_val_split`). It is for tuning the temperature, the
  bias shifts and early stopping; the test set never chooses anything and is
  only reported.

  Args:
    data_dir: see :func:`load_mnist`.
    num_val: validation-set size.
    seed: seed of the train/validation permutation.
    as_float: images as ``float32`` in ``[0, 1]`` (default) or ``uint8``.
    source: ``"idx"`` or ``"tfds"``, see :func:`load_mnist`.

  Returns:
    A frozen :class:`MnistSplits`.
  """
  train = load_mnist("train", data_dir, as_float=as_float, source=source)
  test = load_mnist("test", data_dir, as_float=as_float, source=source)
  (xt, yt), (xv, yv) = train_val_split(*train, num_val=num_val, seed=seed)
  return MnistSplits(xt, yt, xv, yv, *test)


# ----------------------------------------------------------------------------
# Transfer sets.
# ----------------------------------------------------------------------------
