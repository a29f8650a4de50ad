"""The paper's §4 on MNIST: an ensemble of nets distilled into one net.

  python -m experiments.mnist.ensemble \\
      --config=experiments/mnist/configs/ensemble_cpu.py --workdir=runs/ens

``run(config, workdir)``:

1. trains ``config.ensemble.num_members`` nets (``width``-``width`` MLPs,
   seeds ``0..K-1``) on hard labels with the student-alone recipe
   (``config.student.alone.optimizer``), as **one vmapped program**: the
   members differ only by their seed (initialisation and data order);
2. combines them with :func:`kdjax.ensemble`: ``combine="mean_logits"``
   (the renormalised geometric mean of the probabilities) and
   ``combine="arithmetic"`` at ``T = 1`` (the mean of the probabilities:
   the paper's speech ensemble);
3. chooses the distillation temperature and alpha on the **validation**
   split: every (T, alpha) of the grid is trained with seed ``grid_seed``
   as one vmapped program, distilling the mean-logits ensemble whose logits
   on the (unjittered) transfer set are cached once
   (:func:`kdjax.cache.with_teacher_logits`);
4. distils the ensemble at the chosen (T, alpha) into ``distill_seeds``
   nets of one member's architecture, budget (epochs) and optimizer.

``student_alone`` is members ``alone_members`` (the same recipe and budget;
the distilled seeds start from the same initialisations and see the data in
the same order). The test set chooses nothing; every number is the last
epoch's.

``results.json`` has the schema of ``pipeline.py``'s (``config``,
``git_commit``, ``jax_version``, ``device``, ``environment``, ``command``,
``total_seconds``, ``rows``, ``params_sha256``) with rows
``ensemble_members`` (one test/val error count per member),
``ensemble_mean_logits``, ``ensemble_arithmetic``, ``ensemble_distilled``
(one per seed; ``grid``: the validation errors of every (T, alpha)) and
``student_alone``; and ``gain_kept``: the fraction of the ensemble's gain
over the mean member that the distilled net keeps,
``(mean member - distilled) / (mean member - ensemble)`` on mean error
counts, on test and on validation, for both combinations.
"""

from __future__ import annotations

import itertools
import json
import pathlib
import time

import ml_collections
import numpy as np

from experiments.mnist import pipeline, report
from kdjax import cache, checkpoint, models, provenance, sweep
from kdjax.teacher import Teacher, ensemble
from kdjax.trainer import check_run_config

# Hinton, Vinyals & Dean 2015, Table 1 (speech, frame accuracy): a baseline
# net, the 10-net ensemble and one net distilled from it.
PAPER_TABLE1 = {"baseline": 58.9, "ensemble": 61.1, "distilled": 60.8}
PAPER_GAIN_KEPT = ("more than 80% of the improvement in accuracy of the "
                   "ensemble is transferred to the distilled model")
ROW_NAMES = ("ensemble_members", "ensemble_mean_logits",
             "ensemble_arithmetic", "ensemble_distilled", "student_alone")


def gain_kept(members, ensemble_errors, distilled) -> float | None:
  """``(mean(members) - mean(distilled)) / (mean(members) - ensemble)``.

  None when the ensemble is not better than its mean member.
  """
  m = float(np.mean(members))
  gain = m - float(np.mean(ensemble_errors))
  if gain <= 0:
    return None
  return (m - float(np.mean(distilled))) / gain


def _ensemble_logits(teacher: Teacher, images) -> np.ndarray:
  return np.asarray(cache.compute_teacher_logits(teacher, images))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the experiment; writes results.json, results.md, ensemble.png."""
  workdir = pathlib.Path(workdir)
  check_run_config(workdir, config.to_dict(), write=False)
  t_start = time.perf_counter()
  e = config.ensemble
  opt_cfg = config.student.alone.optimizer
  splits = pipeline.load_splits(config)
  # Recorded once the data has loaded: a bad data_dir leaves no record.
  check_run_config(workdir, config.to_dict())
  test_x, test_y = splits.test_images, splits.test_labels
  val_x, val_y = splits.val_images, splits.val_labels
  train = pipeline.to_device(splits.train_images, splits.train_labels)
  rows, hashes = [], {}
  env = provenance.environment()
  commit = provenance.git_commit(str(pathlib.Path(__file__).parent))

  def results_so_far(**extra) -> dict:
    return {"config": config.to_dict(), "git_commit": commit,
            "jax_version": env["jax_version"], "device": env["device"],
            "environment": env, "command": pipeline.command_line(),
            "total_seconds": round(time.perf_counter() - t_start, 1),
            "rows": rows, "params_sha256": hashes, **extra}

  def save_partial() -> None:
    checkpoint.write_atomic(
        workdir / "results.partial.json",
        json.dumps({**results_so_far(), "partial": True}, indent=2,
                   default=str) + "\n")

  def errs(logits_list, labels):
    return [pipeline.errors(l, labels) for l in logits_list]

  # 1. The members: one vmapped program, seeds 0..K-1.
  k = int(e.num_members)
  seeds = list(range(k))
  m_params, apply, m_sec = pipeline.train_students(
      config, name="ensemble_members", width=e.width, transfer=train,
      objective="hard", seeds=seeds, temperatures=[1.0] * k,
      alphas=[1.0] * k, epochs=e.epochs, opt_cfg=opt_cfg, workdir=workdir)
  m_test = pipeline.member_logits(apply, m_params, test_x)
  m_val = pipeline.member_logits(apply, m_params, val_x)
  hashes["ensemble_members"] = [
      provenance.params_sha256(sweep.member(m_params, i)) for i in range(k)]
  common = dict(epochs=e.epochs, objective="hard", width=e.width,
                optimizer=opt_cfg.to_dict())
  members_row = pipeline.result_row(
      "ensemble_members", errs(m_test, test_y), m_sec, seeds=seeds,
      val_errors=errs(m_val, val_y), **common)
  rows.append(members_row)
  print(f"members: {members_row['test_errors']} test errors "
        f"({m_sec:.0f}s)", flush=True)
  save_partial()

  # 2. The ensembles.
  module = models.MLP((e.width, e.width))
  members = [Teacher.from_linen(module,
                                {"params": sweep.member(m_params, i)})
             for i in range(k)]
  teachers = {"mean_logits": ensemble(members, combine="mean_logits"),
              "arithmetic": ensemble(members, combine="arithmetic",
                                     temperature=1.0)}
  ens_val = {}
  for combine, teacher in teachers.items():
    t0 = time.perf_counter()
    test_l = _ensemble_logits(teacher, test_x)
    ens_val[combine] = _ensemble_logits(teacher, val_x)
    rows.append(pipeline.result_row(
        f"ensemble_{combine}", [pipeline.errors(test_l, test_y)],
        time.perf_counter() - t0, combine=combine, num_members=k,
        temperature=1.0 if combine == "arithmetic" else None,
        val_errors=[pipeline.errors(ens_val[combine], val_y)]))
    print(f"ensemble ({combine}): {rows[-1]['test_errors']} test errors",
          flush=True)
  save_partial()

  # 3. The (T, alpha) grid on validation, seed grid_seed, one program.
  t0 = time.perf_counter()
  transfer = cache.with_teacher_logits(train, teachers["mean_logits"])
  cache_sec = time.perf_counter() - t0
  grid = list(itertools.product(e.grid_temperatures, e.grid_alphas))
  g_params, g_apply, g_sec = pipeline.train_students(
      config, name="distill_grid", width=e.width, transfer=transfer,
      objective="kd", seeds=[e.grid_seed] * len(grid),
      temperatures=[g[0] for g in grid], alphas=[g[1] for g in grid],
      epochs=e.epochs, opt_cfg=opt_cfg, workdir=workdir)
  g_val = errs(pipeline.member_logits(g_apply, g_params, val_x), val_y)
  grid_record = [{"temperature": t, "alpha": a, "seed": int(e.grid_seed),
                  "val_errors": v} for (t, a), v in zip(grid, g_val)]
  # Ties go to the first grid point (smaller T, then smaller alpha).
  best_t, best_a = grid[int(np.argmin(g_val))]
  print(f"grid (validation errors): {grid_record} -> T={best_t:g}, "
        f"alpha={best_a:g}", flush=True)

  # 4. The distilled nets at the chosen (T, alpha).
  ds = [int(s) for s in e.distill_seeds]
  d_params, d_apply, d_sec = pipeline.train_students(
      config, name="ensemble_distilled", width=e.width, transfer=transfer,
      objective="kd", seeds=ds, temperatures=[best_t] * len(ds),
      alphas=[best_a] * len(ds), epochs=e.epochs, opt_cfg=opt_cfg,
      workdir=workdir)
  d_test = pipeline.member_logits(d_apply, d_params, test_x)
  d_val = pipeline.member_logits(d_apply, d_params, val_x)
  hashes["ensemble_distilled"] = [
      provenance.params_sha256(sweep.member(d_params, i))
      for i in range(len(ds))]
  rows.append(pipeline.result_row(
      "ensemble_distilled", errs(d_test, test_y), d_sec, seeds=ds,
      teacher="ensemble_mean_logits", temperature=best_t, alpha=best_a,
      chosen_on="validation", grid=grid_record,
      grid_seconds=round(g_sec, 2), cache_seconds=round(cache_sec, 2),
      val_errors=errs(d_val, val_y),
      **{**common, "objective": "kd"}))
  print(f"distilled: {rows[-1]['test_errors']} test errors ({d_sec:.0f}s)",
        flush=True)

  # 5. The student alone: members alone_members.
  idx = [int(i) for i in e.alone_members]
  rows.append(pipeline.result_row(
      "student_alone", [members_row["test_errors"][i] for i in idx], 0.0,
      seeds=idx, source=f"ensemble_members {idx} (same recipe and budget)",
      val_errors=[members_row["val_errors"][i] for i in idx], **common))

  by = {r["name"]: r for r in rows}
  kept = {}
  for split in ("test", "val"):
    key = f"{split}_errors"
    for combine in ("mean_logits", "arithmetic"):
      kept[f"{split}_{combine}"] = gain_kept(
          by["ensemble_members"][key], by[f"ensemble_{combine}"][key],
          by["ensemble_distilled"][key])
  results = results_so_far(gain_kept=kept,
                           paper={"table1_speech": PAPER_TABLE1,
                                  "gain_kept": PAPER_GAIN_KEPT})
  write_all(results, workdir)
  return results


# ----------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------


def _fmt(values) -> str:
  v = np.asarray(values, dtype=float)
  if v.size == 1:
    return f"{v[0]:g}"
  return f"{v.mean():.1f} ± {v.std(ddof=1):.1f}"


def markdown(results: dict) -> str:
  by = {r["name"]: r for r in results["rows"]}
  d = by["ensemble_distilled"]
  k = len(by["ensemble_members"]["test_errors"])
  paper = {"ensemble_members": f"baseline {PAPER_TABLE1['baseline']}%",
           "student_alone": f"baseline {PAPER_TABLE1['baseline']}%",
           "ensemble_mean_logits": "—",
           "ensemble_arithmetic": f"{PAPER_TABLE1['ensemble']}%",
           "ensemble_distilled": f"{PAPER_TABLE1['distilled']}%"}
  what = {"ensemble_members": f"each of the {k} members",
          "ensemble_mean_logits": f"{k} members, mean of logits",
          "ensemble_arithmetic": f"{k} members, mean of probabilities",
          "ensemble_distilled": (f"one net distilled from the mean-logits "
                                 f"ensemble, T={d['temperature']:g}, "
                                 f"alpha={d['alpha']:g} (chosen on "
                                 f"validation)"),
          "student_alone": "one net, hard labels (members "
                           f"{by['student_alone']['seeds']})"}
  lines = [
      f"Device: {results['device']}; jax {results['jax_version']}; commit "
      f"{results['git_commit']}; total {results['total_seconds']} s; "
      f"command `{results['command']}`.",
      "",
      "| row | what | MNIST test errors (of 10,000; mean ± std) | "
      "validation errors | paper Table 1 (speech, frame accuracy) |",
      "| --- | --- | --- | --- | --- |"]
  for name in ROW_NAMES:
    r = by[name]
    lines.append(f"| {name} | {what[name]} | {_fmt(r['test_errors'])} | "
                 f"{_fmt(r['val_errors'])} | {paper[name]} |")
  g = results["gain_kept"]

  def pct(x):
    return "n/a (no gain)" if x is None else f"{100 * x:.0f}%"

  lines += [
      "",
      "Fraction of the ensemble's gain over the mean member kept by the "
      "distilled net, (mean member − distilled) / (mean member − ensemble), "
      f"on mean test errors: {pct(g['test_mean_logits'])} (mean-logits "
      f"ensemble), {pct(g['test_arithmetic'])} (arithmetic); on validation: "
      f"{pct(g['val_mean_logits'])} / {pct(g['val_arithmetic'])}. Paper "
      "(speech): (60.8 − 58.9) / (61.1 − 58.9) = 86%, \"more than 80%\".",
      "",
      "Validation grid (seed 0): " + ", ".join(
          f"T={x['temperature']:g} alpha={x['alpha']:g}: {x['val_errors']}"
          for x in d["grid"]) + "."]
  return "\n".join(lines) + "\n"


def plot(results: dict, path: pathlib.Path) -> bool:
  """Member errors, ensembles, distilled and alone as a strip chart."""
  plt = report.pyplot()
  if plt is None:
    return False
  by = {r["name"]: r for r in results["rows"]}
  fig, ax = plt.subplots(figsize=(7, 4))
  rng = np.random.default_rng(0)
  for i, name in enumerate(ROW_NAMES):
    v = np.asarray(by[name]["test_errors"], float)
    x = i + (rng.uniform(-0.12, 0.12, v.size) if v.size > 1 else 0.0)
    ax.scatter(x, v, s=30, zorder=3)
    ax.hlines(v.mean(), i - 0.3, i + 0.3, color="k", lw=1.5, zorder=2)
  ax.set_xticks(range(len(ROW_NAMES)),
                ["members", "ensemble\nmean logits", "ensemble\narithmetic",
                 "distilled", "alone"])
  ax.set_ylabel("MNIST test errors (of 10,000)")
  g = results["gain_kept"]["test_mean_logits"]
  ax.set_title(
      "Ensemble distilled into one net (last epoch; bars = means)\n"
      f"gain kept: {'n/a' if g is None else f'{100 * g:.0f}%'} "
      "(paper, speech Table 1: 58.9% -> 61.1% ensemble, 60.8% distilled, "
      ">80% kept)", fontsize=9)
  ax.grid(True, axis="y", alpha=0.3)
  report.save_figure(fig, path)
  return True


def write_all(results: dict, workdir: pathlib.Path) -> None:
  checkpoint.write_atomic(workdir / "results.json",
                          json.dumps(results, indent=2, default=str) + "\n")
  (workdir / "results.partial.json").unlink(missing_ok=True)
  md = markdown(results)
  checkpoint.write_atomic(workdir / "results.md", md)
  plot(results, workdir / "ensemble.png")
  print(md, flush=True)


# ----------------------------------------------------------------------------
# CLI (flags only; the logic is above).
# ----------------------------------------------------------------------------


if __name__ == "__main__":
  from kdjax import cli  # pylint: disable=g-import-not-at-top
  cli.run_config_main(
      run, "Path to experiments/mnist/configs/ensemble_cpu.py.")
