"""Shared fixtures (the root conftest.py sets the XLA device-count flag)."""
import os
import pathlib

import pytest

_DEFAULT_MNIST = (pathlib.Path(__file__).resolve().parents[2] / "shared" /
                  "data" / "mnist")


@pytest.fixture(scope="session")
def mnist_dir() -> pathlib.Path:
  """Directory of the real MNIST IDX files (KDJAX_DATA_DIR or ../shared)."""
  d = pathlib.Path(os.environ.get("KDJAX_DATA_DIR", _DEFAULT_MNIST))
  if not any((d / name).exists() for name in ("train-images-idx3-ubyte.gz",
                                               "train-images-idx3-ubyte")):
    pytest.skip(f"real MNIST not found in {d}; set KDJAX_DATA_DIR")
  return d


@pytest.fixture
def quick_config(mnist_dir, monkeypatch):
  """``rows -> config``: the demo config on real MNIST, one seed, no bar."""
  from experiments.mnist.configs import quick  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("KDJAX_PROGRESS", "0")

  def make(*rows):
    config = quick.get_config()
    config.data_dir = str(mnist_dir)
    config.seeds = (0,)
    config.rows = rows
    return config

  return make
