"""The MNIST pipeline's rows end to end, and the bias-shift choice.

* The paper config (``configs/default.py``, the GPU command) at one epoch per
  stage: a teacher trained and saved in the run, every row, and the
  results.json schema of the issue (row names, per-row fields, hashes).
* The optional jittered rows: ``student_alone_jitter`` and
  ``distilled_T20_jitter`` train on ±2-pixel shifted images; the distilled
  one must query the teacher online (cached logits would be those of the
  unshifted images, and fit refuses them with augmentation).

One epoch: these check the wiring, not accuracy.
"""
import json
import pathlib

import pytest

from experiments.mnist import pipeline
from kdjax.paper import provenance


@pytest.mark.integration
def test_jitter_rows_use_the_online_teacher(quick_config, tmp_path):
  config = quick_config("student_alone_jitter", "distilled_T20_jitter")
  config.student.alone.epochs = 1
  config.student.distill.epochs = 1
  results = pipeline.run(config, str(tmp_path))
  rows = {r["name"]: r for r in results["rows"]}
  assert list(rows) == ["teacher", "student_alone_jitter",
                        "distilled_T20_jitter"]
  for name in ("student_alone_jitter", "distilled_T20_jitter"):
    assert rows[name]["jitter"] == 2
    # One epoch of SGD on 50k images: far better than chance (9,000 errors).
    assert rows[name]["test_errors"][0] < 1000, rows[name]
  # The distilled row's metrics come from the online teacher: the step
  # reports student/teacher agreement, which the hard-label row does not.
  metrics = [json.loads(l) for l in (pathlib.Path(tmp_path) / "students" /
             "distilled_T20_jitter" / "metrics.jsonl").read_text().splitlines()]
  assert metrics[-1]["agreement"][0] > 0.5
  recorded = json.loads(
      (pathlib.Path(tmp_path) / "students" / "distilled_T20_jitter" /
       "run_config.json").read_text())
  assert recorded["jitter"] == 2 and recorded["objective"] == "kd"


def test_bias_shift_is_chosen_on_validation_and_rounded():
  """The chosen shift minimises validation errors, ties go to the smallest
  |shift|, and float-stepped grids come back as their decimal values."""
  np = pytest.importorskip("numpy")
  # Class 1 examples whose logits trail class 0 by 0.3, 0.5 and 0.7: a shift
  # of class 1 by more than 0.7 fixes all three; class 0 examples lead by
  # 1.05, so a shift above 1.05 breaks them.
  logits = np.array([[0.3, 0.0], [0.5, 0.0], [0.7, 0.0],
                     [1.05, 0.0], [1.05, 0.0]])
  labels = np.array([1, 1, 1, 0, 0])
  grid = np.arange(0.0, 2.01, 0.1)
  shift = pipeline.choose_bias_shift(logits, labels, [1], grid)
  assert shift == 0.8  # 0.8, 0.9 and 1.0 tie at 0 errors; 0.8 is smallest
  assert pipeline.errors(pipeline.shifted(logits, [1], shift), labels) == 0
  # Already right: no shift beats doing nothing.
  assert pipeline.choose_bias_shift(logits[3:], labels[3:], [1], grid) == 0.0
  # np.arange(-15, 0, 0.2) holds -10.600000000000016; the one shift that
  # fixes the class-1 example without breaking the class-0 one is -10.6.
  grid = np.arange(-15.0, 0.01, 0.2)
  assert grid[22] != -10.6
  logits = np.array([[10.5, 0.0], [10.7, 0.0]])
  shift = pipeline.choose_bias_shift(logits, np.array([1, 0]), [0], grid)
  assert repr(shift) == "-10.6"


# The row names and per-row fields the issue's results.json schema fixes.
_TABLE_ROWS = ["teacher", "student_alone", "distilled_T20",
               "omit3_before_shift", "omit3_after_shift", "only78_before_shift",
               "only78_after_shift", "soft3pct_hard_labels",
               "soft3pct_soft_targets"]


@pytest.mark.integration
def test_paper_config_runs_end_to_end_with_the_issue_schema(mnist_dir, tmp_path,
                                                            monkeypatch):
  """configs/default.py (the GPU command) at one epoch per stage on the CPU:
  the teacher is trained and saved in the run, every row is produced, and
  results.json has the schema that readers of it rely on."""
  from experiments.mnist.configs import default  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv("KDJAX_PROGRESS", "0")
  c = default.get_config()
  c.data_dir = str(mnist_dir)
  c.seeds = (0, 1)
  c.teacher.epochs = 1
  c.teacher.eval_every = 1
  c.teacher.save_to = "teacher.msgpack"
  for stage in (c.student.alone, c.student.distill, c.omit3, c.only78,
                c.soft3pct, c.sweep, c.logit_matching):
    stage.epochs = 1
  c.sweep.widths = (30, 800)
  c.sweep.temperatures = (2.5, 20.0)
  c.sweep.seeds = (0,)
  c.logit_matching.temperatures = (20.0,)
  results = pipeline.run(c, str(tmp_path))

  on_disk = json.loads((tmp_path / "results.json").read_text())
  assert on_disk["rows"] == json.loads(json.dumps(results["rows"]))
  assert set(on_disk) == {"config", "git_commit", "jax_version", "device",
                         "environment", "command", "total_seconds", "rows",
                         "params_sha256"}
  assert on_disk["total_seconds"] > 0 and on_disk["config"]["seeds"] == [0, 1]
  names = [r["name"] for r in on_disk["rows"]]
  assert names == _TABLE_ROWS + [
      "sweep_w30_T2.5", "sweep_w30_T20", "sweep_w800_T2.5", "sweep_w800_T20",
      "logit_matching_caruana", "logit_matching_distill_T20"]
  rows = {r["name"]: r for r in on_disk["rows"]}
  for r in on_disk["rows"]:
    assert {"name", "test_errors", "paper_test_errors", "seconds"} <= set(r)
    n = 1 if r["name"] == "teacher" or r["name"].startswith("sweep_") else 2
    assert len(r["test_errors"]) == n, r["name"]
    assert len(r["val_errors"]) == n, r["name"]  # what choices are made on
    assert all(0 <= e <= 10_000 for e in r["test_errors"])
  assert [rows[k]["paper_test_errors"]
          for k in _TABLE_ROWS[:3]] == [67, 146, 74]
  assert rows["sweep_w800_T20"]["paper_test_errors"] is None
  trained = [n for n in names if n != "teacher" and not n.endswith(
      "_after_shift")]
  for name in trained:
    assert {"temperature", "alpha", "epochs"} <= set(rows[name]), name
  assert rows["distilled_T20"]["temperature"] == 20.0
  assert rows["distilled_T20"]["alpha"] == c.student.distill.alpha
  for name in ("omit3_before_shift", "omit3_after_shift"):
    assert len(rows[name]["errors_on_3"]) == 2
    assert all(0 <= e <= 1010 for e in rows[name]["errors_on_3"])
    assert rows[name]["paper_errors_on_3"] == (133 if "before" in name else 14)
  assert rows["omit3_before_shift"]["num_test_3s"] == 1010
  for name in ("only78_before_shift", "only78_after_shift"):
    assert rows[name]["test_error_rate"] == [e / 10_000 for e in
                                             rows[name]["test_errors"]]
  for name, paper in (("omit3_after_shift", 3.5), ("only78_after_shift", -7.6)):
    assert len(rows[name]["bias_shift"]) == 2
    assert rows[name]["paper_bias_shift"] == paper
    assert rows[name]["shift_chosen_on"] == "validation"
  for name in ("soft3pct_hard_labels", "soft3pct_soft_targets"):
    assert rows[name]["num_train"] == 1500  # 3% of 50k
  hashes = on_disk["params_sha256"]
  assert set(hashes) >= {"teacher", "student_alone", "distilled_T20",
                         "sweep_w30", "sweep_w800"}
  for name in trained:
    if not name.startswith("sweep_"):
      assert len(set(hashes[name])) == 2, name  # one per seed, not shared
  assert sorted(hashes["sweep_w800"]) == ["T2.5_seed0", "T20_seed0"]
  # The teacher was trained here, saved with its record, and is the one the
  # rows were distilled from (same hash).
  assert rows["teacher"]["source"] == "trained in this run"
  saved = json.loads((tmp_path / "teacher.json").read_text())
  assert saved["params_sha256"] == on_disk["params_sha256"]["teacher"]
  assert saved["test_errors"] == rows["teacher"]["test_errors"][0]
  for f in ("results.md", "table.png", "sweep_temperature.png",
            "teacher.msgpack"):
    assert (tmp_path / f).stat().st_size > 0, f
  assert not (tmp_path / "results.partial.json").exists()


@pytest.mark.integration
def test_an_interrupted_run_keeps_its_finished_rows(quick_config, tmp_path,
                                                    monkeypatch):
  config = quick_config("student_alone", "distilled_T20")
  config.student.alone.epochs = 1
  real = pipeline.train_students

  def interrupted(config, *, name, **kw):
    if name == "distilled_T20":
      raise KeyboardInterrupt  # e.g. a time limit on a lent accelerator
    return real(config, name=name, **kw)

  monkeypatch.setattr(pipeline, "train_students", interrupted)
  with pytest.raises(KeyboardInterrupt):
    pipeline.run(config, str(tmp_path))
  assert not (tmp_path / "results.json").exists()
  partial = json.loads((tmp_path / "results.partial.json").read_text())
  assert partial["partial"] is True
  assert [r["name"] for r in partial["rows"]] == ["teacher", "student_alone"]
  assert partial["rows"][1]["test_errors"][0] < 1000  # one real epoch
  assert set(partial["params_sha256"]) == {"teacher", "student_alone"}


@pytest.mark.integration
def test_student_dropout_is_recorded_and_used(quick_config, tmp_path):
  """The probe's student dropout reaches the model and every record."""
  from experiments.mnist import fidelity  # pylint: disable=g-import-not-at-top
  config = quick_config("distilled_T20")
  config.student.distill.epochs = 1
  plain = pipeline.run(config, str(tmp_path / "plain"))
  config.student.input_dropout = 0.1
  config.student.hidden_dropout = 0.25
  dropped = pipeline.run(config, str(tmp_path / "dropout"))
  row = dropped["rows"][1]
  assert row["name"] == "distilled_T20" and row["dropout"] == [0.1, 0.25]
  assert "dropout" not in plain["rows"][1]
  assert "student dropout 0.1 / 0.25" in (tmp_path / "dropout" /
                                          "results.md").read_text()
  recorded = json.loads((tmp_path / "dropout" / "students" / "distilled_T20" /
                         "run_config.json").read_text())
  assert recorded["dropout"] == [0.1, 0.25]
  # Same seed, same data order: only the masks differ, so do the students.
  assert (dropped["params_sha256"]["distilled_T20"] !=
          plain["params_sha256"]["distilled_T20"])
  # Evaluation is in inference mode: fidelity restores the dropout student
  # and finds the errors the run reported.
  f = fidelity.fidelity(tmp_path / "dropout", "distilled_T20")
  assert [m["test"]["errors"] for m in f["members"]] == row["test_errors"]


def test_smoke_demo_rows_one_step(smoke_run):
  """The demo's pipeline, one step a row on a few synthetic images.

  The unit tier's touch of the pipeline (the integration tests above run
  every row on real MNIST): its first rows, records and files.
  """
  tmp_path, results = smoke_run
  on_disk = json.loads((tmp_path / "results.json").read_text())
  assert on_disk["rows"] == json.loads(json.dumps(results["rows"]))
  assert [r["name"] for r in on_disk["rows"]] == ["teacher", "distilled_T20"]
  for r in on_disk["rows"]:
    assert len(r["test_errors"]) == 1, r["name"]
    assert 0 <= r["test_errors"][0] <= 100, r["name"]
  assert set(on_disk["params_sha256"]) == {"teacher", "distilled_T20"}
  assert on_disk["environment"]["cpu"] == provenance.environment()["cpu"]
  assert (tmp_path / "results.md").stat().st_size > 0
  assert not (tmp_path / "results.partial.json").exists()
