"""The worked examples: one step on a few synthetic images (the unit tier),
and end to end at a tiny size on real MNIST (the integration tier)."""

import json

import pytest


@pytest.mark.integration
@pytest.mark.parametrize("name", ["bn_cnn_linen", "bn_cnn_nnx"])
def test_batchnorm_example_tiny(name, mnist_dir, tmp_path, monkeypatch):
  monkeypatch.setenv("KDJAX_PROGRESS", "0")
  module = __import__(f"examples.{name}", fromlist=["main"])
  out = tmp_path / "results.json"
  results = module.main(["--tiny", "--data-dir", str(mnist_dir),
                         "--out", str(out)])
  assert json.loads(out.read_text()) == json.loads(json.dumps(results))
  rows = {r["name"]: r for r in results["rows"]}
  assert set(rows) == {"teacher", "student_alone", "student_distilled"}
  for row in rows.values():
    assert all(0 <= e <= 1000 for e in row["test_errors"])
  stats = rows["student_distilled"]["batch_stats"]
  # The statistics moved in training, and evaluation reads them: the
  # initial ones give other predictions.
  assert min(stats["rms_change_in_training"]) > 0
  assert stats["test_errors_with_initial_stats"] != rows[
      "student_distilled"]["test_errors"]
  assert results["tuning"]["chosen_on"] == "validation"


@pytest.mark.integration
def test_grain_example_kills_resumes_and_reports(mnist_dir, tmp_path):
  from examples import grain_mnist  # pylint: disable=g-import-not-at-top
  out = tmp_path / "grain.json"
  results = grain_mnist.main([
      "--data-dir", str(mnist_dir), "--out", str(out), "--workdir",
      str(tmp_path / "work"), "--epochs", "2", "--train-limit", "2560",
      "--checkpoint-every-steps", "5", "--quiet"])
  assert results["steps"] == 2 * 20
  # Killed after a mid-epoch checkpoint of epoch 2, then resumed from it.
  assert results["resumed_from_step"] >= 25
  assert results["resumed_from_step"] % 20
  assert results["test_errors"] < 5000
  assert results["throughput"]["host_grain_steps_per_s"] > 0
  assert json.loads(out.read_text())["params_sha256"] == results[
      "params_sha256"]


@pytest.mark.parametrize("name", ["bn_cnn_linen", "bn_cnn_nnx"])
def test_smoke_batchnorm_example_one_step(name, tiny_mnist, tmp_path,
                                         monkeypatch):
  module = __import__(f"examples.{name}", fromlist=["main"])
  # The student's net as the teacher's: its steps and predictions are then
  # the student's, compiled once (the real sizes: tests/test_examples.py's
  # integration tests).
  if name == "bn_cnn_linen":
    monkeypatch.setattr(module, "TEACHER", module.STUDENT)
  else:
    net = module.BNCNN
    monkeypatch.setattr(module, "BNCNN", lambda features, dense, *, rngs:
                        net((8, 16), 32, rngs=rngs))
  out = tmp_path / "results.json"
  results = module.main(["--tiny", "--data-dir", str(tiny_mnist),
                         "--batch-size", "200", "--temperatures", "2.0",
                         "--out", str(out)])
  assert json.loads(out.read_text()) == json.loads(json.dumps(results))
  rows = {r["name"]: r for r in results["rows"]}
  assert set(rows) == {"teacher", "student_alone", "student_distilled"}
  for row in rows.values():
    assert all(0 <= e <= 100 for e in row["test_errors"])
  assert results["environment"]["cpu"]


def test_smoke_grain_example_one_step(tiny_mnist, tmp_path):
  """The example's training run (its child process's part), in process."""
  from examples import grain_mnist  # pylint: disable=g-import-not-at-top
  result = grain_mnist.main([
      "--child", "--quiet", "--data-dir", str(tiny_mnist), "--workdir",
      str(tmp_path / "work"), "--epochs", "1", "--batch-size", "200",
      "--checkpoint-every-steps", "1"])
  assert result["steps"] == 1
  assert 0 <= result["test_errors"] <= 100
  assert (tmp_path / "work" / "checkpoints" / "1").is_dir()
