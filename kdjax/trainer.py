"""The resumable outer loop: epochs on device, progress, metrics, checkpoints.

:func:`fit` is what a user calls to distil a student in a few lines::

  state, history = kdjax.fit(state, teacher, data, epochs=20, batch_size=128,
                             rng=jax.random.key(0), objective="kd",
                             workdir="runs/mnist")

It compiles one epoch (:func:`kdjax.loops.make_epoch_fn`), runs it
``epochs`` times with a live progress bar, appends per-epoch metrics to
``<workdir>/metrics.jsonl`` and checkpoints every ``checkpoint_every``
epochs. Started again with the same ``workdir``, it resumes from the last
good checkpoint and ends with the same parameters (bit-identical on CPU) as
an uninterrupted run: the data order and every step's key are pure
functions of the run's key, the epoch index and the step counter.

A workdir remembers the run it was started with, and starting a different
one in the same workdir raises instead of silently mixing two runs:
``fit.json`` records what :func:`fit` itself sees (objective, batch size,
number of examples, augmentation, sweep or not, the state's temperature
and alpha, and every array's name, shape and dtype), and
``run_config.json`` whatever else the caller passes as ``run_config``
(learning rate, schedule, data variant: what ``fit`` cannot see). Only
``epochs`` may change, to extend a finished run. On resume, the records of
``metrics.jsonl`` after the restored checkpoint are dropped before the
epochs that follow it are run again, so every epoch appears once.

Before anything compiles, :func:`fit` checks its inputs on the host
(:mod:`kdjax.validate`): teacher and student must predict the same number
of classes (shapes from ``jax.eval_shape``, which does not compile) and the
labels must lie in ``[0, num_classes)``.

Non-finite steps: a step whose loss or gradients are not finite is never
applied (the old parameters and optimizer state are kept, and
``state.skipped`` counts it; the per-epoch record holds ``'skipped'`` and
``'first_nonfinite_step'``). With ``on_nonfinite="skip"`` training goes on;
with ``on_nonfinite="raise"``, :func:`fit` raises a ``FloatingPointError``
after the epoch, naming the epoch, the first non-finite step and the
metrics that were not finite, without checkpointing that epoch (the last
checkpoint holds the state from before it).
"""

from __future__ import annotations

import json
import pathlib
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from kdjax import loops, sweep, train, validate
from kdjax import augment as augment_lib
from kdjax.checkpoint import Checkpointer, key_data, leaf_specs, write_atomic
from kdjax.progress import MetricWriter, Progress

__all__ = ["fit", "check_run_config", "check_inputs"]

PyTree = Any
ON_NONFINITE = ("skip", "raise")
# The order in which non-finite metrics are named (then the rest, sorted).
_METRIC_ORDER = ("loss", "hard_loss", "soft_loss", "grad_norm")


def check_run_config(workdir: str | pathlib.Path, run_config: dict, *,
                     filename: str = "run_config.json") -> None:
  """Records ``run_config`` in ``workdir/filename``, or checks it matches.

  Raises:
    ValueError: if the workdir holds a run of a different configuration.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / filename
  canonical = json.loads(json.dumps(run_config, sort_keys=True, default=str))
  if path.exists():
    old = json.loads(path.read_text())
    if old != canonical and not augment_lib.same_fit_record(old, canonical):
      diff = sorted(k for k in set(old) | set(canonical)
                    if old.get(k) != canonical.get(k))
      raise validate.WorkdirMismatchError(
          f"workdir {workdir} holds a run with a different configuration "
          f"({path.name}: keys differing: {diff}). Use a new --workdir, or "
          f"delete {workdir} to start over.")
    return
  write_atomic(path, json.dumps(canonical, indent=2, sort_keys=True))


def fit(state: PyTree, teacher, data: dict, *, epochs: int, batch_size: int,
        rng: jax.Array, objective: str = "kd",
        augment_fn: Optional[Callable] = None,
        workdir: Optional[str | pathlib.Path] = None,
        checkpoint_every: int = 1, run_config: Optional[dict] = None,
        eval_fn: Optional[Callable[[PyTree], dict]] = None,
        eval_every: int = 0, vmapped: bool = False, desc: str = "train",
        progress: Optional[bool] = None,
        skip_nonfinite: bool = True,
        on_nonfinite: str = "skip") -> tuple[PyTree, list[dict]]:
  """Trains ``state`` for ``epochs`` epochs on device-resident ``data``.

  Args:
    state: a :class:`kdjax.train.TrainState` (or a stacked sweep state with
      ``vmapped=True``).
    teacher: the frozen :class:`kdjax.teacher.Teacher`, or None for
      ``objective="hard"`` or when ``data`` holds ``'teacher_logits'``.
    data: dict of arrays with a shared leading axis (``'image'``, ``'label'``,
      optionally ``'teacher_logits'``); moved to the device once.
    epochs: total number of epochs (a resumed run continues up to it).
    batch_size: examples per step (the remainder of each epoch is dropped).
    rng: the run's key (a stacked key per member when ``vmapped``).
    objective, augment_fn, skip_nonfinite: see
      :func:`kdjax.train.make_train_step`. ``skip_nonfinite=False`` (apply
      non-finite updates) is only allowed with ``on_nonfinite="skip"``.
    workdir: where checkpoints, ``metrics.jsonl``, ``fit.json`` and
      ``run_config.json`` go; None trains in memory only.
    checkpoint_every: checkpoint period in epochs (the last epoch is always
      saved).
    run_config: a JSON-able description of what ``fit`` cannot see (the
      optimizer's settings, the data's origin), checked against the
      workdir's ``run_config.json`` (see :func:`check_run_config`). What
      it can see is checked against ``fit.json`` in any case.
    eval_fn: optional ``state -> dict`` of host metrics (e.g. validation
      errors), called every ``eval_every`` epochs and after the last.
    eval_every: period of ``eval_fn`` in epochs (0: only after the last).
    vmapped: ``state`` is a stacked sweep; epochs run under ``jax.vmap``.
    desc: label of the progress bar.
    progress: show the progress bar (default: unless ``KDJAX_PROGRESS=0``).
    on_nonfinite: ``"skip"`` (skip non-finite steps and go on) or
      ``"raise"`` (skip them, then raise ``FloatingPointError`` at the end
      of the epoch, before it is checkpointed).

  Returns:
    ``(state, history)``: the final state and one metrics dict per epoch run
    in this call.

  Raises:
    FloatingPointError: with ``on_nonfinite="raise"``, after an epoch with a
      non-finite step.
    ValueError: invalid arguments or inputs (checked before compiling), or
      a workdir that holds a different run (``fit.json``,
      ``run_config.json``, :class:`kdjax.checkpoint.CheckpointMismatchError`).
  """
  if epochs < 0:
    raise ValueError(f"epochs must be >= 0, got {epochs}.")
  if on_nonfinite not in ON_NONFINITE:
    raise ValueError(f"on_nonfinite must be one of {ON_NONFINITE}, got "
                     f"{on_nonfinite!r}.")
  if on_nonfinite == "raise" and not skip_nonfinite:
    raise ValueError("on_nonfinite='raise' keeps the non-finite update out "
                     "of the state; it cannot be combined with "
                     "skip_nonfinite=False.")
  check_inputs(state, teacher, data, objective=objective,
               augment_fn=augment_fn, vmapped=vmapped)
  num_examples = int(data["label"].shape[0])
  step = train.make_train_step(objective, augment_fn=augment_fn,
                               skip_nonfinite=skip_nonfinite)
  epoch_fn = loops.make_epoch_fn(step, batch_size=batch_size,
                                 num_examples=num_examples,
                                 nonfinite_diagnostics=True)
  steps_per_epoch = epoch_fn.steps_per_epoch
  if vmapped:
    epoch_fn = sweep.vmap_epoch(epoch_fn)
  run_epoch = jax.jit(epoch_fn, donate_argnums=(0,))

  start, ckpt, writer = 0, None, None
  if workdir is not None:
    workdir = pathlib.Path(workdir)
    check_run_config(workdir, _fit_record(
        state, objective=objective, batch_size=batch_size,
        num_examples=num_examples, augment_fn=augment_fn, vmapped=vmapped,
        skip_nonfinite=skip_nonfinite), filename="fit.json")
    if run_config is not None:
      check_run_config(workdir, run_config)
    ckpt = Checkpointer(workdir / "checkpoints")
    restored = ckpt.restore_latest(state)
    if restored is not None:
      state, meta = restored
      start = int(meta["epoch"])
      saved_key = np.asarray(meta["rng_key_data"], dtype=np.uint32)
      if not np.array_equal(saved_key, key_data(rng)):
        raise ValueError(
            f"workdir {workdir} was checkpointed with a different rng key; "
            "resume with the same seed or use a new workdir.")
    writer = MetricWriter(workdir)
    # Epochs after the restored checkpoint run again: drop their records.
    writer.drop_after(start * steps_per_epoch)

  data = jax.device_put(data)
  bar = Progress(epochs * steps_per_epoch, initial=start * steps_per_epoch,
                 desc=desc, enabled=progress)
  history = []
  try:
    for epoch in range(start, epochs):
      t0 = time.perf_counter()
      state, metrics = run_epoch(state, teacher, data, rng, epoch)
      metrics = jax.device_get(metrics)
      seconds = time.perf_counter() - t0
      bad_metrics = metrics.pop("nonfinite_metrics")
      first_bad = np.asarray(metrics["first_nonfinite_step"])
      if on_nonfinite == "raise" and np.any(first_bad >= 0):
        raise FloatingPointError(_nonfinite_message(
            epoch, epochs, first_bad, bad_metrics, metrics,
            np.asarray(jax.device_get(state.step)), steps_per_epoch,
            ckpt.all_epochs() if ckpt is not None else None))
      record = {k: np.asarray(v) for k, v in metrics.items()}
      last = epoch + 1 == epochs
      if eval_fn is not None and (last or (eval_every and
                                           (epoch + 1) % eval_every == 0)):
        record.update({k: np.asarray(v) for k, v in eval_fn(state).items()})
      record["epoch_seconds"] = np.asarray(seconds)
      record["steps_per_s"] = np.asarray(steps_per_epoch / seconds)
      history.append(record)
      bar.update(steps_per_epoch, record)
      if writer is not None:
        writer.write((epoch + 1) * steps_per_epoch, record, epoch=epoch + 1)
      if ckpt is not None and (last or (epoch + 1) % checkpoint_every == 0):
        ckpt.save(epoch + 1, state, rng)
  finally:
    bar.close()
    if writer is not None:
      writer.close()
    if ckpt is not None:
      ckpt.close()
  return state, history


def _fit_record(state: PyTree, *, objective: str, batch_size: int,
                num_examples: int, augment_fn: Optional[Callable],
                vmapped: bool, skip_nonfinite: bool) -> dict:
  """What ``fit`` sees of a run, for ``<workdir>/fit.json`` (not ``epochs``)."""
  if augment_fn is None:
    augment = None
  else:
    augment = augment_lib.describe(augment_fn)
  return {"objective": objective, "batch_size": int(batch_size),
          "num_examples": int(num_examples), "augment": augment,
          "vmapped": bool(vmapped), "skip_nonfinite": bool(skip_nonfinite),
          "temperature": np.asarray(jax.device_get(state.temperature)).tolist(),
          "alpha": np.asarray(jax.device_get(state.alpha)).tolist(),
          "state": leaf_specs(state)}


def check_inputs(state: PyTree, teacher, data: dict, *, objective: str = "kd",
                 augment_fn: Optional[Callable] = None,
                 vmapped: bool = False) -> None:
  """Host-side checks of :func:`fit`'s inputs; nothing is compiled.

  The student's (and teacher's) logits shapes come from ``jax.eval_shape``
  on one example, which traces the models abstractly without compiling.

  Raises:
    ValueError: teacher and student predict different numbers of classes,
      or a label lies outside ``[0, num_classes)``.
    TypeError: the labels are not integers.
  """
  for k in ("image", "label"):
    if k not in data:
      raise ValueError(f"data must be a dict with 'image' and 'label' keys, "
                       f"got keys {sorted(data)}.")
  apply_fn = getattr(state, "apply_fn", None)
  params = getattr(state, "params", None)
  if apply_fn is None or params is None:
    return
  image = data["image"]
  x = jax.eval_shape(train.prepare_images, jax.ShapeDtypeStruct(
      (1,) + tuple(image.shape[1:]), image.dtype))
  member = (lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype)) if vmapped \
      else (lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype))
  key = jax.eval_shape(lambda: jax.random.key(0))
  if augment_fn is not None:
    x = jax.eval_shape(augment_fn, key, x)
  student = jax.eval_shape(lambda p, x, k: apply_fn(p, x, True, k),
                           jax.tree.map(member, params), x, key).shape
  teacher_shape = None
  if objective != "hard":
    if "teacher_logits" in data:
      teacher_shape = (1,) + tuple(data["teacher_logits"].shape[1:])
    elif teacher is not None:
      teacher_shape = jax.eval_shape(teacher, x).shape
  validate.validate_models(teacher_shape, student)
  validate.validate_labels(np.asarray(data["label"]), student[-1])


def _nonfinite_message(epoch: int, epochs: int, first_bad: np.ndarray,
                       bad_metrics: dict, metrics: dict,
                       end_step: np.ndarray, steps_per_epoch: int,
                       saved: Optional[list[int]]) -> str:
  """One line: where the epoch's first non-finite step was, and what."""
  finite = np.asarray(metrics["finite"])
  if first_bad.ndim:  # A vmapped sweep: report its first affected member.
    members = np.flatnonzero(first_bad >= 0)
    m = int(members[0])
    step, end, finite = int(first_bad[m]), int(end_step[m]), float(finite[m])
    bad = {k: bool(np.asarray(v)[m]) for k, v in bad_metrics.items()}
    who = (f" in sweep member {m} (members affected: "
           f"{[int(i) for i in members]})")
  else:
    step, end, finite = int(first_bad), int(end_step), float(finite)
    bad = {k: bool(v) for k, v in bad_metrics.items()}
    who = ""
  order = [k for k in _METRIC_ORDER if k in bad] + sorted(
      k for k in bad if k not in _METRIC_ORDER)
  names = [k for k in order if bad[k]]
  what = (f"non-finite metric {names[0]!r}" +
          (f" (also {', '.join(repr(n) for n in names[1:])})"
           if names[1:] else "")) if names else "non-finite gradients"
  num_bad = round((1.0 - finite) * steps_per_epoch)
  index = step - (end - steps_per_epoch)
  last = (f"the last checkpoint is epoch {saved[-1]}" if saved
          else "no checkpoint was written" if saved is not None
          else "nothing was saved (no workdir)")
  return (
      f"epoch {epoch + 1}/{epochs}: {what} at global step {step}{who} "
      f"(step {index + 1} of {steps_per_epoch} in the epoch; {num_bad} "
      f"non-finite step(s) in the epoch). The non-finite updates were not "
      f"applied and this epoch was not checkpointed; {last}. Check the data "
      "for NaN/inf, lower the learning rate, or pass on_nonfinite='skip'.")
