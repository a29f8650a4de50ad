"""CI check of the demo's claim: distilling from the shipped teacher helps.

Same student (784-800-800-10), same budget (60 epochs over a seeded 3% subset
of the training split = 1,500 images), same optimiser: trained on hard labels
alone, then on the shipped teacher's soft targets (T=20, alpha=0.1). Soft
targets must give fewer validation *and* test errors (paper §6: soft targets
as a regulariser). The run is deterministic on CPU.
"""
import json
import pathlib

import pytest

from experiments.mnist import pipeline


@pytest.mark.integration
def test_soft_targets_beat_hard_labels_on_3pct(quick_config, tmp_path):
  config = quick_config("soft3pct")
  results = pipeline.run(config, str(tmp_path))
  rows = {r["name"]: r for r in results["rows"]}
  hard, soft = rows["soft3pct_hard_labels"], rows["soft3pct_soft_targets"]
  assert hard["num_train"] == soft["num_train"] == 1500
  assert soft["val_errors"][0] < 0.8 * hard["val_errors"][0], (hard, soft)
  assert soft["test_errors"][0] < 0.8 * hard["test_errors"][0], (hard, soft)
  saved = json.loads((pathlib.Path(tmp_path) / "results.json").read_text())
  assert [r["name"] for r in saved["rows"]] == [
      "teacher", "soft3pct_hard_labels", "soft3pct_soft_targets"]
