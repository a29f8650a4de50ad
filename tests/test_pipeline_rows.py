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
