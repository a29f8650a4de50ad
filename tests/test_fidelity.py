"""experiments/mnist/fidelity.py: a run's students compared with its teacher."""
import json

import numpy as np
import pytest

from experiments.mnist import fidelity, pipeline


@pytest.mark.integration
def test_fidelity_restores_the_rows_students(quick_config, tmp_path):
  config = quick_config("distilled_T20")
  config.seeds = (0, 1)
  config.student.distill.epochs = 1
  results = pipeline.run(config, str(tmp_path))
  rows = {r["name"]: r for r in results["rows"]}
  out = tmp_path / "fidelity.json"
  assert fidelity.main([str(tmp_path), "distilled_T20", "--out", str(out)]) == 0
  f = json.loads(out.read_text())
  assert f["row"] == "distilled_T20" and f["width"] == 800
  assert [m["seed"] for m in f["members"]] == [0, 1]
  # The restored members are the ones the run evaluated, in order, and the
  # teacher is the run's: the same error counts as results.json.
  assert [m["test"]["errors"] for m in f["members"]] == \
      rows["distilled_T20"]["test_errors"]
  assert [m["val"]["errors"] for m in f["members"]] == \
      rows["distilled_T20"]["val_errors"]
  assert f["teacher"]["test"]["errors"] == rows["teacher"]["test_errors"][0]
  for m in f["members"]:
    for split, n in (("transfer", 50_000), ("val", 10_000), ("test", 10_000)):
      s = m[split]
      # Every image the two classify differently counts once: the student's
      # and teacher's error counts differ by at most the disagreements.
      assert abs(s["errors"] - f["teacher"][split]["errors"]) <= \
          s["disagreements"] < n
      assert s["kl_T20"] > 0 and s["logit_rmse"] > 0


def test_smoke_fidelity_of_a_one_step_run(smoke_run, tmp_path):
  """fidelity.py on a one-step run on a few synthetic images."""
  workdir, results = smoke_run
  out = tmp_path / "fidelity.json"
  assert fidelity.main([str(workdir), "distilled_T20", "--out", str(out)]) == 0
  f = json.loads(out.read_text())
  row = {r["name"]: r for r in results["rows"]}["distilled_T20"]
  assert [m["test"]["errors"] for m in f["members"]] == row["test_errors"]
  assert f["members"][0]["transfer"]["disagreements"] <= 200


def test_stats_match_a_float64_reference():
  rng = np.random.RandomState(0)
  teacher = (rng.randn(500, 10) * 9).astype(np.float32)
  student = (teacher + rng.randn(500, 10) + 3.0).astype(np.float32)
  labels = rng.randint(0, 10, 500)
  got = fidelity._stats(student, teacher, labels)  # pylint: disable=protected-access
  z, v = student.astype(np.float64) / 20, teacher.astype(np.float64) / 20
  log_p = v - v.max(-1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
  log_q = z - z.max(-1, keepdims=True)
  log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
  kl = 400 * np.sum(np.exp(log_p) * (log_p - log_q), -1).mean()
  d = (student - student.mean(-1, keepdims=True)).astype(np.float64) - (
      teacher - teacher.mean(-1, keepdims=True))
  assert got["errors"] == int(np.sum(student.argmax(-1) != labels))
  assert got["disagreements"] == int(np.sum(student.argmax(-1) !=
                                            teacher.argmax(-1)))
  assert 0 < got["disagreements"] < 500
  np.testing.assert_allclose(got["kl_T20"], kl, rtol=1e-3)
  # The constant +3 on every logit is invisible to a softmax: zero-meaned.
  np.testing.assert_allclose(got["logit_rmse"], np.sqrt(np.mean(d ** 2)),
                             rtol=1e-3)


def test_fidelity_of_a_missing_row_names_the_folder(tmp_path):
  (tmp_path / "run_config.json").write_text("{}")
  with pytest.raises(FileNotFoundError, match=r"students/nope/run_config.json"):
    fidelity.fidelity(tmp_path, "nope")
