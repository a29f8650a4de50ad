"""The paper's §4 on MNIST: an ensemble of nets distilled into one net,
as a powered, controlled experiment with a coverage arm (issue #20).

  python -m experiments.mnist.ensemble \\
      --config=experiments/mnist/configs/ensemble_cpu.py --workdir=runs/ens

``run(config, workdir)`` (``config.ensemble`` = ``e``):

1. **Regime, on validation.** Each candidate of ``e.regimes`` (``(jitter,
   input_dropout, hidden_dropout)``: ±``jitter``-pixel shifts and dropout,
   so that the members do not interpolate the transfer set) trains
   ``e.regime_members`` members; the candidate whose mean-logits ensemble
   has the fewest validation errors is the regime of every net below
   (members, students, controls). Recorded per candidate: member and
   ensemble validation errors, and how often the ensemble and a member
   disagree on 10k training images (per 10k; an interpolating member
   agrees with its ensemble everywhere there).
2. **Members:** ``e.num_members`` ``width``-``width`` MLPs on hard labels,
   seeds ``0..K-1`` (initialisation and data order), **one vmapped
   program**; combined by :func:`kdjax.ensemble` (mean of logits: the
   teacher; mean of probabilities: reported).
3. **T and alpha, on validation:** every point of ``e.grid_temperatures``
   x ``e.grid_alphas`` is distilled with seed ``e.grid_seed`` at a member's
   epochs, as one vmapped program; the fewest validation errors wins.
4. **Budgets:** for each ``b`` in ``e.budgets``, ``e.seeds`` students are
   distilled for ``b x e.epochs`` epochs, the ensemble queried **online on
   the same shifted images the student sees** (consistent teaching). The
   student of seed ``s`` shares member ``s``'s initialisation and data
   order. **Control:** one net per seed on hard labels with the same
   recipe and epochs (at ``b = 1``: members ``e.seeds`` themselves).
5. **Coverage arm** (``e.coverage.part`` > 0): ``e.num_members`` members on
   ``part`` training images (:func:`ensemble_stats.coverage_split`), the
   student on the whole split with hard labels there and soft targets only
   on the rest (:func:`ensemble_stats.coverage_objective`), ``e.epochs``
   epochs; controls: nets on the members' part alone, ``e.epochs`` epochs
   (members ``e.seeds``) and ``2 x e.epochs`` (the student's steps).

Everything uses one optimizer (``e.optimizer``: Nesterov SGD, gradient
norm clipped); every number is the last epoch's; the test split chooses
nothing. ``analysis`` holds, per arm, the fraction of the gain kept
(:mod:`experiments.mnist.ensemble_stats`) against the control trained as
long as the student and against the mean member, with 95% bootstrap
intervals over seeds and images on test, validation and both pooled, and
the paired per-seed differences (distilled - control).

``results.json``: ``config``, ``git_commit``, ``jax_version``, ``device``,
``environment``, ``command``, ``total_seconds``, ``rows`` (``name``,
``test_errors``, ``val_errors``, ``seconds``, ``seeds``, ...),
``params_sha256``, ``tuning`` (``regimes``, ``grid``), ``disagreement``,
``analysis``, ``goal`` and ``paper``.
"""

from __future__ import annotations

import itertools
import json
import pathlib
import time

import jax
import ml_collections
import numpy as np

from experiments.mnist import ensemble_stats as stats
from experiments.mnist import pipeline, report
from kdjax import checkpoint, sweep
from kdjax.paper import augment, models, provenance
from kdjax.fields import Fields
from kdjax.teacher import Teacher, ensemble
from kdjax.fitting import check_run_config, fit

# Hinton, Vinyals & Dean 2015, Table 1 (speech, frame accuracy): a baseline
# net, the 10-net ensemble and one net distilled from it.
PAPER_TABLE1 = {"baseline": 58.9, "ensemble": 61.1, "distilled": 60.8}
PAPER_GAIN_KEPT = ("more than 80% of the improvement in accuracy of the "
                   "ensemble is transferred to the distilled model")
GOAL_KEPT, GOAL_GAIN = 0.8, 15.0
gain_kept = stats.gain_kept


class _Data:
  """The splits (optionally cut to a few examples for a smoke run)."""

  def __init__(self, config):
    s = pipeline.load_splits(config)
    e = config.ensemble
    nt, ne = int(e.get("num_train", 0)), int(e.get("num_eval", 0))
    cut = lambda a, n: a[:n] if n else a
    self.train_x = cut(s.train_images, nt)
    self.train_y = cut(s.train_labels, nt)
    self.x = {"test": cut(s.test_images, ne), "val": cut(s.val_images, ne)}
    self.y = {"test": cut(s.test_labels, ne), "val": cut(s.val_labels, ne)}
    # Where members and ensembles are compared on training images.
    self.probe_x = self.train_x[:10_000]


def _module(width, regime):
  return models.MLP((width, width), input_dropout=float(regime[1]),
                    hidden_dropout=float(regime[2]))


def _train(config, workdir, name, *, data, seeds, epochs, regime,
           objective="hard", teacher=None, temperatures=None, alphas=None,
           fields=None):
  """``len(seeds)`` nets trained as one vmapped program.

  Returns:
    (stacked params, apply function, seconds).
  """
  e = config.ensemble
  k = len(seeds)
  n = int(data["label"].shape[0])
  bs = min(int(config.batch_size), n)
  states, apply = pipeline.initial_students(
      e.width, e.optimizer, (n // bs) * epochs, seeds=seeds,
      temperatures=temperatures or [1.0] * k, alphas=alphas or [1.0] * k,
      dropout=(regime[1], regime[2]))
  run_cfg = {"name": name, "width": e.width, "seeds": list(seeds),
             "epochs": epochs, "n": n, "regime": list(regime),
             "optimizer": e.optimizer.to_dict(), "batch_size": bs,
             "temperatures": temperatures, "alphas": alphas,
             "objective": getattr(objective, "__name__", objective)}
  t0 = time.perf_counter()
  states, _ = fit(
      states, teacher, data, epochs=epochs, batch_size=bs,
      rng=sweep.sweep_keys([1000 + s for s in seeds]), objective=objective,
      fields=fields,
      augment_fn=augment.make_jitter(int(regime[0])) if regime[0] else None,
      workdir=workdir / "nets" / name, run_config=run_cfg, vmapped=True,
      desc=name, checkpoint_every=config.get("checkpoint_every", 100))
  return states.params, apply, time.perf_counter() - t0


def _logits(apply, params, x) -> list[np.ndarray]:
  return pipeline.member_logits(apply, params, x)


def _ens_teacher(config, regime, params, combine="mean_logits"):
  module = _module(config.ensemble.width, regime)
  k = int(jax.tree.leaves(params)[0].shape[0])
  kw = {"temperature": 1.0} if combine == "arithmetic" else {}
  return ensemble([Teacher.from_linen(module,
                                      {"params": sweep.member(params, i)})
                   for i in range(k)], combine=combine, **kw)


def _disagreement(member_logits, ens_logits) -> float:
  """Mean over members of their disagreements with the ensemble, per 10k."""
  e = np.argmax(ens_logits, -1)
  return float(np.mean([np.mean(np.argmax(m, -1) != e)
                        for m in member_logits]) * 1e4)


class _Run:
  """The run's state: data, rows, hashes, per-image mistakes, records."""

  def __init__(self, config, workdir):
    self.config, self.workdir = config, workdir
    self.e = config.ensemble
    self.data = _Data(config)
    self.rows, self.hashes, self.wrong = [], {}, {}
    self.t_start = time.perf_counter()
    self.env = provenance.environment()
    self.commit = provenance.git_commit(str(pathlib.Path(__file__).parent))
    self.extra = {}

  def results(self, **extra) -> dict:
    return {"config": self.config.to_dict(), "git_commit": self.commit,
            "jax_version": self.env["jax_version"],
            "device": self.env["device"], "environment": self.env,
            "command": pipeline.command_line(),
            "total_seconds": round(time.perf_counter() - self.t_start, 1),
            "rows": self.rows, "params_sha256": self.hashes, **self.extra,
            **extra}

  def save_partial(self):
    report.write_partial(self.results(), self.workdir)

  def evaluate(self, name, logits_by_split, seconds, **extra):
    """Adds a row from ``{"test": [logits...], "val": [...]}``."""
    errs = {}
    for split, ls in logits_by_split.items():
      w = np.stack([stats.wrong(l, self.data.y[split]) for l in ls])
      self.wrong[(name, split)] = w
      errs[split] = [int(x) for x in w.sum(1)]
    row = pipeline.result_row(name, errs["test"], seconds,
                              val_errors=errs["val"], **extra)
    self.rows.append(row)
    print(f"{name}: test {row['test_errors']} val {row['val_errors']} "
          f"({seconds:.0f}s)", flush=True)
    self.save_partial()
    return row

  def net_row(self, name, params, apply, seconds, seeds, **extra):
    self.hashes[name] = [provenance.params_sha256(sweep.member(params, i))
                         for i in range(len(seeds))]
    return self.evaluate(
        name, {s: _logits(apply, params, self.data.x[s])
               for s in ("test", "val")}, seconds, seeds=list(seeds),
        **extra)

  def copy_row(self, name, source, idx, **extra):
    """A row made of members ``idx`` of row ``source`` (no training)."""
    src = {r["name"]: r for r in self.rows}[source]
    for split in ("test", "val"):
      self.wrong[(name, split)] = self.wrong[(source, split)][idx]
    self.rows.append(pipeline.result_row(
        name, [src["test_errors"][i] for i in idx], 0.0,
        val_errors=[src["val_errors"][i] for i in idx],
        seeds=[src["seeds"][i] for i in idx],
        source=f"{source} members {list(idx)} (same recipe and epochs)",
        **extra))
    self.save_partial()


def choose_regime(r: _Run) -> tuple:
  """Step 1: the candidate regime whose ensemble is best on validation."""
  e, d = r.e, r.data
  cands = [tuple(c) for c in e.regimes]
  if len(cands) == 1:
    r.extra.setdefault("tuning", {})["regimes"] = {
        "chosen": list(cands[0]), "candidates": "one (not tuned here)"}
    return cands[0]
  seeds = list(range(int(e.regime_members)))
  train = pipeline.to_device(d.train_x, d.train_y)
  record = []
  for c in cands:
    params, apply, sec = _train(
        r.config, r.workdir, f"regime_j{c[0]}_d{c[1]:g}_{c[2]:g}",
        data=train, seeds=seeds, epochs=int(e.epochs), regime=c)
    val = _logits(apply, params, d.x["val"])
    ens_val = np.mean(val, 0)
    probe = _logits(apply, params, d.probe_x)
    record.append({
        "jitter": c[0], "input_dropout": c[1], "hidden_dropout": c[2],
        "members": len(seeds), "epochs": int(e.epochs),
        "member_val_errors": [pipeline.errors(v, d.y["val"]) for v in val],
        "ensemble_val_errors": pipeline.errors(ens_val, d.y["val"]),
        "train_disagreement_per_10k": _disagreement(probe,
                                                    np.mean(probe, 0)),
        "val_disagreement_per_10k": _disagreement(val, ens_val),
        "seconds": round(sec, 1)})
    print(f"regime {c}: {record[-1]}", flush=True)
  best = int(np.argmin([x["ensemble_val_errors"] for x in record]))
  r.extra.setdefault("tuning", {})["regimes"] = {
      "chosen": list(cands[best]), "chosen_on": "validation (ensemble of "
      f"{len(seeds)} members)", "candidates": record}
  r.save_partial()
  return cands[best]


def train_members(r: _Run, name, regime, idx=None):
  """Step 2 (and the coverage arm's members): members, their ensembles."""
  e, d = r.e, r.data
  k = int(e.num_members)
  x, y = (d.train_x, d.train_y) if idx is None else (d.train_x[idx],
                                                     d.train_y[idx])
  params, apply, sec = _train(
      r.config, r.workdir, name, data=pipeline.to_device(x, y),
      seeds=list(range(k)), epochs=int(e.epochs), regime=regime)
  r.net_row(name, params, apply, sec, list(range(k)), epochs=int(e.epochs),
            objective="hard", num_train=int(len(y)))
  teacher = _ens_teacher(r.config, regime, params)
  arith = _ens_teacher(r.config, regime, params, "arithmetic")
  logits = {}
  for combine, t in (("mean_logits", teacher), ("arithmetic", arith)):
    t0 = time.perf_counter()
    logits[combine] = {s: pipeline.predict_logits(
        lambda p, xx, train, rng, t=t: t.apply_fn(p, t.state, xx),
        t.params, d.x[s]) for s in ("test", "val")}
    r.evaluate(f"{name}_{combine}", {s: [v] for s, v in
                                     logits[combine].items()},
               time.perf_counter() - t0, combine=combine, num_members=k)
  probe_m = _logits(apply, params, d.probe_x)
  seen = "seen" if idx is None else "probe"
  r.extra.setdefault("disagreement", {})[name] = {
      "train_probe_per_10k": _disagreement(probe_m, np.mean(probe_m, 0)),
      "val_per_10k": _disagreement(
          _logits(apply, params, d.x["val"]),
          logits["mean_logits"]["val"]),
      "probe": f"first {len(d.probe_x)} training images ({seen})"}
  return teacher


def choose_t_alpha(r: _Run, regime, teacher):
  """Step 3: (T, alpha) on validation, seed ``grid_seed``, one program."""
  e, d = r.e, r.data
  grid = list(itertools.product(e.grid_temperatures, e.grid_alphas))
  if len(grid) == 1:
    r.extra.setdefault("tuning", {})["grid"] = {"chosen": list(grid[0])}
    return grid[0]
  params, apply, sec = _train(
      r.config, r.workdir, "grid", objective="kd", teacher=teacher,
      data=pipeline.to_device(d.train_x, d.train_y),
      seeds=[int(e.grid_seed)] * len(grid), epochs=int(e.epochs),
      regime=regime, temperatures=[g[0] for g in grid],
      alphas=[g[1] for g in grid])
  val = [pipeline.errors(v, d.y["val"])
         for v in _logits(apply, params, d.x["val"])]
  best = grid[int(np.argmin(val))]  # Ties: the first (smaller T, alpha).
  r.extra.setdefault("tuning", {})["grid"] = {
      "chosen": list(best), "chosen_on": "validation", "seconds":
      round(sec, 1), "seed": int(e.grid_seed), "epochs": int(e.epochs),
      "points": [{"temperature": t, "alpha": a, "val_errors": v}
                 for (t, a), v in zip(grid, val)]}
  print(f"grid: {r.extra['tuning']['grid']}", flush=True)
  r.save_partial()
  return best


def budgets(r: _Run, regime, teacher, t_alpha):
  """Step 4: distilled nets and their controls at every budget."""
  e, d = r.e, r.data
  seeds = [int(s) for s in e.seeds]
  train = pipeline.to_device(d.train_x, d.train_y)
  temp, alpha = t_alpha
  for b in e.budgets:
    ep = int(b) * int(e.epochs)
    params, apply, sec = _train(
        r.config, r.workdir, f"distilled_{ep}ep", data=train, seeds=seeds,
        epochs=ep, regime=regime, objective="kd", teacher=teacher,
        temperatures=[temp] * len(seeds), alphas=[alpha] * len(seeds))
    r.net_row(f"distilled_{ep}ep", params, apply, sec, seeds, epochs=ep,
              objective="kd", temperature=temp, alpha=alpha,
              teacher="members_mean_logits (online, shifted images)")
    if int(b) == 1:
      r.copy_row(f"control_{ep}ep", "members", seeds, epochs=ep,
                 objective="hard")
      continue
    params, apply, sec = _train(r.config, r.workdir, f"control_{ep}ep",
                                data=train, seeds=seeds, epochs=ep,
                                regime=regime)
    r.net_row(f"control_{ep}ep", params, apply, sec, seeds, epochs=ep,
              objective="hard")


def coverage(r: _Run, regime, t_alpha):
  """Step 5: members on part A; the student on all, soft-only off A."""
  e, d = r.e, r.data
  c = e.coverage
  seeds = [int(s) for s in e.seeds]
  part, rest = stats.coverage_split(len(d.train_y), int(c.part),
                                    int(c.split_seed))
  r.extra["coverage_split"] = {"part": len(part), "rest": len(rest),
                               "split_seed": int(c.split_seed)}
  teacher = train_members(r, "coverage_members", regime, idx=part)
  temp, alpha = t_alpha
  ep = int(e.epochs)
  params, apply, sec = _train(
      r.config, r.workdir, "coverage_distilled",
      data=stats.coverage_transfer(d.train_x, d.train_y, part), seeds=seeds,
      epochs=ep, regime=regime, objective=stats.coverage_objective,
      teacher=teacher, temperatures=[temp] * len(seeds),
      alphas=[alpha] * len(seeds), fields=Fields(extra=("labelled",)))
  r.net_row("coverage_distilled", params, apply, sec, seeds, epochs=ep,
            objective="kd on the members' part, soft only on the rest",
            temperature=temp, alpha=alpha, num_train=len(d.train_y),
            num_labelled=len(part))
  r.copy_row(f"coverage_control_{ep}ep", "coverage_members", seeds,
             epochs=ep, objective="hard", num_train=len(part))
  params, apply, sec = _train(
      r.config, r.workdir, f"coverage_control_{2 * ep}ep",
      data=pipeline.to_device(d.train_x[part], d.train_y[part]),
      seeds=seeds, epochs=2 * ep, regime=regime)
  r.net_row(f"coverage_control_{2 * ep}ep", params, apply, sec, seeds,
            epochs=2 * ep, objective="hard", num_train=len(part),
            note="as many steps as the student")


def _kept_all(r: _Run, base, ens, dist, *, paired):
  """kept with intervals on test, val and both pooled; per-seed diffs."""
  e = r.e
  w = lambda name, s: r.wrong[(name, s)]
  out = {}
  for split in ("test", "val", "pooled"):
    parts = ("test", "val") if split == "pooled" else (split,)
    cat = lambda name, parts=parts: np.concatenate(
        [w(name, s) for s in parts], -1)
    out[split] = stats.bootstrap_kept(
        cat(base), cat(ens)[0], cat(dist), paired=paired,
        num_samples=int(e.bootstrap_samples), seed=int(e.bootstrap_seed))
  if paired:
    out["paired_diff"] = {s: [int(x) for x in (w(dist, s).sum(1) -
                                               w(base, s).sum(1))]
                          for s in ("test", "val")}
  return out


def analyse(r: _Run) -> None:
  """Every arm against its control and against the mean member."""
  e = r.e
  names = [x["name"] for x in r.rows]
  arms = {}
  for b in e.budgets:
    ep = int(b) * int(e.epochs)
    arms[f"distilled_{ep}ep"] = {
        "vs_control": _kept_all(r, f"control_{ep}ep", "members_mean_logits",
                                f"distilled_{ep}ep", paired=True),
        "vs_mean_member": _kept_all(r, "members", "members_mean_logits",
                                    f"distilled_{ep}ep", paired=False),
        "control": f"control_{ep}ep"}
  if "coverage_distilled" in names:
    ep = int(e.epochs)
    arms["coverage_distilled"] = {
        "vs_control": _kept_all(r, f"coverage_control_{2 * ep}ep",
                                "coverage_members_mean_logits",
                                "coverage_distilled", paired=True),
        "vs_control_same_epochs": _kept_all(
            r, f"coverage_control_{ep}ep", "coverage_members_mean_logits",
            "coverage_distilled", paired=True),
        "vs_mean_member": _kept_all(r, "coverage_members",
                                    "coverage_members_mean_logits",
                                    "coverage_distilled", paired=False),
        "control": f"coverage_control_{2 * ep}ep"}
  goal = {}
  for arm, a in arms.items():
    t = a["vs_control"]["test"]
    goal[arm] = {"real_gain": t["gain"] >= GOAL_GAIN,
                 "kept_test": t["kept"],
                 "meets": bool(t["gain"] >= GOAL_GAIN and t["kept"] is not None
                               and t["kept"] >= GOAL_KEPT)}
  r.extra["analysis"] = arms
  r.extra["goal"] = {"kept": GOAL_KEPT, "gain_errors": GOAL_GAIN,
                     "on": "test, against the control trained as long",
                     "arms": goal}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the experiment; writes results.json, results.md, ensemble.png."""
  workdir = pathlib.Path(workdir)
  check_run_config(workdir, config.to_dict(), write=False)
  r = _Run(config, workdir)
  # Recorded once the data has loaded: a bad data_dir leaves no record.
  check_run_config(workdir, config.to_dict())
  regime = choose_regime(r)
  teacher = train_members(r, "members", regime)
  t_alpha = choose_t_alpha(r, regime, teacher)
  budgets(r, regime, teacher, t_alpha)
  if int(r.e.coverage.part):
    coverage(r, regime, t_alpha)
  analyse(r)
  results = r.results(paper={"table1_speech": PAPER_TABLE1,
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


def pct(k: dict) -> str:
  """``kept [lo, hi]`` in percent, e.g. ``'41% [12, 70]'``."""
  if k["kept"] is None:
    return "n/a (no gain)"
  return (f"{100 * k['kept']:.0f}% [{100 * k['kept_lo']:.0f}, "
          f"{100 * k['kept_hi']:.0f}]")


def kept_table(results: dict, keys=("vs_control", "vs_control_same_epochs",
                                     "vs_mean_member")) -> str:
  """The fractions kept with their intervals, one line per arm and baseline."""
  lines = ["| arm | baseline | gain over it, test errors | kept: test | "
           "validation | val + test pooled | distilled − control per seed "
           "(test; val) |", "| --- | --- | --- | --- | --- | --- | --- |"]
  for arm, a in results["analysis"].items():
    for key in keys:
      if key not in a:
        continue
      k = a[key]
      diff = (f"{k['paired_diff']['test']}; {k['paired_diff']['val']}"
              if "paired_diff" in k else "")
      base = (a["control"] if key == "vs_control" else
              key[3:].replace("_", " "))
      lines.append(
          f"| {arm} | {base} | {k['test']['gain']:.1f} "
          f"[{k['test']['gain_lo']:.0f}, {k['test']['gain_hi']:.0f}] | "
          f"{pct(k['test'])} | {pct(k['val'])} | {pct(k['pooled'])} | "
          f"{diff} |")
  return "\n".join(lines)


def markdown(results: dict) -> str:
  """The rows, the tuning, and the fractions kept, as Markdown."""
  lines = [
      f"Device: {results['device']}; jax {results['jax_version']}; commit "
      f"{results['git_commit']}; total {results['total_seconds']} s; "
      f"command `{results['command']}`.", "",
      "| row | MNIST test errors (of 10,000; mean ± std) | validation "
      "errors | epochs | seeds |", "| --- | --- | --- | --- | --- |"]
  for r in results["rows"]:
    lines.append(f"| {r['name']} | {_fmt(r['test_errors'])} | "
                 f"{_fmt(r['val_errors'])} | {r.get('epochs', '')} | "
                 f"{r.get('seeds', '')} |")
  lines += ["", "Fraction of the ensemble's gain kept, (baseline − "
            "distilled) / (baseline − ensemble), with 95% bootstrap "
            "intervals over seeds and images; gain = baseline − ensemble "
            "in errors (of 10,000; pooled: of 20,000):", "",
            kept_table(results)]
  t = results.get("tuning", {})
  lines += ["", "Tuning (validation only): regime "
            f"{t.get('regimes', {}).get('chosen')} (jitter, input dropout, "
            f"hidden dropout); T, alpha = {t.get('grid', {}).get('chosen')}.",
            "", "Paper (speech, Table 1): baseline 58.9%, 10-net ensemble "
            "61.1%, distilled 60.8% frame accuracy: 86% of the gain kept."]
  return "\n".join(lines) + "\n"


def readme_table(results: dict) -> str:
  """The README's table (checked by tests/test_readme.py) and kept table."""
  by = {r["name"]: r for r in results["rows"]}
  e = results["config"]["ensemble"]
  k, ep = len(by["members"]["test_errors"]), e["epochs"]
  what = [("members", f"one net (each of the {k} members, {ep} epochs)",
           "58.9%"),
          ("members_mean_logits", f"{k}-net ensemble, mean of logits (the "
           "teacher)", ""),
          ("members_arithmetic", f"{k}-net ensemble, mean of probabilities",
           "61.1%")]
  for b in e["budgets"]:
    n = int(b) * ep
    what += [(f"control_{n}ep", f"one net, hard labels, {n} epochs "
              "(control)", ""),
             (f"distilled_{n}ep", f"one net distilled, {n} epochs",
              "60.8%")]
  if "coverage_distilled" in by:
    part = results["coverage_split"]["part"]
    what += [("coverage_members", f"coverage arm: each member on {part:,} "
              "images", ""),
             ("coverage_members_mean_logits", "coverage arm: their "
              "ensemble (mean of logits)", ""),
             (f"coverage_control_{2 * ep}ep", f"coverage arm: one net on "
              f"the {part:,}, {2 * ep} epochs (control)", ""),
             ("coverage_distilled", "coverage arm: one net distilled on "
              f"all, soft targets only off the {part:,}, {ep} epochs", "")]
  lines = ["| | MNIST test errors (of 10,000) | validation errors | paper "
           "Table 1 (speech, frame accuracy) |", "| --- | --- | --- | --- |"]
  for name, text, paper in what:
    r = by[name]
    lines.append(f"| {text} | {_fmt(r['test_errors'])} | "
                 f"{_fmt(r['val_errors'])} | {paper} |")
  return "\n".join(lines) + "\n\n" + kept_table(results, ("vs_control",))


def plot(results: dict, path: pathlib.Path) -> bool:
  """Every row's test errors (dots: seeds; bars: means)."""
  plt = report.pyplot()
  if plt is None:
    return False
  rows = results["rows"]
  fig, ax = plt.subplots(figsize=(max(7, 0.8 * len(rows)), 4.5))
  rng = np.random.default_rng(0)
  for i, r in enumerate(rows):
    v = np.asarray(r["test_errors"], float)
    x = i + (rng.uniform(-0.12, 0.12, v.size) if v.size > 1 else 0.0)
    ax.scatter(x, v, s=25, zorder=3)
    ax.hlines(v.mean(), i - 0.3, i + 0.3, color="k", lw=1.5, zorder=2)
  ax.set_xticks(range(len(rows)), [r["name"].replace("_", "\n", 1)
                                   for r in rows], fontsize=7)
  ax.set_ylabel("MNIST test errors (of 10,000)")
  kept = ", ".join(f"{arm}: {pct(a['vs_control']['test'])}"
                   for arm, a in results["analysis"].items())
  ax.set_title("Ensemble distilled into one net (last epoch)\nkept vs the "
               f"control trained as long, test: {kept}\n(paper, speech: "
               "86%)", fontsize=8)
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
  from kdjax.paper import cli  # pylint: disable=g-import-not-at-top
  cli.run_config_main(
      run, "Path to experiments/mnist/configs/ensemble_cpu.py.")
