"""The optional jittered rows of the MNIST pipeline run end to end.

``student_alone_jitter`` and ``distilled_T20_jitter`` train on ±2-pixel
shifted images; the distilled one must query the teacher online (cached
logits would be those of the unshifted images, and fit refuses them with
augmentation). One epoch, one seed: this checks the wiring, not accuracy.
"""
import json
import pathlib

import pytest

from experiments.mnist import pipeline


@pytest.mark.slow
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
  recorded = json.loads((pathlib.Path(tmp_path) / "students" /
                         "distilled_T20_jitter" / "run_config.json").read_text())
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
