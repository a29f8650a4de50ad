"""The protocol shared by the two BatchNorm examples (linen and NNX).

A BatchNorm CNN teacher is distilled into a smaller BatchNorm CNN student
on MNIST. Each example module supplies only its models, as
``make_teacher(seed) -> Student`` and ``make_student(seed) -> Student``
(plus ``to_teacher(trained_state) -> Teacher``); everything else is here:

1. the teacher is trained on hard labels (``objective="hard"``);
2. the student alone: hard labels, 3 seeds;
3. the student distilled (``objective="kd"``, from the teacher's cached
   eval-mode logits, :mod:`kdjax.cache`; same budget: same epochs, batch
   size, optimizer and data), 3 seeds, at the
   temperature chosen on the validation split among ``--temperatures``
   (seed 0);
4. every number is the last epoch's; the test split chooses nothing.

It also shows that the students' batch statistics change in training and
are what evaluation reads: the distilled students are evaluated once more
with their *initial* statistics (mean 0, variance 1), which costs them
many errors.

Data: real MNIST (``KDJAX_DATA_DIR``), 50k train / 10k validation / 10k
test. ``--tiny`` trains on 512 images for a few steps (the CI test).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from typing import Callable

import jax
import numpy as np
import optax

import kdjax
from kdjax import checkpoint
from kdjax.paper import data, provenance


def parse_args(argv=None, *, default_out: str) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data-dir", default=None,
                 help="MNIST IDX directory (default: $KDJAX_DATA_DIR)")
  p.add_argument("--out", default=default_out, help="results JSON")
  p.add_argument("--epochs", type=int, default=2,
                 help="epochs of the teacher and of every student")
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--temperatures", type=float, nargs="+", default=[2.0, 5.0])
  p.add_argument("--alpha", type=float, default=0.5)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--tiny", action="store_true",
                 help="512 training images, 1 seed, 1 epoch (for tests)")
  return p.parse_args(argv)


def _optimizer(lr: float, total_steps: int):
  return optax.adam(optax.cosine_decay_schedule(lr, max(total_steps, 1)))


@jax.jit
def _predict(state, images):
  return state.predict(images)


def _errors(state, images, labels, batch_size: int = 1000) -> int:
  wrong = 0
  for i in range(0, len(labels), batch_size):
    logits = _predict(state, images[i:i + batch_size])
    wrong += int(np.sum(np.argmax(np.asarray(logits), -1)
                        != labels[i:i + batch_size]))
  return wrong


def _stats_change(before, after) -> float:
  """RMS change of every running mean/variance leaf (model state)."""
  d = [np.asarray(a, np.float64) - np.asarray(b, np.float64)
       for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before))]
  return float(np.sqrt(np.mean(np.concatenate([x.ravel() ** 2 for x in d]))))


def run(args: argparse.Namespace, *, framework: str,
        make_teacher: Callable[[int], kdjax.Student],
        make_student: Callable[[int], kdjax.Student],
        to_teacher: Callable, description: dict) -> dict:
  """Trains the three rows and writes ``args.out`` (see the module doc)."""
  t_start = time.perf_counter()
  splits = data.load_mnist_splits(args.data_dir, as_float=False)
  train_x, train_y = splits.train_images, splits.train_labels
  seeds = list(args.seeds)
  epochs, teacher_epochs = args.epochs, args.epochs
  if args.tiny:
    train_x, train_y = train_x[:512], train_y[:512]
    seeds, epochs, teacher_epochs = seeds[:1], 1, 1
    splits = data.MnistSplits(
        train_images=train_x, train_labels=train_y,
        val_images=splits.val_images[:1000],
        val_labels=splits.val_labels[:1000],
        test_images=splits.test_images[:1000],
        test_labels=splits.test_labels[:1000])
  train_data = {"image": train_x, "label": train_y}
  steps = (len(train_y) // args.batch_size) * epochs
  common = dict(batch_size=args.batch_size, progress=not args.tiny)

  def evaluate(state):
    return {"val_errors": _errors(state, splits.val_images, splits.val_labels),
            "test_errors": _errors(state, splits.test_images,
                                   splits.test_labels)}

  # 1. The teacher.
  t0 = time.perf_counter()
  t_state = kdjax.TrainState.create(
      make_teacher(0), tx=_optimizer(args.lr, (len(train_y) //
                                               args.batch_size) *
                                     teacher_epochs))
  t_state, _ = kdjax.fit(t_state, None, train_data, epochs=teacher_epochs,
                         rng=jax.random.key(100), spec="hard",
                         desc="teacher", **common)
  teacher = to_teacher(t_state)
  # No augmentation: the teacher's (eval-mode) logits are computed once.
  cached = kdjax.cache.with_teacher_logits(train_data, teacher)
  rows = [{"name": "teacher", **{k: [v] for k, v in evaluate(t_state).items()},
           "epochs": teacher_epochs,
           "seconds": round(time.perf_counter() - t0, 1)}]
  print(f"teacher: {rows[-1]}", flush=True)

  def students(objective, temperature, seeds):
    out = []
    for seed in seeds:
      student = make_student(seed)
      state = kdjax.TrainState.create(
          student, tx=_optimizer(args.lr, steps), temperature=temperature,
          alpha=args.alpha if objective == "kd" else 1.0)
      state, history = kdjax.fit(
          state, None, cached if objective == "kd" else train_data,
          epochs=epochs, rng=jax.random.key(seed), spec=objective,
          desc=f"{objective} T={temperature:g} seed {seed}", **common)
      out.append((student, state, history))
    return out

  # 2. The student alone.
  t0 = time.perf_counter()
  alone = students("hard", 1.0, seeds)
  rows.append(_row("student_alone", alone, evaluate, t0, epochs=epochs))
  print(f"student_alone: {rows[-1]}", flush=True)

  # 3. The temperature, chosen on validation (seed 0), then 3 seeds.
  t0 = time.perf_counter()
  val_by_t = {}
  for temperature in args.temperatures:
    (_, state, _), = students("kd", temperature, seeds[:1])
    val_by_t[temperature] = _errors(state, splits.val_images,
                                    splits.val_labels)
  best_t = min(val_by_t, key=lambda t: (val_by_t[t], t))
  tuning = {"chosen_on": "validation", "seed": seeds[0],
            "val_errors_by_temperature": {f"{t:g}": e
                                          for t, e in val_by_t.items()},
            "temperature": best_t, "alpha": args.alpha,
            "seconds": round(time.perf_counter() - t0, 1)}
  print(f"tuning: {tuning}", flush=True)
  t0 = time.perf_counter()
  distilled = students("kd", best_t, seeds)
  row = _row("student_distilled", distilled, evaluate, t0, epochs=epochs,
             temperature=best_t, alpha=args.alpha)
  # The batch statistics: changed in training, read in evaluation.
  stale = []
  for student, state, _ in distilled:
    initial = state.replace(model_state=student.model_state)
    stale.append(_errors(initial, splits.test_images, splits.test_labels))
  row["batch_stats"] = {
      "rms_change_in_training": [
          _stats_change(st.model_state, s.model_state)
          for st, s, _ in distilled],
      "test_errors_with_initial_stats": stale,
  }
  rows.append(row)
  print(f"student_distilled: {rows[-1]}", flush=True)

  env = provenance.environment()
  results = {
      "example": f"BatchNorm CNN distillation on MNIST ({framework})",
      **description,
      "command": " ".join(["python"] + sys.argv),
      "device": env["device"], "environment": env,
      "git_commit": provenance.git_commit(str(pathlib.Path(__file__).parent)),
      "budget": {"student_epochs": epochs, "teacher_epochs": teacher_epochs,
                 "batch_size": args.batch_size, "optimizer":
                     f"adam, cosine decay from {args.lr:g}",
                 "num_train": int(len(train_y)), "seeds": seeds,
                 "tiny": bool(args.tiny)},
      "tuning": tuning,
      "rows": rows,
      "reporting": "last epoch; T chosen on the 10k validation split; the "
                   "test split chooses nothing",
      "total_seconds": round(time.perf_counter() - t_start, 1),
  }
  out = pathlib.Path(args.out)
  checkpoint.write_atomic(out, json.dumps(results, indent=2) + "\n")
  print(f"wrote {out}", flush=True)
  return results


def _row(name, runs, evaluate, t0, **extra):
  evals = [evaluate(state) for _, state, _ in runs]
  return {"name": name,
          "val_errors": [e["val_errors"] for e in evals],
          "test_errors": [e["test_errors"] for e in evals],
          "test_errors_mean": float(np.mean([e["test_errors"]
                                             for e in evals])),
          "seconds": round(time.perf_counter() - t0, 1), **extra}


def pixels(x):
  """uint8 MNIST -> float32 [B, 28, 28, 1] in [0, 1]."""
  x = kdjax.preprocess.scale_pixels(x)
  return x[..., None] if x.ndim == 3 else x


__all__ = ["parse_args", "run", "pixels"]
