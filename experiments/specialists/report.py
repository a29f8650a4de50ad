"""results.json -> results.md (the paper's Tables 2-4 beside ours) and a plot.

  python -m experiments.specialists.report WORKDIR   # redraws from results.json
"""

from __future__ import annotations

import json
import pathlib
import sys

import numpy as np

from experiments.mnist import report as mnist_report
from kdjax import checkpoint

# Hinton, Vinyals & Dean 2015, JFT (Tables 3 and 4), transcribed by hand:
# check against the paper before quoting.
PAPER_TABLE3 = {"generalist": (0.250, 0.431),  # (test, conditional) accuracy
                "generalist_plus_specialists": (0.261, 0.459)}
PAPER_TABLE4 = {0: 0.0, 1: 0.034, 2: 0.074, 3: 0.088, 4: 0.105, 5: 0.111,
                6: 0.113, 7: 0.128, 8: 0.136, 9: 0.166}  # 10 or more: 14.1%
ROWS = ("generalist", "generalist_plus_specialists",
        "generalist_plus_soft_specialists")


def _fmt(values, scale=1.0, digits=1) -> str:
  v = scale * np.asarray([x for x in values if x is not None], float)
  if v.size == 0:
    return "—"
  if v.size == 1:
    return f"{v[0]:.{digits}f}"
  return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def _pair(c: int) -> str:
  return f"{c:02d}"


def by_covering_totals(seeds, key=None) -> list[dict]:
  """Table 4 summed over seeds (``key="soft"`` for the soft row)."""
  tot = {}
  for r in seeds:
    for row in (r[key] if key else r)["by_covering"]:
      t = tot.setdefault(row["num_covering"], [0, 0, 0])
      t[0] += row["num_test"]
      t[1] += row["generalist_correct"]
      t[2] += row["combined_correct"]
  return [{"num_covering": k, "num_test": n, "generalist_correct": g,
           "combined_correct": c, "delta_correct": c - g,
           "relative_accuracy_change": (c - g) / g if g else None}
          for k, (n, g, c) in sorted(tot.items())]


def markdown(results: dict) -> str:
  by = {r["name"]: r for r in results["rows"]}
  n_test = by["generalist"]["num_test"]
  seeds = results["seeds"]
  ch = results["choice"]
  lines = [
      f"Device: {results['device']}; jax {results.get('jax_version')}; "
      f"commit {results['git_commit']}; total {results['total_seconds']} s; "
      f"command `{results.get('command')}`.",
      "",
      f"Chosen on {results['chosen_on']} (test never used): "
      f"{ch['num_clusters']} clusters (k-means on "
      f"{'unit-normalised' if ch['normalize_columns'] else 'raw'} "
      f"covariance columns), top_n={ch['top_n']}, "
      f"{ch['num_steps']} eq.-5 steps; soft specialists T={ch['temperature']:g}"
      f", top_n={ch['soft_top_n']}.",
      "",
      "**Test errors and conditional accuracy (cf. paper Table 3)**, "
      f"{len(seeds)} seeds, mean ± std; {n_test} test pairs, 100 classes.",
      "",
      "| row | test errors | test accuracy | conditional accuracy | "
      "validation errors | paper (JFT) test / conditional accuracy |",
      "| --- | --- | --- | --- | --- | --- |"]
  paper = {"generalist": "25.0% / 43.1% (baseline)",
           "generalist_plus_specialists": "26.1% / 45.9% (61 specialists)",
           "generalist_plus_soft_specialists": "— (proposed in §6, not run)"}
  for name in ROWS:
    r = by[name]
    acc = [1 - e / n_test for e in r["test_errors"]]
    lines.append(
        f"| {name} | {_fmt(r['test_errors'])} | {_fmt(acc, 100)}% | "
        f"{_fmt(r['conditional_accuracy'], 100)}% | {_fmt(r['val_errors'])} "
        f"| {paper[name]} |")
  lines += ["", "Conditional accuracy: on the test pairs whose true class is "
            "in an active specialist's subset (per row's active set; "
            f"{_fmt(by['generalist_plus_specialists']['num_conditional'])} "
            "pairs for the dustbin row).", ""]

  for key, title in ((None, "dustbin specialists"),
                     ("soft", "soft (full-softmax) specialists")):
    lines += [f"**Gain by number of active specialists covering the true "
              f"class (cf. paper Table 4), {title}**, summed over seeds.", "",
              "| # covering | # test pairs | generalist correct | combined "
              "correct | change | relative accuracy change | paper |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in by_covering_totals(seeds, key):
      k = row["num_covering"]
      rel = row["relative_accuracy_change"]
      p = PAPER_TABLE4.get(k, 0.141 if k >= 10 else None)
      lines.append(
          f"| {k} | {row['num_test']} | {row['generalist_correct']} | "
          f"{row['combined_correct']} | {row['delta_correct']:+d} | "
          f"{'—' if rel is None else f'{100 * rel:+.1f}%'} | "
          f"{'—' if p is None else f'{100 * p:+.1f}%'} |")
    lines.append("")

  s0 = seeds[0]
  lines += [f"**Clusters found (cf. paper Table 2)**, seed {s0['seed']}: "
            "k-means on the covariance of the generalist's validation "
            "probabilities; class `ab` = left digit a, right digit b.", "",
            "| specialist | classes |", "| --- | --- |"]
  for m, sub in enumerate(s0["subsets"]):
    lines.append(f"| {m} | {' '.join(_pair(c) for c in sub)} |")
  sel = s0.get("selection") or {}
  if sel:
    lines += ["", "**Validation grid** (seed "
              f"{sel['seed']}; errors of the combination on the validation "
              "pairs):", "",
              "| normalised columns | num_clusters | top_n | num_steps | "
              "val errors |", "| --- | --- | --- | --- | --- |"]
    for g in sel["grid"]:
      lines.append(f"| {g['normalize_columns']} | {g['num_clusters']} | "
                   f"{g['top_n']} | "
                   f"{g['num_steps']} | {g['val_errors']} |")
    lines += ["", "| soft T | top_n | val errors |", "| --- | --- | --- |"]
    for g in sel["soft_grid"]:
      lines.append(f"| {g['temperature']:g} | {g['top_n']} | "
                   f"{g['val_errors']} |")
  lines.append("")
  return "\n".join(lines)


def plot(results: dict, path: pathlib.Path) -> bool:
  plt = mnist_report.pyplot()
  if plt is None:
    return False
  by = {r["name"]: r for r in results["rows"]}
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
  for i, name in enumerate(ROWS):
    v = np.asarray(by[name]["test_errors"], float)
    a1.scatter(np.full(v.size, i), v, zorder=3)
    a1.hlines(v.mean(), i - 0.3, i + 0.3, color="k")
  a1.set_xticks(range(3), ["generalist", "+ specialists\n(dustbin)",
                           "+ soft\nspecialists"])
  a1.set_ylabel(f"test errors (of {by['generalist']['num_test']} pairs)")
  a1.set_title("100-class MNIST pairs (per seed; line = mean)", fontsize=9)
  a1.grid(True, axis="y", alpha=0.3)
  _table4_panel(a2, [(label, by_covering_totals(results["seeds"], key))
                     for key, label in ((None, "dustbin"), ("soft", "soft"))])
  mnist_report.save_figure(fig, path)
  return True


def _table4_panel(ax, totals) -> None:
  """Paper Table 4's panel: the relative accuracy change by the number of
  active specialists covering the true class, one bar series per
  ``(label, by_covering_totals rows)`` in ``totals``, beside the paper's."""
  width = 0.4
  for j, (label, t) in enumerate(totals):
    ks = [r["num_covering"] for r in t]
    rel = [100 * (r["relative_accuracy_change"] or 0.0) for r in t]
    ax.bar(np.asarray(ks) + (j - 0.5) * width, rel, width, label=label)
  pk = list(PAPER_TABLE4)
  ax.plot(pk, [100 * PAPER_TABLE4[k] for k in pk], "k.--",
          label="paper (JFT)")
  ax.set_xlabel("# active specialists covering the true class")
  ax.set_ylabel("relative accuracy change (%)")
  ax.set_title("cf. paper Table 4", fontsize=9)
  ax.legend()
  ax.grid(True, axis="y", alpha=0.3)


def write_all(results: dict, workdir: pathlib.Path) -> None:
  workdir = pathlib.Path(workdir)
  md = markdown(results)
  checkpoint.write_atomic(workdir / "results.md", md)
  plot(results, workdir / "specialists.png")
  print(md, flush=True)


# ----------------------------------------------------------------------------
# The paper's regime (experiments/specialists/regime.py).
# ----------------------------------------------------------------------------

REGIME_LABELS = {
    "generalist": "generalist",
    "generalist_plus_specialists": "+ dustbin specialists (eq. 5)",
    "generalist_plus_soft_specialists": "+ soft specialists (§6)",
    "control_compute": "control: generalist, + the specialists' compute",
    "control_wide": "control: wide generalist, the system's params and "
                    "compute"}
REGIME_PAPER = {"generalist": "25.0% / 43.1%",
                "generalist_plus_specialists": "26.1% / 45.9%"}


def _mse(values, scale=1.0, digits=1) -> str:
  """``mean ± SE (per-seed values)``."""
  v = scale * np.asarray(values, float)
  each = ", ".join(f"{x:.{digits}f}" for x in v)
  if v.size == 1:
    return f"{v[0]:.{digits}f}"
  se = v.std(ddof=1) / np.sqrt(v.size)
  return f"{v.mean():.{digits}f} ± {se:.{digits}f} ({each})"


def regime_table(results: dict) -> str:
  """Paper Table 3's rows: test errors, accuracy, conditional accuracy."""
  n = results["rows"][0]["num_test"]
  lines = ["| row | test errors, mean ± SE (per seed) | test accuracy | "
           "conditional accuracy | validation errors | paper (JFT) test / "
           "conditional accuracy |", "| --- | --- | --- | --- | --- | --- |"]
  for r in results["rows"]:
    acc = [100 * (1 - e / n) for e in r["test_errors"]]
    lines.append(
        f"| {REGIME_LABELS.get(r['name'], r['name'])} | "
        f"{_mse(r['test_errors'])} | {np.mean(acc):.2f}% | "
        f"{100 * np.mean(r['conditional_accuracy']):.2f}% | "
        f"{_mse(r['val_errors'])} | {REGIME_PAPER.get(r['name'], '—')} |")
  return "\n".join(lines)


def differences_table(results: dict) -> str:
  lines = ["| difference in errors | split | per seed | mean ± SE | "
           "95% t interval |", "| --- | --- | --- | --- | --- |"]
  for d in results["paired_differences"]:
    ci = d["ci95"]
    lines.append(
        f"| {REGIME_LABELS.get(d['a'], d['a'])} − "
        f"{REGIME_LABELS.get(d['b'], d['b'])} | {d['split']} | "
        f"{', '.join(f'{x:+d}' for x in d['per_seed'])} | "
        f"{d['mean']:+.1f} ± {d['se'] or 0:.1f} | "
        + ("—" if ci is None else f"[{ci[0]:+.1f}, {ci[1]:+.1f}]") + " |")
  return "\n".join(lines)


def _covering_table(seeds, key: str) -> list[str]:
  tot = by_covering_totals([{"by_covering": r[key]} for r in seeds])
  lines = ["| # covering | # test pairs | generalist correct | combined "
           "correct | change | relative accuracy change | paper |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
  for row in tot:
    k, rel = row["num_covering"], row["relative_accuracy_change"]
    p = PAPER_TABLE4.get(k, 0.141 if k >= 10 else None)
    lines.append(
        f"| {k} | {row['num_test']} | {row['generalist_correct']} | "
        f"{row['combined_correct']} | {row['delta_correct']:+d} | "
        f"{'—' if rel is None else f'{100 * rel:+.1f}%'} | "
        f"{'—' if p is None else f'{100 * p:+.1f}%'} |")
  return lines


def regime_markdown(results: dict) -> str:
  seeds, ch = results["seeds"], results["choice"]
  s0 = seeds[0]
  c = results["config"]
  lines = [
      f"Device: {results['device']}; jax {results.get('jax_version')}; "
      f"commit {results['git_commit']}; total {results['total_seconds']} s"
      f"{'; ' + results['cpu_note'] if results.get('cpu_note') else ''}; "
      f"command `{results.get('command')}`.", "",
      f"Generalist: {c['generalist']['model']['kind']} "
      f"{s0['params']['generalist']:,} parameters, "
      f"{s0['train_examples']['generalist']:,} fresh training pairs; "
      f"errors on {s0['num_fresh_train']:,} fresh training pairs "
      f"{_mse([r['generalist_fresh_train_errors'] for r in seeds])} against "
      f"{_mse([r['rows']['val']['generalist'][0] for r in seeds])} on the "
      "validation pairs (training error well above zero: it underfits; "
      "the gap to validation: the images it has seen).",
      f"Specialists: {len(s0['subsets'])} ({ch['family']}), each "
      f"{s0['params']['specialists'][0]:,}-"
      f"{max(s0['params']['specialists']):,} parameters, "
      f"{s0['train_examples']['per_specialist']:,} fresh pairs each, "
      "half from its subset.",
      f"Chosen on {results['chosen_on']} (test never used): family "
      f"{ch['family']}, top_n={ch['top_n']}; soft specialists "
      f"T={ch['temperature']:g}, top_n={ch['soft_top_n']}.", "",
      f"**Test errors and conditional accuracy (cf. paper Table 3)**, "
      f"{len(seeds)} seeds, {results['rows'][0]['num_test']:,} test pairs.",
      "", regime_table(results), "",
      "Conditional accuracy: on the test pairs whose true class is in an "
      "active specialist's subset (the dustbin row's active set for the "
      "generalist and the controls).", "",
      "**Paired differences** (same seed; negative: fewer errors).", "",
      differences_table(results), ""]
  for key, title in (("by_covering", "dustbin specialists"),
                     ("soft_by_covering", "soft specialists")):
    lines += [f"**Gain by the number of active specialists covering the "
              f"true class (cf. paper Table 4), {title}**, summed over "
              "seeds.", ""] + _covering_table(seeds, key) + [""]
  lines += ["**Subsets (cf. paper Table 2)**, seed "
            f"{s0['seed']}; class `ab` = left digit a, right digit b.", "",
            "| specialist | classes |", "| --- | --- |"]
  lines += [f"| {m} | {' '.join(_pair(x) for x in sub)} |"
            for m, sub in enumerate(s0["subsets"])]
  sel = s0.get("selection") or {}
  if sel.get("grid"):
    lines += ["", "**Validation grid** (seed 0; errors of the combination "
              "on the validation pairs):", "",
              "| family | specialists | top_n | val errors |",
              "| --- | --- | --- | --- |"]
    lines += [f"| {g['family']} | {g['num_specialists']} | {g['top_n']} | "
              f"{g['val_errors']} |" for g in sel["grid"]]
    lines += ["", "| soft T | top_n | val errors |", "| --- | --- | --- |"]
    lines += [f"| {g['temperature']:g} | {g['top_n']} | {g['val_errors']} |"
              for g in sel["soft_grid"]]
  lines.append("")
  return "\n".join(lines)


def regime_plot(results: dict, path: pathlib.Path) -> bool:
  plt = mnist_report.pyplot()
  if plt is None:
    return False
  fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
  rows = results["rows"]
  for i, r in enumerate(rows):
    v = np.asarray(r["test_errors"], float)
    a1.scatter(np.full(v.size, i), v, zorder=3)
    se = v.std(ddof=1) / np.sqrt(v.size) if v.size > 1 else 0.0
    a1.errorbar(i, v.mean(), yerr=se, color="k", capsize=6, zorder=4)
  short = {"generalist": "generalist", "generalist_plus_specialists":
           "+ dustbin\nspecialists", "generalist_plus_soft_specialists":
           "+ soft\nspecialists", "control_compute": "control:\ncompute",
           "control_wide": "control:\nwide"}
  a1.set_xticks(range(len(rows)), [short.get(r["name"], r["name"])
                                   for r in rows], fontsize=8)
  a1.set_ylabel(f"test errors (of {rows[0]['num_test']} pairs)")
  a1.set_title("per seed; bar = mean ± SE", fontsize=9)
  a1.grid(True, axis="y", alpha=0.3)
  _table4_panel(a2, [(label, by_covering_totals(
      [{"by_covering": r[key]} for r in results["seeds"]]))
                     for key, label in (("by_covering", "dustbin"),
                                        ("soft_by_covering", "soft"))])
  mnist_report.save_figure(fig, path)
  return True


def write_regime(results: dict, workdir: pathlib.Path) -> None:
  workdir = pathlib.Path(workdir)
  md = regime_markdown(results)
  checkpoint.write_atomic(workdir / "results.md", md)
  regime_plot(results, workdir / "specialists.png")
  print(md, flush=True)


if __name__ == "__main__":
  wd = pathlib.Path(sys.argv[1])
  res = json.loads((wd / "results.json").read_text())
  if res["config"].get("pipeline") == "regime":
    write_regime(res, wd)
  else:
    write_all(res, wd)
