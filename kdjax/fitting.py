"""The run: :func:`fit`, resumable epochs with progress, metrics, checkpoints.

:func:`fit` is what a user calls to distil a student in a few lines::

  spec = kdjax.StepSpec(objective="kd")
  state, history = kdjax.fit(state, teacher, data, epochs=20, batch_size=128,
                             rng=jax.random.key(0), spec=spec,
                             checkpoint=kdjax.Checkpointing("runs/mnist"))

It is orchestration only: it checks its inputs (:mod:`kdjax.validate`),
builds the step from its :class:`kdjax.StepSpec` (:mod:`kdjax.step`), runs
``epochs`` epochs in one of the epoch forms of :mod:`kdjax.loop` with a
live progress bar, appends per-epoch metrics to ``<workdir>/metrics.jsonl``
and checkpoints every ``Checkpointing.every_epochs`` epochs. Started again
with the same workdir, it resumes from the last good checkpoint and ends
with the same parameters (bit-identical on CPU) as an uninterrupted run:
the data order and every step's key are pure functions of the run's key,
the epoch index and the step counter.

A workdir remembers the run it was started with, and starting a different
one in the same workdir raises instead of silently mixing two runs:
``fit.json`` records what :func:`fit` itself sees (:func:`fit_record`: the
spec's :meth:`~kdjax.StepSpec.record`, batch size, number of examples,
sweep or not, the state's temperature and alpha, and every array's name,
shape and dtype), and ``run_config.json`` whatever else the caller passes
as ``Checkpointing.run_config`` (learning rate, schedule, data variant:
what ``fit`` cannot see). Only ``epochs`` may change, to extend a finished
run. On resume, the records of ``metrics.jsonl`` after the restored
checkpoint are dropped before the epochs that follow it are run again, so
every epoch appears once.

Before anything compiles, :func:`fit` checks its inputs on the host
(:func:`kdjax.validate.check_inputs`): teacher and student must predict the
same number of classes (shapes from ``jax.eval_shape``, which does not
compile) and the labels must lie in ``[0, num_classes)``.

Non-finite steps (``StepSpec.on_nonfinite``): with ``"skip"`` and
``"raise"`` a step whose loss or gradients are not finite is never applied
(the old parameters and optimizer state are kept, and ``state.skipped``
counts it; the per-epoch record holds ``'skipped'`` and
``'first_nonfinite_step'``). With ``"skip"`` training goes on; with
``"raise"``, :func:`fit` raises a ``FloatingPointError`` after the epoch,
naming the epoch, the first non-finite step and the metrics that were not
finite, without checkpointing that epoch (the last checkpoint holds the
state from before it). ``"apply"`` applies non-finite updates.

(The module is not called ``fit``: ``kdjax.fit`` is the function, and a
submodule of that name would be shadowed by it in the package namespace.)
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import time
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Optional, Union

import jax
import numpy as np

from kdjax import hparams as hparams_lib
from kdjax import mesh as mesh_lib
from kdjax import objectives, records
from kdjax import step as step_lib
from kdjax import student as student_lib
from kdjax import sweep, validate
from kdjax.checkpoint import Checkpointer, key_data, leaf_specs, write_atomic
from kdjax.fields import Fields
from kdjax.loop import device as device_loop
from kdjax.loop import host as host_loop
from kdjax.loop.summary import nonfinite_message
from kdjax.options import (Checkpointing, Evaluation, Loop, StepSpec,
                           step_spec)
from kdjax.progress import MetricWriter, Progress
from kdjax._types import PyTree
from kdjax.trees import copy_arrays

__all__ = ["fit", "fit_record", "check_run_config", "check_inputs",
           "choose_loop"]


def check_run_config(workdir: str | pathlib.Path, run_config: dict, *,
                     filename: str = "run_config.json",
                     write: bool = True) -> None:
  """Records ``run_config`` in ``workdir/filename``, or checks it matches.

  With ``write=False`` only an existing record is checked (nothing is
  created): a command checks early, before loading its data, and records
  the run once the data has loaded, so that a run that fails on its inputs
  leaves no record to refuse its corrected rerun.

  Raises:
    ValueError: if the workdir holds a run of a different configuration,
      or is a file.
  """
  validate.check_workdir(workdir)
  workdir = pathlib.Path(workdir)
  path = workdir / filename
  if not write and not path.exists():
    return
  workdir.mkdir(parents=True, exist_ok=True)
  canonical = json.loads(json.dumps(run_config, sort_keys=True, default=str))
  if path.exists():
    old = json.loads(path.read_text())
    if filename == "fit.json":  # Written by an older kdjax?
      old = hparams_lib.upgrade_fit_record(old)
    if old != canonical and not records.same_fit_record(old, canonical):
      diff = sorted(k for k in set(old) | set(canonical)
                    if old.get(k) != canonical.get(k))
      raise validate.WorkdirMismatchError(
          f"workdir {workdir} holds a run with a different configuration "
          f"({path.name}: keys differing: {diff}"
          f"{hparams_lib.mismatch_hint(old, canonical, diff)}). Pass a new "
          f"workdir= (--workdir on the command line), or delete {workdir} "
          "to start over.")
    return
  if write and mesh_lib.is_primary():  # Under jax.distributed, process 0.
    write_atomic(path, json.dumps(canonical, indent=2, sort_keys=True))


# fit's keyword arguments before the option types, and where each went.
_LEGACY = {
    "objective": "spec", "fields": "spec", "augment_fn": "spec",
    "input_transform": "spec", "compute_dtype": "spec",
    "keep_float32": "spec", "skip_nonfinite": "spec", "on_nonfinite": "spec",
    "workdir": "checkpoint", "checkpoint_every": "checkpoint",
    "checkpoint_every_steps": "checkpoint", "run_config": "checkpoint",
    "eval_fn": "evaluation", "eval_every": "evaluation",
    "steps_per_epoch": "loop", "block_steps": "loop"}
_RENAMED = {"checkpoint_every": "every_epochs",
            "checkpoint_every_steps": "every_steps", "eval_fn": "fn",
            "eval_every": "every"}


def _options(spec, checkpoint, evaluation, loop, legacy: dict):
  """The four option objects from fit's arguments (and deprecated keywords).

  Shorthands: ``checkpoint`` may be a workdir path, ``evaluation`` a
  function, ``loop`` a form name.
  """
  unknown = sorted(set(legacy) - set(_LEGACY))
  if unknown:
    raise TypeError(f"fit() got unexpected keyword argument(s) {unknown}.")
  if legacy:
    warnings.warn(
        f"fit's keywords {sorted(legacy)} are deprecated: pass spec="
        "kdjax.StepSpec(...), checkpoint=kdjax.Checkpointing(...), "
        "evaluation=kdjax.Evaluation(...), loop=kdjax.Loop(...).",
        DeprecationWarning, stacklevel=3)
  groups = {g: {} for g in ("spec", "checkpoint", "evaluation", "loop")}
  for k, v in legacy.items():
    groups[_LEGACY[k]][_RENAMED.get(k, k)] = v
  given = {"spec": spec, "checkpoint": checkpoint, "evaluation": evaluation,
           "loop": loop}
  for g, kw in groups.items():
    if kw and isinstance(given[g], (StepSpec, Checkpointing, Evaluation,
                                    Loop)):
      raise TypeError(f"pass either {g}= or the keywords {sorted(kw)}, not "
                      "both.")
  spec = step_spec(spec, stacklevel=4, **groups["spec"])
  if isinstance(checkpoint, (str, pathlib.Path)):
    checkpoint = Checkpointing(checkpoint)
  kw = groups["checkpoint"]
  if kw.get("workdir") is not None:
    checkpoint = Checkpointing(**kw)
  if callable(evaluation) and not isinstance(evaluation, Evaluation):
    evaluation = Evaluation(evaluation)
  if groups["evaluation"].get("fn") is not None:
    evaluation = Evaluation(**groups["evaluation"])
  form = loop if isinstance(loop, str) else "auto"
  loop = loop if isinstance(loop, Loop) else Loop(form, **groups["loop"])
  return spec, checkpoint, evaluation, loop


def fit(state: PyTree, teacher, data, *, epochs: int, rng: jax.Array,
        spec: Union[StepSpec, str, Callable, None] = None,
        batch_size: Optional[int] = None, mesh=None,
        checkpoint: Union[Checkpointing, str, pathlib.Path, None] = None,
        evaluation: Union[Evaluation, Callable, None] = None,
        loop: Union[Loop, str, None] = None, vmapped: bool = False,
        progress: Optional[bool] = None, desc: str = "train",
        **deprecated) -> tuple[PyTree, list[dict]]:
  """Trains ``state`` until it has trained ``epochs`` epochs.

  Args:
    state: a :class:`kdjax.TrainState` (or a stacked sweep state with
      ``vmapped=True``). A state that has already trained ``k`` epochs (an
      earlier call) continues from epoch ``k``.
    teacher: the frozen :class:`kdjax.Teacher`, or None for
      ``objective="hard"`` or when ``data`` holds cached teacher logits.
    data: device-resident data, a dict pytree of arrays with a shared
      leading axis, read through ``spec.fields`` (default ``'image'``,
      ``'label'``, optionally ``'teacher_logits'``), moved to the device
      once; or a host source of batches (:mod:`kdjax.loop.host`): a
      ``grain.MapDataset`` of batches, a grain ``IterDataset`` /
      ``DataLoader``, or a function ``epoch -> batches`` (a generator
      function included: it is called again each epoch and on resume).
      Never modified or donated.
    epochs: the run's total number of epochs (a resumed run continues up
      to it).
    rng: the run's key, ``jax.random.key(seed)`` (a stacked key per member
      when ``vmapped``).
    spec: what the step computes, a :class:`kdjax.StepSpec` (default
      ``StepSpec("kd")``); an objective name or function is shorthand for
      ``StepSpec(objective)``. It is the compile-cache key and, through
      :meth:`~kdjax.StepSpec.record`, part of ``fit.json``.
    batch_size: examples per step for device-resident data (the remainder
      of each epoch is dropped); host batches bring their own (a
      different ``batch_size`` with host data is an error).
    mesh: the ``jax.sharding.Mesh`` to train on (:mod:`kdjax.mesh`); None:
      :func:`kdjax.mesh.default_mesh`, every device on a ``"data"`` axis
      (data parallel; on one device nothing changes). ``batch_size`` is the
      global batch (host batches: each process's batches hold its
      ``1/process_count`` part); the batch axes must divide it. An
      ``"fsdp"`` axis also shards the student's params, its optimizer
      state and the teacher's params. Under ``jax.distributed`` every
      process makes the same call (see :mod:`kdjax.mesh`).
    checkpoint: a :class:`kdjax.Checkpointing` (or just its workdir): where
      checkpoints, ``metrics.jsonl``, ``fit.json`` and ``run_config.json``
      go, and how often; None trains in memory only.
    evaluation: a :class:`kdjax.Evaluation` (or just its function ``state
      -> dict`` of host metrics, called after the last epoch).
    loop: a :class:`kdjax.Loop` (or just its form, ``"auto"``, ``"scan"``
      or ``"steps"``): how an epoch runs (:func:`choose_loop` for
      ``"auto"``). Every form computes the same thing (the same batches
      and keys; the same params to float32 rounding).
    vmapped: ``state`` is a stacked sweep; epochs run under ``jax.vmap``.
    progress: show the progress bar (default: unless ``KDJAX_PROGRESS=0``).
    desc: label of the progress bar.
    **deprecated: the earlier signature's keywords (``objective=``,
      ``workdir=``, ``eval_fn=``, ...: ``_LEGACY``), turned into the option
      objects with a ``DeprecationWarning``.

  Returns:
    ``(state, history)``: the final state and one metrics dict per epoch run
    in this call. ``state`` is new: the arrays of the ``state`` passed in
    are copied before training (the compiled epochs donate their input), so
    the caller's params stay usable.

  Raises:
    FloatingPointError: ``on_nonfinite="raise"`` and a non-finite step.
    TypeError: ``rng`` is not a key (``rng=0``), or bad option types.
    ValueError: bad arguments or inputs (checked before compiling), or a
      workdir that is a file or holds a different run (``fit.json``,
      ``run_config.json``, :class:`kdjax.checkpoint.CheckpointMismatchError`).
  """
  spec, checkpoint, evaluation, loop = _options(spec, checkpoint, evaluation,
                                                loop, deprecated)
  _check_arguments(epochs, rng, checkpoint, vmapped)
  objectives.check_hparams(spec.objective, state.hparams, unread=True)
  run = _prepare(state, teacher, data, spec, loop, batch_size, vmapped,
                 mesh_lib.plan(mesh))
  # The compiled epochs donate the state they are given: train a copy, so
  # that no array the caller holds (the params it created the state from,
  # say) is deleted.
  state = copy_arrays(state) if run.plan.trivial else run.plan.place_state(
      state, lead=int(vmapped))
  teacher, run.rng = run.plan.place_teacher(teacher), run.plan.place_rng(rng)
  resumed = _position(state, run, epochs, checkpoint is None)
  if checkpoint is not None:
    state, resumed = _open_workdir(state, run, checkpoint, rng)
  return _train(run, state, teacher, rng, epochs, resumed, checkpoint,
                evaluation, Progress(
                    epochs * run.steps_per_epoch,
                    initial=resumed.epoch * run.steps_per_epoch +
                    resumed.step, desc=desc,
                    enabled=progress if mesh_lib.is_primary() else False))


def _check_arguments(epochs, rng, checkpoint, vmapped) -> None:
  if epochs < 0:
    raise ValueError(f"epochs must be >= 0, got {epochs}.")
  validate.check_key(rng, vmapped=vmapped)
  if checkpoint is not None:
    validate.check_workdir(checkpoint.workdir)


@dataclasses.dataclass
class _Run:
  """What fit runs: the data, the compiled epoch form, the sizes."""
  spec: StepSpec
  host: bool
  data: Any
  batch_size: int
  num_examples: int
  steps_per_epoch: int
  form: str
  vmapped: bool
  plan: mesh_lib.Plan
  rng: Any = None  # The run's key, placed for the plan.
  run_epoch: Optional[Callable] = None  # device data
  runner: Optional[host_loop.HostRunner] = None  # host data
  source: Optional[host_loop.HostSource] = None
  checker: Optional[validate.BatchChecker] = None
  block: Optional[int] = None


@dataclasses.dataclass
class _Resume:
  """Where a run starts: epoch, step in the epoch, data position."""
  epoch: int
  step: int
  data_state: Any = None
  ckpt: Optional[Checkpointer] = None
  writer: Optional[MetricWriter] = None


def _prepare(state, teacher, data, spec: StepSpec, loop: Loop,
             batch_size: Optional[int], vmapped: bool,
             plan: mesh_lib.Plan) -> _Run:
  """Checks the inputs (nothing compiles) and builds the epoch form."""
  if host_loop.is_host_source(data):
    source = host_loop.as_host_source(data, loop.steps_per_epoch)
    first = source.peek()
    if not isinstance(first, Mapping):
      raise host_loop.SourceError(
          f"the data's first batch is a {type(first).__name__}, not a dict "
          "of arrays (e.g. {'image': ..., 'label': ...}); nothing was "
          "trained on.")
    first = jax.tree.map(np.asarray, dict(first))
    size, num_classes = validate.check_inputs(state, teacher, first, spec,
                                              vmapped=vmapped)
    size = plan.global_batch_size(size)
    if batch_size is not None and batch_size != size:
      raise ValueError(
          f"fit got batch_size={batch_size}, but the host source's batches "
          f"hold {size} examples: host batches bring their own size; drop "
          "batch_size= or batch the source by it.")
    plan.check_batch_size(size)
    form = loop.form if loop.form != "auto" else choose_loop(
        state, first, spec=spec, vmapped=vmapped)
    steps = source.steps_per_epoch
    return _Run(
        spec, True, None, size, size * steps, steps, form, vmapped, plan,
        runner=_cached(("host", spec, vmapped, plan),
                       lambda: host_loop.HostRunner(
                           step_lib.make_train_step(spec), vmapped=vmapped,
                           plan=_nontrivial(plan))),
        source=source, checker=validate.BatchChecker(
            first, spec.fields, num_classes,
            needs_labels=spec.objective.needs_labels),
        block=1 if form == "steps" else max(1, min(int(loop.block_steps),
                                                   steps)))
  if batch_size is None:
    raise ValueError("fit needs batch_size= for device-resident data.")
  num_examples = validate.check_inputs(state, teacher, data, spec,
                                       vmapped=vmapped)[0]
  plan.check_batch_size(batch_size)
  form = loop.form if loop.form != "auto" else choose_loop(
      state, data, spec=spec, vmapped=vmapped)
  run_epoch, steps = _device_runner(spec, form, batch_size, num_examples,
                                    vmapped, _nontrivial(plan))
  return _Run(spec, False, plan.place_data(data), batch_size, num_examples,
              steps, form, vmapped, plan, run_epoch=run_epoch)


def _position(state, run: _Run, epochs: int, in_memory: bool) -> _Resume:
  """Where the state is: a state that has trained k epochs (an earlier fit
  call) starts at epoch k."""
  done_steps = int(np.ravel(mesh_lib.to_host(state.step))[0])
  start, start_step = divmod(done_steps, run.steps_per_epoch)
  if start_step and not run.host:
    raise ValueError(
        f"the state has taken {done_steps} steps, not a whole number of "
        f"epochs of {run.steps_per_epoch} steps; fit continues runs from "
        "epoch boundaries on device-resident data.")
  if in_memory and start >= epochs and epochs > 0:
    raise ValueError(
        f"the state has already trained {start} epoch(s) and epochs={epochs} "
        f"is the run's total: pass epochs={start + 1} to train one more "
        "(fit continues a run from the state's step; a per-epoch loop is "
        "`for e in range(E): state, _ = fit(state, ..., epochs=e + 1)`).")
  return _Resume(start, start_step)


def _open_workdir(state, run: _Run, checkpoint: Checkpointing, rng):
  """Checks the workdir's records and restores its last checkpoint."""
  workdir = checkpoint.workdir
  check_run_config(workdir, fit_record(
      state, run.spec, batch_size=run.batch_size,
      num_examples=run.num_examples, vmapped=run.vmapped, loop=run.form,
      source=run.source.describe() if run.host else None, block=run.block),
                   filename="fit.json")
  if checkpoint.run_config is not None:
    check_run_config(workdir, checkpoint.run_config)
  done = int(np.ravel(mesh_lib.to_host(state.step))[0])
  resume = _Resume(*divmod(done, run.steps_per_epoch))
  resume.ckpt = Checkpointer(workdir / "checkpoints")
  restored = resume.ckpt.restore_latest(state)
  if restored is not None:
    state, meta = restored
    resume.epoch = int(meta["epoch"])
    resume.step = int(meta.get("step_in_epoch", 0))
    resume.data_state = meta.get("data_state")
    saved_key = np.asarray(meta["rng_key_data"], dtype=np.uint32)
    if not np.array_equal(saved_key, key_data(rng)):
      raise ValueError(
          f"workdir {workdir} was checkpointed with a different rng key; "
          "resume with the same seed or pass a new workdir=.")
  if mesh_lib.is_primary():  # Under jax.distributed, process 0 writes.
    resume.writer = MetricWriter(workdir)
    # Steps after the restored checkpoint run again: drop their records.
    resume.writer.drop_after(resume.epoch * run.steps_per_epoch +
                             resume.step)
  return state, resume


def _saver(run: _Run, resume: _Resume, rng):
  """``save(state, epochs_done, step_in_epoch, data_state)``."""

  def save(state, epoch_done: int, step_in_epoch: int, data_state) -> None:
    if not run.host:
      resume.ckpt.save(epoch_done, state, rng)
      return
    extra = {"step_in_epoch": int(step_in_epoch)}
    if data_state is not None:
      extra["data_state"] = data_state
    # Host runs number their checkpoints by global step (mid-epoch ones).
    resume.ckpt.save(epoch_done * run.steps_per_epoch + step_in_epoch, state,
                     rng, extra={**extra, "epoch": int(epoch_done)})

  return save


def _host_epoch(run: _Run, state, teacher, rng, epoch: int, first_step: int,
                data_state, bar, save, every_steps: int):
  """One host epoch from ``first_step``, with mid-epoch checkpoints."""
  position = [first_step]

  def on_block(state_now, now, dstate):
    before, position[0] = position[0], now
    bar.update(now - before)
    # Checkpoint at the first block boundary past each multiple of
    # every_steps (blocks are never split).
    if (save is not None and every_steps and
        now // every_steps > before // every_steps and
        now < run.steps_per_epoch):
      save(state_now, epoch, now, dstate)

  return run.runner.run_epoch(state, teacher, run.source, rng, epoch,
                              first_step, data_state, block=run.block,
                              check=run.checker, on_block=on_block)


def _train(run: _Run, state, teacher, rng, epochs: int, resume: _Resume,
           checkpoint: Optional[Checkpointing],
           evaluation: Optional[Evaluation], bar: Progress):
  """The epochs from ``resume`` to ``epochs``: ``(state, history)``."""
  save = _saver(run, resume, rng) if resume.ckpt is not None else None
  history, data_state = [], resume.data_state
  try:
    for epoch in range(resume.epoch, epochs):
      t0 = time.perf_counter()
      first_step = resume.step if epoch == resume.epoch else 0
      if run.host:
        state, metrics, data_state = _host_epoch(
            run, state, teacher, run.rng, epoch, first_step,
            data_state if epoch == resume.epoch else None, bar, save,
            checkpoint.every_steps if checkpoint is not None else 0)
      else:
        state, metrics = run.run_epoch(state, teacher, run.data, run.rng,
                                       epoch)
      record = _epoch_record(run, state, mesh_lib.to_host(metrics), epoch,
                             epochs, run.steps_per_epoch - first_step,
                             time.perf_counter() - t0, resume, evaluation)
      history.append(record)
      bar.update(0 if run.host else run.steps_per_epoch, record)
      if resume.writer is not None:
        resume.writer.write((epoch + 1) * run.steps_per_epoch, record,
                            epoch=epoch + 1)
      if save is not None and (epoch + 1 == epochs or
                               (epoch + 1) % checkpoint.every_epochs == 0):
        save(state, epoch + 1, 0, data_state)
  finally:
    bar.close()
    if resume.writer is not None:
      resume.writer.close()
    if resume.ckpt is not None:
      resume.ckpt.close()
  return state, history


def _epoch_record(run: _Run, state, metrics: dict, epoch: int, epochs: int,
                  epoch_steps: int, seconds: float, resume: _Resume,
                  evaluation: Optional[Evaluation]) -> dict:
  """The epoch's history record (raises after a non-finite epoch with
  ``on_nonfinite="raise"``)."""
  bad_metrics = metrics.pop("nonfinite_metrics")
  first_bad = np.asarray(metrics["first_nonfinite_step"])
  if run.spec.on_nonfinite == "raise" and np.any(first_bad >= 0):
    raise FloatingPointError(nonfinite_message(
        epoch, epochs, first_bad, bad_metrics, metrics,
        mesh_lib.to_host(state.step), epoch_steps,
        resume.ckpt.all_epochs() if resume.ckpt is not None else None))
  record = {k: np.asarray(v) for k, v in metrics.items()}
  if evaluation is not None and (epoch + 1 == epochs or (
      evaluation.every and (epoch + 1) % evaluation.every == 0)):
    record.update({k: np.asarray(v)
                   for k, v in evaluation.fn(state).items()})
  record["epoch_seconds"] = np.asarray(seconds)
  record["steps_per_s"] = np.asarray(epoch_steps / seconds)
  return record


def fit_record(state: PyTree, spec: StepSpec, *, batch_size: int,
               num_examples: int, vmapped: bool = False, loop: str = "scan",
               source: Optional[str] = None,
               block: Optional[int] = None) -> dict:
  """What ``fit`` sees of a run, for ``<workdir>/fit.json`` (not ``epochs``).

  The spec's :meth:`~kdjax.StepSpec.record` plus the sizes, the sweep flag,
  the state's hyperparameters (and its schedules' values) and every
  array's name, shape and dtype. Settings added to ``fit`` later are
  recorded only when they differ from their defaults (a ``"scan"`` loop,
  no host source, no schedule), so that the records of earlier runs still
  match and resume (``temperature`` and ``alpha``, once keys of their own,
  are read as ``hparams``: :func:`kdjax.hparams.upgrade_fit_record`).
  """
  record = {**spec.record(), "batch_size": int(batch_size),
            "num_examples": int(num_examples), "vmapped": bool(vmapped),
            "hparams": {k: np.asarray(mesh_lib.to_host(v)).tolist()
                        for k, v in state.hparams.items()},
            "state": leaf_specs(state)}
  if loop != "scan":
    record["loop"] = loop  # A resumed run replays the same form.
  if source is not None:
    record["source"] = source
    record["block"] = int(block)
  if state.schedules:  # A schedule is identified by its values.
    record["schedules"] = {k: hparams_lib.schedule_record(fn)
                           for k, fn in state.schedules}
  return record


_RUNNERS: dict = {}


def _cached(key, build):
  """One compiled runner per configuration: a second fit does not recompile."""
  try:
    hash(key)
  except TypeError:
    return build()
  if key not in _RUNNERS:
    if len(_RUNNERS) >= 64:
      _RUNNERS.pop(next(iter(_RUNNERS)))
    _RUNNERS[key] = build()
  return _RUNNERS[key]


def _device_runner(spec: StepSpec, form: str, batch_size: int,
                   num_examples: int, vmapped: bool, plan):
  """``(run_epoch, steps_per_epoch)`` for device-resident data."""

  def build():
    step = step_lib.make_train_step(spec)
    if form == "steps":
      run = device_loop.make_stepwise_epoch_fn(
          step, batch_size=batch_size, num_examples=num_examples,
          vmapped=vmapped, nonfinite_diagnostics=True, plan=plan)
      return run, run.steps_per_epoch
    epoch_fn = device_loop.make_epoch_fn(step, batch_size=batch_size,
                                         num_examples=num_examples,
                                         nonfinite_diagnostics=True,
                                         plan=plan)
    steps = epoch_fn.steps_per_epoch
    if vmapped:
      epoch_fn = sweep.vmap_epoch(epoch_fn)
    return jax.jit(epoch_fn, donate_argnums=(0,)), steps

  return _cached(("device", spec, form, batch_size, num_examples, vmapped,
                  plan), build)


def _nontrivial(plan):
  """``plan`` where it does something; None on one device (as before)."""
  return None if plan is None or plan.trivial else plan


def _has_convolution(jaxpr) -> bool:
  """Whether a (closed) jaxpr or any jaxpr nested in it has a convolution."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      return True
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (list, tuple)) else [v]):
        if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
          if _has_convolution(sub):
            return True
  return False


def choose_loop(state: PyTree, data: dict, *, spec: Optional[StepSpec] = None,
                vmapped: bool = False, fields: Optional[Fields] = None,
                input_transform: Optional[Callable] = None) -> str:
  """The epoch form :func:`fit` uses with ``Loop("auto")``.

  The rule, from measurements on XLA:CPU (``benchmarks/train_step.py``):
  a step with a convolution runs several times slower inside a
  ``lax.scan`` than as a jitted program of its own (a two-layer CNN at
  batch 128: about 15x), while an MLP's step runs faster in the scan (no
  dispatch per step). So: on the CPU, ``"steps"`` for a student whose
  forward pass has a convolution, else ``"scan"``; on GPU and TPU always
  ``"scan"``. The rule looks only at the student's traced forward pass
  (``jax.make_jaxpr``, nothing is compiled), so it is deterministic and a
  resumed run makes the same choice. ``spec`` gives the fields and input
  transform (``fields`` and ``input_transform`` are the older spelling).
  """
  if jax.default_backend() != "cpu":
    return "scan"
  if spec is None:
    spec = StepSpec(fields=fields, input_transform=input_transform)
  apply_fn = getattr(state, "apply_fn", None)
  if apply_fn is None:
    return "scan"

  def forward(params, model_state, batch):
    xs = student_lib.model_inputs(batch, spec.fields.input_names,
                                  input_transform=spec.input_transform)
    return apply_fn(params, model_state, *xs, train=True,
                    rng=jax.random.key(0))[0]

  jaxpr = jax.make_jaxpr(forward)(
      validate.member_specs(state.params, vmapped),
      validate.member_specs(state.model_state, vmapped),
      validate.example_specs(data))
  return "steps" if _has_convolution(jaxpr) else "scan"


def check_inputs(state: PyTree, teacher, data: dict, *,
                 spec: Optional[StepSpec] = None, vmapped: bool = False,
                 **step_options) -> int:
  """:func:`kdjax.validate.check_inputs` for a spec (or its keywords).

  Returns:
    The number of examples (the data's leading axis).
  """
  spec = step_spec(spec, **step_options)
  return validate.check_inputs(state, teacher, data, spec,
                               vmapped=vmapped)[0]
