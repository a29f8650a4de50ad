"""Markdown tables of the examples' committed results (for the README).

  python -m examples.report

``tests/test_readme.py`` checks that the README holds these tables as
printed here, so every example figure in it comes from a committed JSON.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def _mean_std(values) -> str:
  values = np.asarray(values, np.float64)
  if values.size == 1:
    return f"{values[0]:.0f}"
  return f"{values.mean():.1f} ± {values.std(ddof=1):.1f}"


def batchnorm_table() -> str:
  """Teacher / alone / distilled for the linen and NNX BatchNorm examples."""
  lines = ["| framework | teacher | student alone | student distilled "
           "| distilled, initial BN statistics | T (chosen on validation) |",
           "| --- | --- | --- | --- | --- | --- |"]
  for name in ("bn_cnn_linen_cpu", "bn_cnn_nnx_cpu"):
    r = json.loads((RESULTS / f"{name}.json").read_text())
    rows = {row["name"]: row for row in r["rows"]}
    d = rows["student_distilled"]
    lines.append(
        f"| {r['example'].split('(')[-1].rstrip(')')} "
        f"| {_mean_std(rows['teacher']['test_errors'])} "
        f"| {_mean_std(rows['student_alone']['test_errors'])} "
        f"| {_mean_std(d['test_errors'])} "
        f"| {_mean_std(d['batch_stats']['test_errors_with_initial_stats'])} "
        f"| {r['tuning']['temperature']:g} |")
  return "\n".join(lines)


def grain_summary() -> str:
  """One paragraph of the host-data example's committed run."""
  r = json.loads((RESULTS / "grain_mnist_cpu.json").read_text())
  t = r["throughput"]
  return (
      f"Killed with SIGKILL after its checkpoint at step "
      f"{r['resumed_from_step']} (epoch 2, step "
      f"{r['resumed_from_step'] - r['steps_per_epoch']}), resumed, and "
      f"finished {r['epochs']} epochs ({r['steps']} steps): "
      f"**{r['test_errors']} test errors** ({r['val_errors']} on "
      f"validation). Throughput of the same step (online teacher, jitter): "
      f"{t['host_grain_steps_per_s']:.0f} steps/s from the grain pipeline, "
      f"{t['device_resident_steps_per_s']:.0f} on device-resident data "
      f"({t['host_vs_device']:.2f}x).")


def char_lm_table() -> str:
  """Every row of the character-level LM example (bits per character)."""
  r = json.loads((RESULTS / "char_lm_cpu.json").read_text())
  tuning = r["tuning"].get("rows", {})

  def bpc(values) -> str:
    values = np.asarray(values, np.float64)
    if values.size == 1:
      return f"{values[0]:.3f}"
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"

  lines = ["| row | T | alpha (hard-label weight) | validation BPC "
           "| test BPC |", "| --- | --- | --- | --- | --- |"]
  for row in r["rows"]:
    name = row["name"].removeprefix("student_").replace("_", " ")
    chosen = tuning.get(row["name"], {})
    t = "" if row["objective"] in ("hard", "logit_matching") else (
        f"{chosen.get('temperature', row.get('temperature')):g}")
    a = "" if row["objective"] == "hard" else (
        f"{chosen.get('alpha', row.get('alpha')):g}")
    lines.append(f"| {name} | {t} | {a} | {bpc(row['val_bpc'])} "
                 f"| {bpc(row['test_bpc'])} |")
  return "\n".join(lines)


def main() -> None:
  print(batchnorm_table())
  print()
  print(grain_summary())
  print()
  print(char_lm_table())


if __name__ == "__main__":
  main()
