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


@pytest.fixture(scope="session")
def tiny_mnist_dir(tmp_path_factory) -> pathlib.Path:
  """A few synthetic MNIST-shaped examples as IDX files, for smoke tests.

  300 training and 100 test images (28x28 uint8), every class present;
  each class is a fixed random template plus noise, so they are learnable.
  Runs that load MNIST from a ``data_dir`` run on it in seconds.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  from kdjax.paper import data  # pylint: disable=g-import-not-at-top
  d = tmp_path_factory.mktemp("tiny_mnist")
  rng = np.random.RandomState(0)
  templates = rng.randint(0, 256, (10, 28, 28))
  for prefix, n in (("train", 300), ("t10k", 100)):
    labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
    noise = rng.randint(-40, 41, (n, 28, 28))
    images = np.clip(templates[labels] + noise, 0, 255).astype(np.uint8)
    data.write_idx(d / f"{prefix}-images-idx3-ubyte.gz", images)
    data.write_idx(d / f"{prefix}-labels-idx1-ubyte.gz", labels)
  return d


def _smoke_config_fn(tiny_mnist_dir):
  from experiments.mnist.configs import quick  # pylint: disable=g-import-not-at-top

  def make(*rows, base=quick):
    c = base.get_config()
    c.data_dir = str(tiny_mnist_dir)
    c.num_val = 100
    c.seeds = (0,)
    c.batch_size = 200
    c.student.width = 16
    for stage in (c.student.alone, c.student.distill, c.omit3, c.only78,
                  c.soft3pct, c.sweep, c.logit_matching):
      stage.epochs = 1
    c.sweep.widths = (8,)
    c.sweep.temperatures = (20.0,)
    c.sweep.seeds = (0,)
    c.logit_matching.temperatures = (20.0,)
    if rows:
      c.rows = rows
    return c

  return make


@pytest.fixture
def smoke_config(tiny_mnist_dir, monkeypatch):
  """``rows -> config``: the demo config on tiny_mnist_dir, one step a row.

  ``base=`` another config module built on the demo's (ensemble_cpu).

  One seed, a 16-unit student, 200 training and 100 validation images,
  one epoch of one 200-image batch: checks the wiring in seconds.
  """
  monkeypatch.setenv("KDJAX_PROGRESS", "0")
  return _smoke_config_fn(tiny_mnist_dir)


@pytest.fixture(scope="session")
def smoke_run(tiny_mnist_dir, tmp_path_factory):
  """``(workdir, results)``: the demo's pipeline, the shipped teacher and
  row ``distilled_T20``, one step on tiny_mnist_dir (once per worker: the
  pipeline and fidelity smokes use it, and xdist may put them on both).

  One distilled row, the one fidelity.py reads; the student alone's row is
  the same code with the hard objective (every row: the integration tier's
  tests/test_pipeline_rows.py)."""
  from experiments.mnist import pipeline  # pylint: disable=g-import-not-at-top
  workdir = tmp_path_factory.mktemp("smoke_run")
  with pytest.MonkeyPatch.context() as m:
    m.setenv("KDJAX_PROGRESS", "0")
    config = _smoke_config_fn(tiny_mnist_dir)("distilled_T20")
    results = pipeline.run(config, str(workdir))
  return workdir, results


@pytest.fixture
def tiny_mnist(tiny_mnist_dir, monkeypatch):
  """tiny_mnist_dir, with 100 validation images as the default split.

  ``kdjax.paper.data.load_mnist_splits`` holds out 10,000 by default; here it
  holds out 100 of the 300, so code that loads MNIST with the default
  split (the examples) runs on these few images.
  """
  import functools  # pylint: disable=g-import-not-at-top
  from kdjax.paper import data  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(data, "load_mnist_splits", functools.partial(
      data.load_mnist_splits, num_val=100))
  monkeypatch.setenv("KDJAX_PROGRESS", "0")
  return tiny_mnist_dir
