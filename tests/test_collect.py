"""experiments/mnist/collect.py: gathering runs into one tuning record."""
import json

import pytest

from experiments.mnist import collect


def _run(path, rows, curve=None):
  path.mkdir(parents=True)
  (path / "results.json").write_text(json.dumps({
      "command": "python -m experiments.mnist.main ...", "git_commit": "abc",
      "device": "cpu", "total_seconds": 1.0, "rows": rows}))
  if curve is not None:
    (path / "teacher").mkdir()
    (path / "teacher" / "metrics.jsonl").write_text("\n".join(
        json.dumps(m) for m in curve))


def test_collect_keeps_validation_and_test_errors(tmp_path):
  _run(tmp_path / "a", [{"name": "distilled_T20", "val_errors": [94],
                         "test_errors": [87], "alpha": 0.7, "seconds": 3.0,
                         "params_sha256": "x"},
                        {"name": "soft3pct_soft_targets", "val_errors": [9],
                         "test_errors": [8], "num_train": 40000}])
  _run(tmp_path / "t", [{"name": "teacher", "val_errors": [77],
                         "test_errors": [63], "source": "trained"}],
       curve=[{"epoch": 1, "loss": 1.0}, {"epoch": 10, "val_errors": 80}])
  out = tmp_path / "tuning.json"
  collect.main([str(tmp_path / "a"), str(tmp_path / "t"), "--out", str(out),
                "--note", "why"])
  record = json.loads(out.read_text())
  assert record["note"] == "why" and "validation" in record["chosen_on"]
  a, t = record["runs"]
  assert a["workdir"] == "a" and a["rows"] == [
      {"name": "distilled_T20", "val_errors": [94], "test_errors": [87],
       "alpha": 0.7},
      {"name": "soft3pct_soft_targets", "val_errors": [9], "test_errors": [8],
       "num_train": 40000}]
  assert "teacher_val_errors_by_epoch" not in a
  assert t["teacher_val_errors_by_epoch"] == {"10": 80}
  assert t["rows"][0]["source"] == "trained"


def test_collect_names_a_workdir_without_results(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"results\.json does not exist.*"
                     r"finished run"):
    collect.collect([tmp_path])


def test_append_adds_runs_and_replaces_a_rerun(tmp_path, capsys):
  row = lambda v: [{"name": "distilled_T20", "val_errors": [v],
                    "test_errors": [v]}]
  _run(tmp_path / "old" / "a", row(1))
  _run(tmp_path / "old" / "b", row(2))
  out = tmp_path / "tuning.json"
  collect.main([str(tmp_path / "old" / "a"), str(tmp_path / "old" / "b"),
                "--out", str(out), "--note", "first."])
  _run(tmp_path / "new" / "b", row(20))
  _run(tmp_path / "new" / "c", row(3))
  collect.main([str(tmp_path / "new" / "b"), str(tmp_path / "new" / "c"),
                "--out", str(out), "--note", "second.", "--append"])
  record = json.loads(out.read_text())
  assert record["note"] == "first. second."
  assert [(r["workdir"], r["rows"][0]["val_errors"]) for r in record["runs"]] \
      == [("a", [1]), ("b", [20]), ("c", [3])]
  assert not list(tmp_path.glob("*.tmp"))
  assert "replacing the record's entry 'b'" in capsys.readouterr().err


def test_append_needs_an_existing_record(tmp_path):
  _run(tmp_path / "a", [{"name": "teacher", "val_errors": [1],
                         "test_errors": [1]}])
  with pytest.raises(SystemExit, match="does not exist; drop --append"):
    collect.main([str(tmp_path / "a"), "--out", str(tmp_path / "x.json"),
                  "--append"])
