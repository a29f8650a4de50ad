"""Tests for kdjax.paper.data: the offline IDX reader, splits, transfer sets."""
import gzip
import hashlib
import os
import pathlib
import re
import subprocess
import sys
import types

import numpy as np
import pytest

from experiments.mnist import transfer
from kdjax.paper import data

# md5 of the *decompressed* original MNIST files.
MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]

TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"


# ----------------------------------------------------------------------------
# Fixtures (loaded once per module: decompressing the train images is ~0.5 s).
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def train(mnist_dir):
  return data.load_mnist("train", mnist_dir)


@pytest.fixture(scope="module")
def test_split(mnist_dir):
  return data.load_mnist("test", mnist_dir)


@pytest.fixture
def tiny_dir(tmp_path, test_split):
  """A directory with a small but valid gzipped test split (100 examples)."""
  x, y = test_split
  data.write_idx(tmp_path / (TEST_IMAGES + ".gz"), x[:100])
  data.write_idx(tmp_path / (TEST_LABELS + ".gz"), y[:100].astype(np.uint8))
  return tmp_path


# ----------------------------------------------------------------------------
# The real files.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MD5))
def test_reader_reproduces_original_md5(mnist_dir, name):
  # md5 of the bytes re-encoded from what the reader parsed: a reader that
  # dropped, shifted or reordered anything would fail this.
  arr = data.read_idx(data.find_mnist_file(mnist_dir, name))
  assert arr.dtype == np.uint8
  assert hashlib.md5(data.encode_idx(arr)).hexdigest() == MD5[name]


def test_train_shapes_dtypes_counts(train):
  x, y = train
  assert x.shape == (60000, 28, 28) and x.dtype == np.uint8
  assert y.shape == (60000,) and y.dtype == np.int32
  assert np.bincount(y, minlength=10).tolist() == TRAIN_COUNTS
  assert x.min() == 0 and x.max() == 255
  assert x.flags.writeable


def test_test_shapes_dtypes_counts(test_split):
  x, y = test_split
  assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
  assert y.shape == (10000,) and y.dtype == np.int32
  assert np.bincount(y, minlength=10).tolist() == TEST_COUNTS
  assert int(np.sum(y == 3)) == 1010  # known fact about the MNIST test set


def test_as_float(mnist_dir, test_split):
  xf, yf = data.load_mnist("test", mnist_dir, as_float=True)
  assert xf.dtype == np.float32 and xf.min() == 0.0 and xf.max() == 1.0
  np.testing.assert_array_equal(xf, test_split[0].astype(np.float32) / 255)
  np.testing.assert_array_equal(yf, test_split[1])


def test_load_mnist_splits(mnist_dir, train, test_split):
  s = data.load_mnist_splits(mnist_dir)
  assert s.train_images.shape == (50000, 28, 28)
  assert s.val_images.shape == (10000, 28, 28)
  assert s.test_images.shape == (10000, 28, 28)
  assert s.train_images.dtype == np.float32
  assert s.train_labels.shape == (50000,) and s.val_labels.shape == (10000,)
  np.testing.assert_array_equal(s.test_labels, test_split[1])
  # Together, train + val are exactly the 60k training labels.
  np.testing.assert_array_equal(
      np.bincount(np.concatenate([s.train_labels, s.val_labels])), TRAIN_COUNTS)
  with pytest.raises(AttributeError):
    s.train_images = None  # frozen
  assert "train_images=float32[50000, 28, 28]" in repr(s)


# ----------------------------------------------------------------------------
# Train / validation split.
# ----------------------------------------------------------------------------


def _val_indices(n, num_val, seed):
  """Recovers which indices went to validation, using an arange as images."""
  (it, _), (iv, _) = data.train_val_split(np.arange(n), np.zeros(n), num_val,
                                          seed)
  return it, iv


def test_train_val_split_disjoint_and_deterministic(train):
  x, y = train
  (xt, yt), (xv, yv) = data.train_val_split(x, y, num_val=10_000, seed=0)
  assert xt.shape == (50000, 28, 28) and xv.shape == (10000, 28, 28)
  assert yt.shape == (50000,) and yv.shape == (10000,)
  it, iv = _val_indices(60000, 10_000, 0)
  assert len(np.intersect1d(it, iv)) == 0
  assert len(np.union1d(it, iv)) == 60000
  np.testing.assert_array_equal(xv, x[iv])
  np.testing.assert_array_equal(yt, y[it])
  # Same seed -> same split; another seed -> another split.
  (_, _), (xv2, yv2) = data.train_val_split(x, y, num_val=10_000, seed=0)
  np.testing.assert_array_equal(xv2, xv)
  np.testing.assert_array_equal(yv2, yv)
  _, iv1 = _val_indices(60000, 10_000, 1)
  assert not np.array_equal(np.sort(iv), np.sort(iv1))


def test_train_val_split_bad_args():
  with pytest.raises(ValueError, match="num_val"):
    data.train_val_split(np.zeros(5), np.zeros(5), num_val=6)
  with pytest.raises(ValueError, match="differ in length"):
    data.train_val_split(np.zeros(5), np.zeros(4), num_val=1)
  with pytest.raises(TypeError, match="num_val"):
    data.train_val_split(np.zeros(5), np.zeros(5), num_val=1.5)


# ----------------------------------------------------------------------------
# gz and raw files; file lookup.
# ----------------------------------------------------------------------------


def test_gz_and_raw_identical(tmp_path, mnist_dir, test_split):
  for name in (TEST_IMAGES, TEST_LABELS):
    gz = data.find_mnist_file(mnist_dir, name)
    raw = tmp_path / name
    with gzip.open(gz, "rb") as f:
      raw.write_bytes(f.read())
    assert hashlib.md5(raw.read_bytes()).hexdigest() == MD5[name]
    np.testing.assert_array_equal(data.read_idx(raw), data.read_idx(gz))
  # Lookup tolerates raw files only; load_mnist gives identical arrays.
  x, y = data.load_mnist("test", tmp_path)
  assert x.dtype == np.uint8 and y.dtype == np.int32
  np.testing.assert_array_equal(x, test_split[0])
  np.testing.assert_array_equal(y, test_split[1])


def test_dotted_names_and_sniffed_gzip(tmp_path, tiny_dir):
  # t10k-images.idx3-ubyte.gz (dotted) and t10k-labels.idx1-ubyte holding
  # gzip data without the suffix: both found and read.
  out = tmp_path / "dotted"
  out.mkdir()
  (tiny_dir / (TEST_IMAGES + ".gz")).rename(out / "t10k-images.idx3-ubyte.gz")
  (tiny_dir / (TEST_LABELS + ".gz")).rename(out / "t10k-labels.idx1-ubyte")
  x, y = data.load_mnist("test", out)
  assert x.shape == (100, 28, 28) and y.shape == (100,)


def test_write_read_roundtrip(tmp_path):
  rng = np.random.default_rng(0)
  for arr in (rng.integers(0, 256, (3, 4, 5)).astype(np.uint8),
              rng.integers(-5, 5, (7,)).astype(np.int32),
              rng.normal(size=(2, 3)).astype(np.float32)):
    for suffix in ("", ".gz"):
      out = data.read_idx(data.write_idx(tmp_path / f"a{suffix}", arr))
      assert out.dtype == arr.dtype
      np.testing.assert_array_equal(out, arr)


# ----------------------------------------------------------------------------
# Corrupted and missing files.
# ----------------------------------------------------------------------------


def _raw_bytes(path):
  return gzip.decompress(pathlib.Path(path).read_bytes())


def test_bad_magic(tiny_dir):
  p = tiny_dir / (TEST_LABELS + ".gz")
  b = bytearray(_raw_bytes(p))
  b[0:4] = b"\x12\x34\x56\x78"
  p.write_bytes(gzip.compress(bytes(b)))
  with pytest.raises(data.IdxFormatError,
                     match=r"bad magic number 0x12345678 in "
                     r".*t10k-labels.*0x00000801"):
    data.load_mnist("test", tiny_dir)


def test_labels_file_in_place_of_images(tiny_dir):
  labels = tiny_dir / (TEST_LABELS + ".gz")
  images = tiny_dir / (TEST_IMAGES + ".gz")
  images.write_bytes(labels.read_bytes())
  with pytest.raises(data.IdxFormatError,
                     match=r"t10k-images.*expected uint8 Nx28x28"):
    data.load_mnist("test", tiny_dir)


def test_truncated_payload(tiny_dir):
  p = tiny_dir / (TEST_IMAGES + ".gz")
  p.write_bytes(gzip.compress(_raw_bytes(p)[:-5]))
  with pytest.raises(data.IdxFormatError,
                     match=r"t10k-images-idx3-ubyte\.gz is truncated: "
                     r"header says 100x28x28 = 78400 bytes of data, "
                     r"found 78395"):
    data.load_mnist("test", tiny_dir)


def test_truncated_header(tmp_path):
  p = tmp_path / "x-idx3-ubyte"
  p.write_bytes(b"\x00\x00\x08\x03\x00\x00")
  with pytest.raises(data.IdxFormatError,
                     match=r"x-idx3-ubyte is truncated: .*3 dimensions"):
    data.read_idx(p)
  p.write_bytes(b"\x00\x00")
  with pytest.raises(data.IdxFormatError, match=r"x-idx3-ubyte is truncated"):
    data.read_idx(p)


def test_extra_bytes(tiny_dir):
  p = tiny_dir / (TEST_LABELS + ".gz")
  p.write_bytes(gzip.compress(_raw_bytes(p) + b"\x00\x01\x02"))
  with pytest.raises(data.IdxFormatError,
                     match=r"t10k-labels-idx1-ubyte\.gz has trailing bytes: "
                     r"header says 100 = 100 bytes of data, "
                     r"found 103 \(3 extra\)"):
    data.load_mnist("test", tiny_dir)


def test_truncated_gzip_stream(tiny_dir):
  p = tiny_dir / (TEST_IMAGES + ".gz")
  b = p.read_bytes()
  p.write_bytes(b[: len(b) // 2])
  with pytest.raises(data.IdxFormatError,
                     match=r"t10k-images-idx3-ubyte\.gz is a corrupt or "
                     r"truncated gzip"):
    data.load_mnist("test", tiny_dir)


def test_corrupt_gzip_stream(tiny_dir):
  p = tiny_dir / (TEST_LABELS + ".gz")
  b = bytearray(p.read_bytes())
  b[20:40] = bytes(20)  # garbage in the deflate stream (or a CRC mismatch)
  p.write_bytes(bytes(b))
  with pytest.raises(data.IdxFormatError,
                     match=r"t10k-labels-idx1-ubyte\.gz is a corrupt or "
                     r"truncated gzip"):
    data.load_mnist("test", tiny_dir)


def test_count_mismatch(tiny_dir, test_split):
  data.write_idx(tiny_dir / (TEST_LABELS + ".gz"),
                 test_split[1][:99].astype(np.uint8))
  with pytest.raises(data.IdxFormatError,
                     match=r"100 images but .*t10k-labels.* 99 labels"):
    data.load_mnist("test", tiny_dir)


def test_label_out_of_range(tiny_dir):
  data.write_idx(tiny_dir / (TEST_LABELS + ".gz"), np.full(100, 10, np.uint8))
  with pytest.raises(data.IdxFormatError, match=r"t10k-labels.*outside 0\.\.9"):
    data.load_mnist("test", tiny_dir)


def test_missing_file(tiny_dir):
  (tiny_dir / (TEST_LABELS + ".gz")).unlink()
  with pytest.raises(data.DataNotFoundError,
                     match=r"missing t10k-labels-idx1-ubyte\(\.gz\) in "
                     + re.escape(str(tiny_dir)) + ".*KDJAX_DATA_DIR"):
    data.load_mnist("test", tiny_dir)
  with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte"):
    data.find_mnist_file(tiny_dir, TEST_LABELS)
  with pytest.raises(FileNotFoundError,
                     match=r"nope-idx1-ubyte\.gz does not exist"):
    data.read_idx(tiny_dir / "nope-idx1-ubyte.gz")


def test_empty_dir(tmp_path):
  with pytest.raises(data.DataNotFoundError,
                     match=rf"missing train-images-idx3-ubyte\(\.gz\), "
                     rf"train-labels-idx1-ubyte\(\.gz\) in "
                     rf"{re.escape(str(tmp_path))} "
                     r"\(directory contains: nothing\)"
                     r".*data_dir=.*KDJAX_DATA_DIR"):
    data.load_mnist("train", tmp_path)


def test_nonexistent_dir(tmp_path):
  with pytest.raises(data.DataNotFoundError,
                     match=re.escape(f"{tmp_path / 'nope'} does not exist")):
    data.load_mnist("test", tmp_path / "nope")


def test_bad_split_and_source(tiny_dir):
  with pytest.raises(ValueError, match="split must be one of"):
    data.load_mnist("validation", tiny_dir)
  with pytest.raises(ValueError, match="source must be"):
    data.load_mnist("test", tiny_dir, source="npz")


# ----------------------------------------------------------------------------
# Data-directory resolution.
# ----------------------------------------------------------------------------


def test_resolve_data_dir(monkeypatch, tmp_path):
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "env"))
  assert data.resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"  # arg wins
  assert data.resolve_data_dir() == tmp_path / "env"
  assert data.resolve_data_dir("") == tmp_path / "env"


def test_env_var_used_by_load_mnist(monkeypatch, tiny_dir):
  monkeypatch.setenv("KDJAX_DATA_DIR", str(tiny_dir))
  x, _ = data.load_mnist("test")
  assert x.shape == (100, 28, 28)


@pytest.mark.parametrize("env", [None, ""])
def test_missing_data_dir_message(monkeypatch, env):
  if env is None:
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
  else:
    monkeypatch.setenv(data.DATA_DIR_ENV, env)
  with pytest.raises(data.DataNotFoundError) as e:
    data.resolve_data_dir()
  msg = str(e.value)
  for part in ("KDJAX_DATA_DIR", "data_dir=", "--config.data_dir",
               "train-images-idx3-ubyte", "t10k-labels-idx1-ubyte", "gzip",
               "source='tfds'", "kdjax[tf]"):
    assert part in msg, part
  assert isinstance(e.value, FileNotFoundError)
  with pytest.raises(data.DataNotFoundError, match="KDJAX_DATA_DIR is not set"):
    data.load_mnist("test")


# ----------------------------------------------------------------------------
# Transfer sets.
# ----------------------------------------------------------------------------


def test_transfer_all(train):
  x, y = train
  xa, ya = transfer.transfer_set(x, y, "all")
  assert xa.shape == x.shape and np.array_equal(ya, y)


def test_transfer_no3(train):
  x, y = train
  x3, y3 = transfer.transfer_set(x, y, "no3")
  assert 3 not in y3
  assert len(y3) == 60000 - TRAIN_COUNTS[3]
  counts = np.bincount(y3, minlength=10).tolist()
  assert counts == [c if d != 3 else 0 for d, c in enumerate(TRAIN_COUNTS)]
  # The order is kept, and the images follow their labels.
  np.testing.assert_array_equal(x3, x[y != 3])


def test_transfer_only78(train):
  x, y = train
  x78, y78 = transfer.transfer_set(x, y, "only78")
  assert set(np.unique(y78).tolist()) == {7, 8}
  assert len(y78) == TRAIN_COUNTS[7] + TRAIN_COUNTS[8]
  np.testing.assert_array_equal(x78, x[(y == 7) | (y == 8)])


def test_transfer_subset(train):
  x, y = train
  xs, ys = transfer.transfer_set(x, y, "subset")
  assert len(ys) == round(0.03 * 60000) == 1800
  assert xs.shape == (1800, 28, 28)
  n = 60000
  idx = lambda **kw: transfer.transfer_set(np.arange(n), np.zeros(n), "subset",
                                       **kw)[0]
  a, b, c = idx(seed=0), idx(seed=0), idx(seed=1)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert len(np.unique(a)) == 1800  # without replacement
  np.testing.assert_array_equal(xs, x[a])
  np.testing.assert_array_equal(ys, y[a])
  assert len(idx(fraction=0.1)) == 6000
  with pytest.raises(ValueError, match="fraction"):
    idx(fraction=0.0)


def test_transfer_unknown_variant():
  y = np.arange(10)
  with pytest.raises(ValueError,
                     match=r"unknown transfer-set variant 'no7'.*"
                     r"'all', 'no3', 'only78', 'subset'"):
    transfer.transfer_set(y, y, "no7")


# ----------------------------------------------------------------------------
# TFDS path and TensorFlow isolation.
# ----------------------------------------------------------------------------


@pytest.mark.integration
def test_import_does_not_import_tensorflow():
  code = ("import sys, kdjax.paper.data; "
          "bad = [m for m in sys.modules if m.split('.')[0] in "
          "('tensorflow', 'tensorflow_datasets')]; "
          "assert not bad, bad")
  repo = pathlib.Path(__file__).resolve().parents[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr


def test_tfds_without_tensorflow(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow", None)  # import -> ImportError
  with pytest.raises(ImportError,
                     match=r"pip install 'kdjax\[tf\]'.*KDJAX_DATA_DIR"):
    data.load_mnist("test", source="tfds")


def test_tfds_path_matches_idx(monkeypatch, test_split):
  """With a stand-in TFDS, the tfds path gives the IDX path's arrays exactly."""
  x, y = test_split
  calls = []

  def fake_load(name, **kwargs):
    calls.append((name, kwargs))
    # TFDS's format: uint8 [N, 28, 28, 1] images, int64 labels.
    return (x[..., None].copy(), y.astype(np.int64))

  fake_tfds = types.ModuleType("tensorflow_datasets")
  fake_tfds.load = fake_load
  fake_tfds.as_numpy = lambda t: t
  monkeypatch.setitem(sys.modules, "tensorflow", types.ModuleType("tensorflow"))
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake_tfds)

  for as_float in (False, True):
    xt, yt = data.load_mnist("test", "/some/tfds_dir", source="tfds",
                             as_float=as_float)
    xi, yi = data._finish(x, y, as_float, "i", "l")  # pylint: disable=protected-access
    assert xt.dtype == xi.dtype and yt.dtype == np.int32
    np.testing.assert_array_equal(xt, xi)
    np.testing.assert_array_equal(yt, yi)
  assert calls[0] == ("mnist", dict(split="test", data_dir="/some/tfds_dir",
                                    batch_size=-1, as_supervised=True))
