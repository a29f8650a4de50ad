"""The README's headline benchmark table, from the committed train-step JSON.

  python benchmarks/report.py

``tests/test_readme.py`` checks that the README holds this table as printed.
"""

from __future__ import annotations

import json
import pathlib

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def headline(path: pathlib.Path = RESULTS / "train_step_cpu.json") -> str:
  r = json.loads(path.read_text())
  lines = ["| measured | ratio | goal |", "| --- | --- | --- |",
           f"| kdjax online step / hand-written `lax.scan` (paper MLPs, "
           f"batch {r['batch_size']}) | {r['online_vs_handwritten']:.3f} "
           "| >= 0.97 |",
           f"| cached teacher logits / student alone | "
           f"{r['cached_vs_student_only']:.3f} | >= 0.9 |"]
  fp = r.get("fit_paths")
  if fp:
    lines += [
        f"| `fit` on host batches (grain, prefetch, blocks of 16) / "
        f"`fit` on device-resident data, paper MLP kd step | "
        f"{fp['host_vs_device']:.3f} | >= 0.95 |",
        f"| `fit(loop=\"auto\")` ({fp['cnn_auto_chose']}) / best of scan "
        f"and loop, `kdjax.paper.models.CNN` | {fp['cnn_auto_vs_best']:.3f} "
        "| >= 0.9 |",
        f"| CNN: loop of jitted steps / whole-epoch `lax.scan` on XLA:CPU | "
        f"{fp['cnn_steps_vs_scan']:.1f} | (why `auto` picks the loop) |"]
  lines.append(f"\nCommit `{r['git_commit'][:7]}`, {r['device']}, jax "
               f"{r['jax_version']}.")
  return "\n".join(lines)


def steps_table(path: pathlib.Path = RESULTS / "train_step_cpu.json") -> str:
  """Steps/s of every implementation, and vs the hand-written scan."""
  r = json.loads(path.read_text())
  hw = r["handwritten_scan_steps_per_s"]
  names = {"kdjax_online": "kdjax, online teacher (on-device epoch)",
           "kdjax_cached": "kdjax, cached teacher logits",
           "kdjax_student_only": "kdjax, student only (hard labels)",
           "handwritten_scan": "hand-written whole-epoch `lax.scan` "
                               "(online teacher)",
           "python_loop": "Python loop of a jitted kdjax step, host batches",
           "torch_eager": "PyTorch eager"}
  lines = ["| implementation | steps/s | vs hand-written `lax.scan` |",
           "| --- | --- | --- |"]
  for key, label in names.items():
    v = r.get(f"{key}_steps_per_s")
    lines.append(f"| {label} | not installed | |" if v is None else
                 f"| {label} | {v:.0f} | {v / hw:.3f} |")
  fp = r.get("fit_paths")
  if fp:
    sp = fp["steps_per_s"]
    lines += [
        f"| `fit`, device-resident data, kd cached (MLP) | "
        f"{sp['mlp_device_scan']:.0f} | |",
        f"| `fit`, host batches through grain (MLP) | "
        f"{sp['mlp_host_grain']:.0f} | |",
        f"| `fit(loop='scan')`, `models.CNN` | {sp['cnn_scan']:.1f} | |",
        f"| `fit(loop='steps')`, `models.CNN` | {sp['cnn_steps']:.1f} | |",
        f"| `fit(loop='auto')`, `models.CNN` | {sp['cnn_fit_auto']:.1f} | |"]
  return "\n".join(lines)


def chunked_table(path: pathlib.Path = RESULTS / "chunked_loss_cpu.json"
                  ) -> str:
  """Chunked / unchunked value-and-grad: time and memory ratios."""
  r = json.loads(path.read_text())
  lines = ["| V | tokens | chunk | time | compiled temporaries | "
           "compiled total | process RSS increase |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
  for res in r["results"]:
    tokens = res.get("tokens", r["tokens"])  # Older JSONs: one N for all.
    for name, q in res["ratios_chunked_over_unchunked"].items():
      lines.append(
          f"| {res['vocab']:,} | {tokens:,} | {name.split('_')[-1]} | "
          f"{q['time_median']:.2f}x | {q['compiled_temp']:.3f} | "
          f"{q['compiled_total']:.2f} | "
          f"{q['process_rss_increase_during_call']:.2f} |")
  lines.append(f"\nHidden width {r['hidden']}, float32, commit "
               f"`{r['git_commit'][:7]}`, {r['machine']}.")
  return "\n".join(lines)


if __name__ == "__main__":
  print(headline())
  print()
  print(steps_table())
  print()
  print(chunked_table())
