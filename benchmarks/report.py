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
  versions = path.parent / "fit_versions_cpu.json"
  if versions.exists():  # benchmarks/fit_versions.py (the engine's goal).
    v = json.loads(versions.read_text())
    lines.append(
        f"| `fit` at `{v['git_commit'][:7]}` / `fit` at "
        f"`{v['baseline_commit'][:7]}` (before the engine), demo kd step, "
        f"one device | {v['new_vs_old_paired']:.3f} | >= 0.98 |")
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


def _gib(n: float) -> str:
  return f"{n / 2**30:.2f}"


def lm_step_table(path: pathlib.Path = RESULTS / "lm_step_cpu.json") -> str:
  """The whole LM step, chunked_kd against kd: time, memory, largest batch."""
  r = json.loads(path.read_text())
  lines = ["| V | time, logits -> chunked | compiled temporaries | "
           "compiled total | process peak RSS | largest batch in 24 GiB "
           "(logits / chunked) |", "| --- | --- | --- | --- | --- | --- |"]
  total = "argument_plus_output_plus_temp_minus_alias"
  for res in r["results"]:
    t, q = res["seconds"]["median"], res["ratios_chunked_over_logits"]
    m, rss = res["compiled_memory"], res["process_rss"]
    big = {f: v["largest_batch_in_24_GiB"]
           for f, v in res["largest_batch_24_GiB"].items()}
    lines.append(
        f"| {res['vocab']:,} | {t['logits']:.1f} s -> {t['chunked']:.1f} s "
        f"({q['time_median']:.2f}x) | "
        f"{_gib(m['logits']['temp_size_in_bytes'])} -> "
        f"{_gib(m['chunked']['temp_size_in_bytes'])} GiB "
        f"({q['compiled_temp']:.3f}) | {_gib(m['logits'][total])} -> "
        f"{_gib(m['chunked'][total])} GiB ({q['compiled_total']:.3f}) | "
        f"{_gib(rss['logits']['ru_maxrss_bytes'])} -> "
        f"{_gib(rss['chunked']['ru_maxrss_bytes'])} GiB "
        f"({q['process_ru_maxrss']:.2f}) | {big['logits']:,} / "
        f"~{round(big['chunked'], -3):,} sequences of "
        f"{r['config']['length']} |")
  lines.append(f"\nCommit `{r['git_commit'][:7]}` (its uncommitted changes "
               f"were docstrings), {r['machine']}.")
  return "\n".join(lines)


def lm_step_memory_table(
    path: pathlib.Path = RESULTS / "lm_step_cpu_memory.json") -> str:
  """Compiled memory of both LM-step forms at larger batches (not run)."""
  r = json.loads(path.read_text())
  total = "argument_plus_output_plus_temp_minus_alias"
  lines = ["| V | tokens | compiled temporaries | compiled total |",
           "| --- | --- | --- | --- |"]
  for row in r["memory_batches"]:
    m, q = row["compiled_memory"], row["ratios_chunked_over_logits"]
    lines.append(
        f"| {row['vocab']:,} | {row['tokens']:,} | "
        f"{_gib(m['logits']['temp_size_in_bytes'])} -> "
        f"{_gib(m['chunked']['temp_size_in_bytes'])} GiB "
        f"({q['compiled_temp']:.3f}) | {_gib(m['logits'][total])} -> "
        f"{_gib(m['chunked'][total])} GiB ({q['compiled_total']:.3f}) |")
  lines.append(f"\nCompiled only, commit `{r['git_commit'][:7]}`, "
               f"{r['machine']}.")
  return "\n".join(lines)


if __name__ == "__main__":
  print(headline())
  print()
  print(steps_table())
  print()
  print(chunked_table())
  print()
  print(lm_step_table())
