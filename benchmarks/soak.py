"""Load test: a long-run soak of :func:`kdjax.fit` with a resume in the middle.

Distils a ``784-W-W-10`` student (``--width``, default 300, not the paper's
800, to keep many epochs affordable on a 2-core CPU) from the shipped
teacher (``experiments/mnist/teacher/teacher_cpu.msgpack``) on the 50k
training split of real MNIST, with the teacher's logits cached once
(:func:`kdjax.cache.with_teacher_logits`) and the quick config's distillation
recipe (``experiments/mnist/configs/quick.py``: Nesterov SGD, lr 0.1,
momentum 0.9, 2% linear warm-up then cosine decay, global-norm clip 5,
``T = 20``, ``alpha = 0.1``, batch 128), checkpointing every epoch
(``max_to_keep`` 2, the :class:`kdjax.checkpoint.Checkpointer` default).

The ``--epochs N`` run is split over two fresh processes (this script run
again with ``--phase``): the first trains epochs ``1..N//2`` and exits, as if
the job had been stopped; the second starts from nothing but the workdir,
resumes from the latest checkpoint and trains to ``N``. Both build the
optimizer for the full ``N`` epochs, so the second continues the same
schedule.

After every epoch (``fit``'s ``eval_fn`` hook with ``eval_every=1``; it runs
after the epoch and before that epoch's checkpoint is written) each phase
records, in this order: the student's test errors (an eval pass, so its
temporaries are part of what is measured), then

* host memory: ``VmRSS``, ``VmHWM``, ``RssAnon`` and ``Threads`` from
  ``/proc/self/status``;
* device memory: the count and total ``nbytes`` of ``jax.live_arrays()``,
  and ``jax.devices()[0].memory_stats()`` (``None`` on CPU);
* open file descriptors (``/proc/self/fd``), the number of Python objects
  tracked by the garbage collector, and the size on disk of
  ``<workdir>/checkpoints``.

Nothing is garbage-collected by hand: the figures are what a real run holds.

Analysis, per phase: the first ``WARMUP_EPOCHS`` (2) epochs of a process are
warm-up (compilation, first allocations); ``after_warmup`` is the value
recorded after them, ``growth = last - after_warmup`` and ``slope`` is the
least-squares slope per epoch over the samples from ``after_warmup`` on
(and, for information only, over the later half of them). The ``verdict``
is ``"no growth"`` when, in both phases, the live-array bytes and count are
constant after warm-up, the open file descriptors do not grow, and the RSS
slope is below ``RSS_SLOPE_MAX_BYTES`` (1 MB = 10^6 bytes per epoch);
``"growth"`` otherwise, and ``"inconclusive"`` when a phase has fewer than
two post-warm-up samples (``--epochs`` below 6). The host allocator keeps
settling for a few tens of epochs after warm-up (the control run without
checkpoints shows it too), so short soaks overstate the RSS slope: at 30
epochs it is close to the threshold, at 300 it is about a tenth of it.

Unless ``--no-reference``, a third process trains the same ``N`` epochs
without a stop (and without a workdir) and the JSON records whether its
final parameters' SHA-256 equals the resumed run's (cheap at width 300: an
epoch takes about a second on the 2-core CPU; it doubles the training
time).

The reference run (no checkpoints) is also analysed, as a control: the
difference between its slopes and the checkpointed phases' is what
checkpointing costs per epoch (``checkpoint_attribution`` in the JSON).

A known small leak (found with this soak; not in kdjax): orbax 0.12.8
checkpoints go through tensorstore 0.1.86 bindings that leak one reference
to Python containers they return, so the containers live for the rest of
the process:

* ``tensorstore.experimental_collect_matching_metrics`` (called
  unconditionally by orbax's ``get_tensorstore_raw_bytes``, before and
  after every array save or restore) leaks the ``'values'`` list of every
  metric it returns: about 24 lists per save (nearly all of the
  ``gc_objects`` slope) and about 26 kB of RSS per save;
* ``tensorstore.KvStore.Spec(...).to_json()`` (orbax's
  ``build_kvstore_tspec``) leaks the returned dict (64 small blocks per
  save); tracemalloc also shows the interpreter's interned-string table
  (``sys.intern`` of path parts in ``pathlib``) growing: together about
  24 kB of RSS per save.

Measured on the width-300 state in isolation (``Checkpointer.save`` 400
times): about 50 kB of RSS per save after warm-up, 24.5 kB with the metric
query patched out. It is some 20 times below the RSS threshold per epoch,
but it is unbounded: about 5 MB per 100 checkpoints.

Usage::

  KDJAX_DATA_DIR=/path/to/mnist python benchmarks/soak.py --epochs 100 \\
      --json benchmarks/results/soak_cpu.json [--width 300] \\
      [--workdir DIR] [--no-reference] [--backend cpu|gpu]

``benchmarks/results/soak_cpu.json`` is ``--epochs 100`` (about 4 minutes
on the 2-core CPU, with the reference run): at 30 epochs the RSS slope is
dominated by allocator settling and the verdict flips between runs.

Without ``--workdir`` the run uses a temporary directory, deleted at the
end; a given ``--workdir`` must not exist yet (or be empty) and is kept.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Optional

from _common import write_results  # benchmarks/ is sys.path[0]

# The demo's distillation settings (experiments/mnist/configs/quick.py),
# written out here: a benchmark imports no experiment module.
DISTILL = {"temperature": 20.0, "alpha": 0.7,
           "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9,
                         "warmup_fraction": 0.02, "final_lr_fraction": 0.0,
                         "clip_norm": 5.0}}
BATCH_SIZE = 128

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_BACKENDS = {"cpu": "cpu", "gpu": "cuda"}

WARMUP_EPOCHS = 2
RSS_SLOPE_MAX_BYTES = 1_000_000  # per epoch, after warm-up
TEACHER_PATH = "experiments/mnist/teacher/teacher_cpu.msgpack"
SERIES_KEYS = ("rss_bytes", "live_bytes", "live_arrays", "open_fds",
               "threads", "gc_objects", "checkpoint_dir_bytes")
# The series the verdict looks at, and how.
CONSTANT_KEYS = ("live_bytes", "live_arrays")
NON_GROWING_KEYS = ("open_fds",)


def _parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--epochs", type=int, required=True,
                      help="total epochs; the stop is after epochs // 2")
  parser.add_argument("--json", type=pathlib.Path, default=None,
                      help="write the results as JSON to this path")
  parser.add_argument("--width", type=int, default=300,
                      help="student hidden width (default 300)")
  parser.add_argument("--workdir", type=pathlib.Path, default=None,
                      help="run directory (default: a temporary one, deleted "
                      "at the end)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--reference", action=argparse.BooleanOptionalAction,
                      default=True,
                      help="also train N epochs uninterrupted in a third "
                      "process and compare the final parameter hashes "
                      "(default on; --no-reference skips it)")
  parser.add_argument("--backend", choices=sorted(_BACKENDS), default="cpu",
                      help="sets JAX_PLATFORMS in the phase processes")
  # Internal: run one phase in this process.
  parser.add_argument("--phase", choices=("1", "2", "reference"),
                      default=None, help=argparse.SUPPRESS)
  parser.add_argument("--phase-epochs", type=int, default=None,
                      help=argparse.SUPPRESS)
  parser.add_argument("--phase-json", type=pathlib.Path, default=None,
                      help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.epochs < 2:
    parser.error(f"--epochs must be >= 2 (one epoch per phase at least), "
                 f"got {args.epochs}.")
  if args.width < 1:
    parser.error(f"--width must be >= 1, got {args.width}.")
  return args


# ----------------------------------------------------------------------------
# Measurements (phase processes).
# ----------------------------------------------------------------------------


def _proc_status() -> dict:
  """Selected fields of /proc/self/status, in bytes (kB fields) or counts."""
  wanted = {"VmRSS": "rss_bytes", "VmHWM": "rss_peak_bytes",
            "RssAnon": "rss_anon_bytes", "Threads": "threads"}
  out = {}
  with open("/proc/self/status") as f:
    for line in f:
      key, _, value = line.partition(":")
      if key in wanted:
        parts = value.split()
        n = int(parts[0])
        out[wanted[key]] = n * 1024 if parts[1:] == ["kB"] else n
  return out


def _dir_bytes(path: pathlib.Path) -> int:
  total = 0
  for root, _, files in os.walk(path):
    for name in files:
      try:
        total += os.lstat(os.path.join(root, name)).st_size
      except FileNotFoundError:  # Removed while walking (old checkpoint).
        pass
  return total


def _sample(epoch: int, t_start: float,
            ckpt_dir: Optional[pathlib.Path]) -> dict:
  """One measurement of this process's host and device memory."""
  import jax  # pylint: disable=g-import-not-at-top
  live = jax.live_arrays()
  stats = jax.devices()[0].memory_stats()
  sample = {"epoch": epoch, "t": round(time.perf_counter() - t_start, 3),
            **_proc_status(),
            "live_bytes": int(sum(x.nbytes for x in live)),
            "live_arrays": len(live),
            "device_memory_stats": ({k: int(v) for k, v in stats.items()}
                                    if stats is not None else None),
            "open_fds": len(os.listdir("/proc/self/fd")),
            "gc_objects": len(gc.get_objects()),
            "checkpoint_dir_bytes": (_dir_bytes(ckpt_dir)
                                     if ckpt_dir is not None else None)}
  del live
  return sample


# ----------------------------------------------------------------------------
# One phase (a fresh process).
# ----------------------------------------------------------------------------


def run_phase(args: argparse.Namespace) -> int:
  """Trains to ``--phase-epochs`` (resuming from the workdir) and reports."""
  t_start = time.perf_counter()
  # pylint: disable=g-import-not-at-top
  import jax
  import jax.numpy as jnp
  import numpy as np
  sys.path.insert(0, str(_ROOT))
  from kdjax import cache, checkpoint, evaluate
  from kdjax.paper import data, models, optim, provenance
  from kdjax.teacher import Teacher
  from kdjax.step import TrainState
  from kdjax.fitting import fit
  from kdjax.options import Checkpointing, Evaluation, StepSpec
  # pylint: enable=g-import-not-at-top

  distill = DISTILL
  splits = data.load_mnist_splits(None, num_val=10_000, seed=0,
                                  as_float=False)
  t_module = models.paper_teacher()
  t_params = checkpoint.load_params(
      _ROOT / TEACHER_PATH,
      models.init_params(t_module, jax.random.key(0), (1, 28, 28)))
  teacher = Teacher.from_linen(t_module, {"params": t_params})
  transfer = cache.with_teacher_logits(
      {"image": jnp.asarray(splits.train_images),
       "label": jnp.asarray(splits.train_labels)}, teacher)
  del t_params
  test_x = jnp.asarray(splits.test_images)
  val_x = jnp.asarray(splits.val_images)
  t_setup = time.perf_counter() - t_start

  module = models.paper_student(args.width)
  apply = models.linen_student_apply(module)
  _eval = lambda params, x: apply(params, x, False, None)  # noqa: E731
  n = int(transfer["label"].shape[0])
  batch_size = BATCH_SIZE
  steps_per_epoch = n // batch_size
  tx = optim.make_optimizer(distill["optimizer"],
                            steps_per_epoch * args.epochs)
  state = TrainState.create(
      apply_fn=apply, params=models.init_params(
          module, jax.random.key(args.seed), (1, 28, 28)),
      tx=tx, temperature=distill["temperature"], alpha=distill["alpha"])
  run_config = {"benchmark": "soak", "width": args.width,
                "epochs": args.epochs, "seed": args.seed, "n": n,
                "batch_size": batch_size, "objective": "kd",
                "temperature": distill["temperature"],
                "alpha": distill["alpha"],
                "optimizer": dict(distill["optimizer"]),
                "teacher": TEACHER_PATH, "teacher_logits": "cached"}

  workdir = None if args.phase == "reference" else args.workdir
  ckpt_dir = workdir / "checkpoints" if workdir is not None else None
  samples = []
  # The state handed to fit stays referenced by this frame for the whole call:
  # in phase 1 its buffers are donated to the first epoch (and freed); when
  # fit restores a checkpoint instead (phase 2), it stays live, unchanged.
  init_leaves = jax.tree.leaves(state)
  init_state = {"arrays": len(init_leaves),
                "bytes": int(sum(x.nbytes for x in init_leaves))}
  del init_leaves
  before = _sample(None, t_start, ckpt_dir)  # After setup, before fit.

  def eval_fn(state):
    test_errors = evaluate.errors(
        evaluate.predict_logits(_eval, state.params, test_x),
        splits.test_labels)
    epoch = int(jax.device_get(state.step)) // steps_per_epoch
    s = _sample(epoch, t_start, ckpt_dir)
    s["test_errors"] = test_errors
    samples.append(s)
    print(f"[soak phase {args.phase}] epoch {epoch}/{args.epochs}: "
          f"test errors {test_errors}, rss {s['rss_bytes'] / 2**20:.1f} MiB, "
          f"live {s['live_bytes'] / 2**20:.2f} MiB in {s['live_arrays']} "
          f"arrays, fds {s['open_fds']}, threads {s['threads']}, "
          f"checkpoints {(s['checkpoint_dir_bytes'] or 0) / 2**20:.1f} MiB, "
          f"t {s['t']:.0f}s", flush=True)
    return {"test_errors": test_errors, "rss_bytes": s["rss_bytes"],
            "live_bytes": s["live_bytes"], "live_arrays": s["live_arrays"],
            "open_fds": s["open_fds"]}

  t_fit = time.perf_counter()
  state, history = fit(
      state, None, transfer, epochs=args.phase_epochs, batch_size=batch_size,
      rng=jax.random.key(1000 + args.seed), spec=StepSpec("kd"),
      checkpoint=Checkpointing(workdir, run_config=run_config),
      evaluation=Evaluation(eval_fn, every=1), desc=f"soak {args.phase}")
  jax.block_until_ready(state)
  fit_seconds = time.perf_counter() - t_fit
  after = _sample(args.phase_epochs, t_start, ckpt_dir)  # After fit closed.
  ckpt_epochs = None
  if ckpt_dir is not None:
    ckpt_epochs = sorted(int(p.name) for p in ckpt_dir.iterdir()
                         if p.name.isdigit())

  env = provenance.environment()
  report = {
      "phase": args.phase, "pid": os.getpid(),
      "target_epochs": args.phase_epochs,
      "epochs_run": len(history),
      "first_epoch": samples[0]["epoch"] if samples else None,
      "setup_seconds": round(t_setup, 2),
      "fit_seconds": round(fit_seconds, 2),
      "epoch_seconds": [round(float(h["epoch_seconds"]), 3) for h in history],
      "steps_per_epoch": steps_per_epoch,
      "final_step": int(jax.device_get(state.step)),
      "skipped_steps": int(jax.device_get(state.skipped)),
      "final_loss": float(np.asarray(history[-1]["loss"])) if history else None,
      "test_errors": evaluate.errors(
          evaluate.predict_logits(_eval, state.params, test_x),
          splits.test_labels),
      "val_errors": evaluate.errors(
          evaluate.predict_logits(_eval, state.params, val_x),
          splits.val_labels),
      "params_sha256": provenance.params_sha256(state.params),
      "checkpoint_epochs_on_disk": ckpt_epochs,
      "sample_before_fit": before, "sample_after_fit": after,
      "initial_state": init_state, "samples": samples, "run_config": run_config,
      "num_train": n, "environment": env,
      "git_commit": provenance.git_commit(str(_ROOT)),
  }
  args.phase_json.write_text(json.dumps(report, indent=2) + "\n")
  return 0


# ----------------------------------------------------------------------------
# Orchestration and analysis (the parent process; it never imports JAX).
# ----------------------------------------------------------------------------


def _slope(xs: list[float], ys: list[float]) -> Optional[float]:
  """Least-squares slope of ``ys`` on ``xs``; None with fewer than 2 points."""
  if len(xs) < 2:
    return None
  mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
  sxx = sum((x - mx) ** 2 for x in xs)
  if sxx == 0:
    return None
  return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def analyse_phase(report: dict) -> dict:
  """Per-epoch series, post-warm-up growth and slopes of one phase."""
  samples = report["samples"]
  epochs = [s["epoch"] for s in samples]
  series = {k: [s[k] for s in samples] for k in SERIES_KEYS}
  series["test_errors"] = [s["test_errors"] for s in samples]
  series["device_memory_stats"] = [s["device_memory_stats"] for s in samples]
  ref = WARMUP_EPOCHS - 1  # Index of the sample taken after warm-up.
  post = {k: series[k][ref:] for k in SERIES_KEYS}
  post_epochs = epochs[ref:]
  analysis = {}
  for k in SERIES_KEYS:
    values = post[k]
    if not values or values[0] is None:
      analysis[k] = None
      continue
    slope = _slope(post_epochs, values)
    half = len(values) // 2  # Informational: the later half only.
    slope_late = _slope(post_epochs[half:], values[half:])
    analysis[k] = {
        "first": series[k][0], "after_warmup": values[0], "last": values[-1],
        "min_after_warmup": min(values), "max_after_warmup": max(values),
        "growth": values[-1] - values[0],
        "slope_per_epoch": None if slope is None else round(slope, 3),
        "slope_per_epoch_second_half": (None if slope_late is None
                                        else round(slope_late, 3)),
        "post_warmup_samples": len(values)}
  checks = {}
  enough = len(post_epochs) >= 2
  for k in CONSTANT_KEYS:
    checks[f"{k}_constant"] = (analysis[k]["max_after_warmup"] ==
                               analysis[k]["min_after_warmup"]
                               if analysis[k] else None)
  for k in NON_GROWING_KEYS:
    checks[f"{k}_not_growing"] = (analysis[k]["growth"] <= 0
                                  if analysis[k] else None)
  rss_slope = analysis["rss_bytes"]["slope_per_epoch"] if analysis[
      "rss_bytes"] else None
  checks["rss_slope_below_threshold"] = (None if rss_slope is None else
                                         rss_slope < RSS_SLOPE_MAX_BYTES)
  if not enough or any(v is None for v in checks.values()):
    verdict = "inconclusive"
  else:
    verdict = "no growth" if all(checks.values()) else "growth"
  return {"epochs": epochs, "series": series, "analysis": analysis,
          "checks": checks, "verdict": verdict}


def _run_child(args: argparse.Namespace, phase: str, epochs: int,
               out: pathlib.Path) -> tuple[dict, float]:
  cmd = [sys.executable, str(pathlib.Path(__file__).resolve()),
         "--epochs", str(args.epochs), "--width", str(args.width),
         "--seed", str(args.seed), "--backend", args.backend,
         "--workdir", str(args.workdir), "--phase", phase,
         "--phase-epochs", str(epochs), "--phase-json", str(out)]
  env = dict(os.environ, JAX_PLATFORMS=_BACKENDS[args.backend])
  print(f"[soak] phase {phase}: a fresh process trains to epoch {epochs}",
        flush=True)
  t0 = time.perf_counter()
  subprocess.run(cmd, check=True, env=env, cwd=str(_ROOT))
  return json.loads(out.read_text()), time.perf_counter() - t0


def _command_line() -> str:
  argv = list(sys.argv)
  if argv and argv[0].endswith("benchmarks/soak.py"):
    argv[0] = "python benchmarks/soak.py"
  return " ".join(argv)


def main(args: argparse.Namespace) -> int:
  t_start = time.perf_counter()
  temporary = args.workdir is None
  if temporary:
    args.workdir = pathlib.Path(tempfile.mkdtemp(prefix="kdjax_soak_"))
  elif args.workdir.exists() and any(args.workdir.iterdir()):
    raise SystemExit(f"--workdir {args.workdir} is not empty; the soak must "
                     "start from nothing (give a new directory).")
  args.workdir = args.workdir.absolute()
  args.workdir.mkdir(parents=True, exist_ok=True)
  stop = args.epochs // 2
  try:
    phase1, wall1 = _run_child(args, "1", stop,
                               args.workdir / "soak_phase1.json")
    phase2, wall2 = _run_child(args, "2", args.epochs,
                               args.workdir / "soak_phase2.json")
    reference, wall_ref = None, None
    if args.reference:
      reference, wall_ref = _run_child(args, "reference", args.epochs,
                                       args.workdir / "soak_reference.json")
  finally:
    if temporary:
      shutil.rmtree(args.workdir, ignore_errors=True)

  phases = {"phase1": (phase1, wall1), "phase2": (phase2, wall2)}
  if reference is not None:
    phases["reference"] = (reference, wall_ref)
  out_phases = {}
  for name, (rep, wall) in phases.items():
    a = analyse_phase(rep)
    out_phases[name] = {
        "pid": rep["pid"], "epoch_range": f"{(rep['first_epoch'] or 1)}.."
                                          f"{rep['target_epochs']}",
        "epochs_run": rep["epochs_run"], "wall_seconds": round(wall, 1),
        "setup_seconds": rep["setup_seconds"],
        "fit_seconds": rep["fit_seconds"],
        "epoch_seconds": rep["epoch_seconds"],
        "final_step": rep["final_step"], "test_errors": rep["test_errors"],
        "params_sha256": rep["params_sha256"],
        "checkpoint_epochs_on_disk": rep["checkpoint_epochs_on_disk"],
        "sample_before_fit": rep["sample_before_fit"],
        "sample_after_fit": rep["sample_after_fit"],
        "initial_state_passed_to_fit": rep["initial_state"], **a}
  # The reference run (no workdir, so no checkpoints) is a control: it is
  # analysed the same way but does not enter the verdict.
  verdicts = [out_phases[k]["verdict"] for k in ("phase1", "phase2")]
  if "growth" in verdicts:
    verdict = "growth"
  elif "inconclusive" in verdicts:
    verdict = "inconclusive"
  else:
    verdict = "no growth"
  resume_ok = (phase2["first_epoch"] == stop + 1 and
               phase2["epochs_run"] == args.epochs - stop and
               phase2["final_step"] == args.epochs * phase2["steps_per_epoch"])
  attribution = None
  if reference is not None:
    ref_a = out_phases["reference"]["analysis"]
    attribution = {"control": "reference run (same training, no workdir: no "
                              "checkpoints, no metrics.jsonl)"}
    for k in ("rss_bytes", "gc_objects", "threads", "open_fds"):
      ref_slope = (ref_a[k] or {}).get("slope_per_epoch")
      attribution[k] = {
          name: {"slope_per_epoch": (out_phases[name]["analysis"][k] or {}
                                     ).get("slope_per_epoch"),
                 "minus_control": None if ref_slope is None or (
                     out_phases[name]["analysis"][k] or {}).get(
                         "slope_per_epoch") is None else round(
                             out_phases[name]["analysis"][k]
                             ["slope_per_epoch"] - ref_slope, 3)}
          for name in ("phase1", "phase2")}
      attribution[k]["control_slope_per_epoch"] = ref_slope
  env = phase2["environment"]
  results = {
      "benchmark": "soak",
      "description": __doc__.splitlines()[0],
      "command": _command_line(),
      "device": env["device"], "jax_version": env["jax_version"],
      "environment": env, "git_commit": phase2["git_commit"],
      "data": "mnist (50k train split, 10k test)",
      "config": {**phase2["run_config"], "student": (
          f"784-{args.width}-{args.width}-10 (paper: 800; smaller to keep a "
          "long CPU soak affordable)"), "checkpoint_every": 1,
                 "max_to_keep": 2, "eval_every": 1,
                 "steps_per_epoch": phase2["steps_per_epoch"]},
      "epochs": args.epochs, "stop_after_epoch": stop,
      "resumed_from_epoch": (phase2["first_epoch"] - 1
                             if phase2["first_epoch"] else None),
      "resume_ok": resume_ok,
      "wall_seconds": round(time.perf_counter() - t_start, 1),
      "warmup_epochs_per_phase": WARMUP_EPOCHS,
      "thresholds": {
          "live_bytes": "constant after warm-up (max == min)",
          "live_arrays": "constant after warm-up (max == min)",
          "open_fds": "no growth after warm-up (last <= value after warm-up)",
          "rss_slope_max_bytes_per_epoch": RSS_SLOPE_MAX_BYTES,
          "rss_slope": "least-squares slope over the post-warm-up epochs of "
                       "each phase < 1e6 bytes/epoch",
      },
      "verdict": verdict,
      "final": {"test_errors": phase2["test_errors"],
                "val_errors": phase2["val_errors"],
                "final_loss": phase2["final_loss"],
                "skipped_steps": phase2["skipped_steps"],
                "params_sha256": phase2["params_sha256"]},
      "reference": None if reference is None else {
          "wall_seconds": round(wall_ref, 1),
          "params_sha256": reference["params_sha256"],
          "test_errors": reference["test_errors"],
          "resumed_equals_uninterrupted": (reference["params_sha256"] ==
                                           phase2["params_sha256"])},
      "checkpoint_attribution": attribution,
      "phases": out_phases,
  }
  for name, p in out_phases.items():
    a = p["analysis"]
    rss = a["rss_bytes"]
    if rss is None:
      print(f"[soak] {name}: no post-warm-up samples", flush=True)
      continue
    late = rss["slope_per_epoch_second_half"]
    late = "n/a" if late is None else f"{late / 1e6:.3f}"
    print(f"[soak] {name} (epochs {p['epoch_range']}): verdict {p['verdict']}; "
          f"rss {rss['first'] / 2**20:.1f} -> {rss['after_warmup'] / 2**20:.1f}"
          f" -> {rss['last'] / 2**20:.1f} MiB (slope "
          f"{(rss['slope_per_epoch'] or 0) / 1e6:.3f} MB/epoch, later half "
          f"{late}); live bytes "
          f"{a['live_bytes']['min_after_warmup']}.."
          f"{a['live_bytes']['max_after_warmup']}, live arrays "
          f"{a['live_arrays']['min_after_warmup']}.."
          f"{a['live_arrays']['max_after_warmup']}, fds "
          f"{a['open_fds']['after_warmup']} -> {a['open_fds']['last']}",
          flush=True)
  print(f"[soak] verdict: {verdict}; resume ok: {resume_ok}; final test "
        f"errors {phase2['test_errors']}; "
        f"{results['wall_seconds']:.0f}s", flush=True)
  write_results(args.json, results, prefix="[soak] ")
  return 0


if __name__ == "__main__":
  _ARGS = _parse_args()
  if _ARGS.phase is not None:
    sys.exit(run_phase(_ARGS))
  sys.exit(main(_ARGS))
