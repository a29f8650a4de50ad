"""The shipped MNIST teacher is what its JSON says; distilling from it helps."""
import json
import pathlib

import jax
import numpy as np
import pytest

from kdjax import checkpoint
from kdjax.paper import data, models, provenance

ROOT = pathlib.Path(__file__).resolve().parents[1]
TEACHER = ROOT / "experiments" / "mnist" / "teacher" / "teacher_cpu.msgpack"


@pytest.fixture(scope="module")
def shipped():
  info = json.loads(TEACHER.with_suffix(".json").read_text())
  net = models.paper_teacher()
  params = checkpoint.load_params(
      TEACHER, models.init_params(net, jax.random.key(0), (1, 28, 28)))
  return net, params, info


def test_shipped_teacher_matches_its_record(shipped, mnist_dir):
  net, params, info = shipped
  assert TEACHER.stat().st_size <= 10 * 2**20
  assert provenance.params_sha256(params) == info["params_sha256"]
  assert models.count_params(params) == 2_395_210
  splits = data.load_mnist_splits(mnist_dir, as_float=False)
  apply = jax.jit(lambda p, x: net.apply({"params": p}, x))
  logits = apply(params, splits.test_images)
  errors = int(np.sum(np.argmax(logits, -1) != splits.test_labels))
  assert errors == info["test_errors"]
  val_logits = apply(params, splits.val_images)
  assert int(np.sum(np.argmax(val_logits, -1) != splits.val_labels)) == (
      info["val_errors"])


@pytest.mark.integration
def test_load_params_rejects_wrong_architecture(tmp_path):
  small = models.paper_student(30)
  with pytest.raises(ValueError,
                     match="wrong architecture|matching the expected"):
    checkpoint.load_params(
        TEACHER, models.init_params(small, jax.random.key(0), (1, 28, 28)))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    checkpoint.load_params(tmp_path / "nope.msgpack", {})
