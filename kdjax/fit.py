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

A workdir remembers the run configuration it was started with
(``run_config.json``); starting a different configuration in the same
workdir raises instead of silently mixing two runs.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Any, Callable, Optional

import jax
import numpy as np

from kdjax import loops, sweep, train
from kdjax.checkpoint import Checkpointer
from kdjax.progress import MetricWriter, Progress

__all__ = ["fit", "check_run_config"]

PyTree = Any


def check_run_config(workdir: str | pathlib.Path, run_config: dict) -> None:
  """Records ``run_config`` in ``workdir``, or checks it matches the record.

  Raises:
    ValueError: if the workdir holds a run of a different configuration.
  """
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / "run_config.json"
  canonical = json.loads(json.dumps(run_config, sort_keys=True, default=str))
  if path.exists():
    old = json.loads(path.read_text())
    if old != canonical:
      diff = sorted(k for k in set(old) | set(canonical)
                    if old.get(k) != canonical.get(k))
      raise ValueError(
          f"workdir {workdir} holds a run with a different configuration "
          f"(keys differing: {diff}). Use a new --workdir, or delete {workdir} "
          "to start over.")
    return
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(canonical, indent=2, sort_keys=True))
  os.replace(tmp, path)


def fit(state: PyTree, teacher, data: dict, *, epochs: int, batch_size: int,
        rng: jax.Array, objective: str = "kd",
        augment_fn: Optional[Callable] = None,
        workdir: Optional[str | pathlib.Path] = None,
        checkpoint_every: int = 1, run_config: Optional[dict] = None,
        eval_fn: Optional[Callable[[PyTree], dict]] = None,
        eval_every: int = 0, vmapped: bool = False, desc: str = "train",
        progress: Optional[bool] = None,
        skip_nonfinite: bool = True) -> tuple[PyTree, list[dict]]:
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
      :func:`kdjax.train.make_train_step`.
    workdir: where checkpoints, ``metrics.jsonl`` and ``run_config.json``
      go; None trains in memory only.
    checkpoint_every: checkpoint period in epochs (the last epoch is always
      saved).
    run_config: a JSON-able description of the run, checked against the
      workdir's (see :func:`check_run_config`).
    eval_fn: optional ``state -> dict`` of host metrics (e.g. validation
      errors), called every ``eval_every`` epochs and after the last.
    eval_every: period of ``eval_fn`` in epochs (0: only after the last).
    vmapped: ``state`` is a stacked sweep; epochs run under ``jax.vmap``.
    desc: label of the progress bar.
    progress: show the progress bar (default: unless ``KDJAX_PROGRESS=0``).

  Returns:
    ``(state, history)``: the final state and one metrics dict per epoch run
    in this call.
  """
  if epochs < 0:
    raise ValueError(f"epochs must be >= 0, got {epochs}.")
  num_examples = int(data["label"].shape[0])
  step = train.make_train_step(objective, augment_fn=augment_fn,
                               skip_nonfinite=skip_nonfinite)
  epoch_fn = loops.make_epoch_fn(step, batch_size=batch_size,
                                 num_examples=num_examples)
  steps_per_epoch = epoch_fn.steps_per_epoch
  if vmapped:
    epoch_fn = sweep.vmap_epoch(epoch_fn)
  run_epoch = jax.jit(epoch_fn, donate_argnums=(0,))

  start, ckpt, writer = 0, None, None
  if workdir is not None:
    workdir = pathlib.Path(workdir)
    if run_config is not None:
      check_run_config(workdir, run_config)
    ckpt = Checkpointer(workdir / "checkpoints")
    restored = ckpt.restore_latest(state)
    if restored is not None:
      state, meta = restored
      start = int(meta["epoch"])
      saved_key = np.asarray(meta["rng_key_data"], dtype=np.uint32)
      from kdjax.checkpoint import _key_to_data  # pylint: disable=g-import-not-at-top
      if not np.array_equal(saved_key, _key_to_data(rng)):
        raise ValueError(
            f"workdir {workdir} was checkpointed with a different rng key; "
            "resume with the same seed or use a new workdir.")
    writer = MetricWriter(workdir)

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
