"""experiments/mnist/ensemble.py (§4): one step on a few synthetic images
(the unit tier), and end to end on real MNIST, tiny (the integration tier)."""
import json

import numpy as np
import pytest

from experiments.mnist import ensemble


def test_gain_kept():
  assert ensemble.gain_kept([100, 120], [80], [90, 100]) == pytest.approx(0.5)
  assert ensemble.gain_kept([100], [100], [90]) is None


def test_smoke_one_step_per_model(smoke_config, tmp_path):
  from experiments.mnist.configs import ensemble_cpu  # pylint: disable=g-import-not-at-top
  c = smoke_config(base=ensemble_cpu)
  e = c.ensemble
  e.num_members, e.width, e.epochs = 2, 8, 1
  e.grid_temperatures, e.grid_alphas = (4.0,), (0.7,)
  e.distill_seeds, e.alone_members = (0,), (0,)
  results = ensemble.run(c, str(tmp_path))
  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["rows"] == json.loads(json.dumps(results["rows"]))
  assert [r["name"] for r in saved["rows"]] == list(ensemble.ROW_NAMES)
  for r in saved["rows"]:
    assert all(0 <= x <= 100 for x in r["test_errors"]), r["name"]
  assert saved["environment"]["cpu"]


@pytest.mark.integration
def test_tiny_run_rows_and_schema(mnist_dir, tmp_path, monkeypatch):
  from experiments.mnist.configs import ensemble_cpu
  monkeypatch.setenv("KDJAX_PROGRESS", "0")
  c = ensemble_cpu.get_config()
  c.data_dir = str(mnist_dir)
  c.batch_size = 500
  e = c.ensemble
  e.num_members = 3
  e.width = 16
  e.epochs = 1
  e.grid_temperatures = (4.0,)
  e.grid_alphas = (0.1, 0.7)
  e.distill_seeds = (0, 1)
  e.alone_members = (0, 1)
  results = ensemble.run(c, str(tmp_path))

  saved = json.loads((tmp_path / "results.json").read_text())
  assert saved["rows"] == json.loads(json.dumps(results["rows"]))
  for key in ("config", "git_commit", "jax_version", "device", "environment",
              "command", "total_seconds", "rows", "params_sha256",
              "gain_kept"):
    assert key in saved, key
  by = {r["name"]: r for r in saved["rows"]}
  assert list(by) == list(ensemble.ROW_NAMES)
  assert len(by["ensemble_members"]["test_errors"]) == 3
  assert len(by["ensemble_mean_logits"]["test_errors"]) == 1
  assert len(by["ensemble_arithmetic"]["test_errors"]) == 1
  assert len(by["ensemble_distilled"]["test_errors"]) == 2
  assert by["student_alone"]["test_errors"] == (
      by["ensemble_members"]["test_errors"][:2])
  for r in saved["rows"]:
    assert len(r["val_errors"]) == len(r["test_errors"])
    assert all(0 <= x <= 10_000 for x in r["test_errors"])
  d = by["ensemble_distilled"]
  assert d["chosen_on"] == "validation"
  grid = {(g["temperature"], g["alpha"]): g["val_errors"] for g in d["grid"]}
  assert set(grid) == {(4.0, 0.1), (4.0, 0.7)}
  assert grid[(d["temperature"], d["alpha"])] == min(grid.values())
  # Distinct seeds give distinct members.
  assert len(set(saved["params_sha256"]["ensemble_members"])) == 3
  assert set(saved["gain_kept"]) == {"test_mean_logits", "test_arithmetic",
                                     "val_mean_logits", "val_arithmetic"}
  assert (tmp_path / "results.md").read_text().count("| ensemble_") == 4
  assert (tmp_path / "ensemble.png").stat().st_size > 0
  assert np.isfinite(saved["total_seconds"])
