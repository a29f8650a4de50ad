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
number of examples, augmentation, sweep or not, the state's hyperparameters
and the values of its schedules, every array's name, shape and dtype, and
for an objective that is not a kdjax built-in a hash of its code), and
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
from collections.abc import Mapping
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import augment as augment_lib
from kdjax import hparams as hparams_lib
from kdjax import hostdata
from kdjax import fields as fields_lib
from kdjax import loops, objectives, sweep, train, validate
from kdjax import mesh as mesh_lib
from kdjax.fields import Fields
from kdjax.checkpoint import Checkpointer, key_data, leaf_specs, write_atomic
from kdjax.progress import MetricWriter, Progress
from kdjax._types import PyTree
from kdjax.trees import copy_arrays

__all__ = ["fit", "check_run_config", "check_inputs", "choose_loop"]

ON_NONFINITE = ("skip", "raise")
LOOPS = ("auto", "scan", "steps")
# The order in which non-finite metrics are named (then the rest, sorted).
_METRIC_ORDER = ("loss", "hard_loss", "soft_loss", "grad_norm")


def check_run_config(workdir: str | pathlib.Path, run_config: dict, *,
                     filename: str = "run_config.json",
                     write: bool = True) -> None:
  """Records ``run_config`` in ``workdir/filename``, or checks it matches.

  With ``write=False`` only an existing record is checked (nothing is
  created): a command checks early, before loading its data, and records
  the run once the data has loaded, so that a run that fails on its inputs
  leaves no record to refuse its corrected rerun.

  Raises:
    ValueError: if the workdir holds a run of a different configuration.
  """
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
    if old != canonical and not augment_lib.same_fit_record(old, canonical):
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


def fit(state: PyTree, teacher, data, *, epochs: int,
        rng: jax.Array, batch_size: Optional[int] = None,
        objective: Union[str, Callable] = "kd",
        fields: Optional[Fields] = None,
        augment_fn: Optional[Callable] = None,
        input_transform: Optional[Callable] = None,
        compute_dtype=None, keep_float32: Optional[Sequence[str]] = None,
        workdir: Optional[str | pathlib.Path] = None,
        checkpoint_every: int = 1, run_config: Optional[dict] = None,
        eval_fn: Optional[Callable[[PyTree], dict]] = None,
        eval_every: int = 0, vmapped: bool = False, desc: str = "train",
        progress: Optional[bool] = None,
        skip_nonfinite: bool = True,
        on_nonfinite: str = "skip",
        loop: str = "auto", steps_per_epoch: Optional[int] = None,
        block_steps: int = 16,
        checkpoint_every_steps: int = 0,
        mesh=None) -> tuple[PyTree, list[dict]]:
  """Trains ``state`` until it has trained ``epochs`` epochs.

  Args:
    state: a :class:`kdjax.train.TrainState` (or a stacked sweep state with
      ``vmapped=True``). A state that has already trained ``k`` epochs (an
      earlier call) continues from epoch ``k``.
    teacher: the frozen :class:`kdjax.teacher.Teacher`, or None for
      ``objective="hard"`` or when ``data`` holds cached teacher logits.
    data: device-resident data, a dict pytree of arrays with a shared
      leading axis, read through ``fields`` (default ``'image'``,
      ``'label'``, optionally ``'teacher_logits'``), moved to the device
      once; or a host source of batches (:mod:`kdjax.hostdata`): a
      ``grain.MapDataset`` of batches, a grain ``IterDataset`` /
      ``DataLoader``, or a function ``epoch -> batches``. Never modified
      or donated.
    epochs: the run's total number of epochs (a resumed run continues up
      to it).
    rng: the run's key (a stacked key per member when ``vmapped``).
    batch_size: examples per step for device-resident data (the remainder
      of each epoch is dropped); host batches bring their own (a
      different ``batch_size`` with host data is an error).
    objective: see :func:`kdjax.train.make_train_step`.
    fields: see :func:`kdjax.train.make_train_step`.
    augment_fn: see :func:`kdjax.train.make_train_step`.
    input_transform: see :func:`kdjax.train.make_train_step`.
    compute_dtype: see :func:`kdjax.train.make_train_step`.
    keep_float32: see :func:`kdjax.train.make_train_step`.
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
    skip_nonfinite: see :func:`kdjax.train.make_train_step`;
      ``skip_nonfinite=False`` (apply non-finite updates) is only allowed
      with ``on_nonfinite="skip"``.
    on_nonfinite: ``"skip"`` (skip non-finite steps and go on) or
      ``"raise"`` (skip them, then raise ``FloatingPointError`` at the end
      of the epoch, before it is checkpointed).
    loop: how an epoch runs: ``"scan"`` (the whole epoch in one
      ``lax.scan``), ``"steps"`` (a Python loop of one jitted step per
      batch, :func:`kdjax.loops.make_stepwise_epoch_fn`), or ``"auto"``
      (:func:`choose_loop`). Both compute the same thing (the same batches
      and keys; the same params to float32 rounding). For host data,
      ``"steps"`` runs one jitted step per batch and ``"scan"`` jitted
      blocks of ``block_steps`` steps.
    steps_per_epoch: batches per epoch of a host source whose length is
      unknown (a grain ``IterDataset``); otherwise taken from the source.
    block_steps: steps per jitted block on the host path (the batches of a
      block are stacked into one transfer).
    checkpoint_every_steps: on the host path, also checkpoint within an
      epoch, at the first block boundary past every multiple of this many
      steps (0: at epoch ends only), with the data position, so that a
      killed run resumes where it was.
    mesh: the ``jax.sharding.Mesh`` to train on (:mod:`kdjax.mesh`); None:
      :func:`kdjax.mesh.default_mesh`, every device on a ``"data"`` axis
      (data parallel; on one device nothing changes). ``batch_size`` is the
      global batch (host batches: each process's batches hold its
      ``1/process_count`` part); the batch axes must divide it. An
      ``"fsdp"`` axis also shards the student's params, its optimizer
      state and the teacher's params. Under ``jax.distributed`` every
      process makes the same call (see :mod:`kdjax.mesh`).

  Returns:
    ``(state, history)``: the final state and one metrics dict per epoch run
    in this call. ``state`` is new: the arrays of the ``state`` passed in
    are copied before training (the compiled epochs donate their input), so
    the caller's params stay usable.

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
  fields = Fields() if fields is None else fields
  obj = objectives.get(objective)
  objectives.check_hparams(obj, state.hparams, unread=True)
  if loop not in LOOPS:
    raise ValueError(f"loop must be one of {LOOPS}, got {loop!r}.")
  host = hostdata.is_host_source(data)
  if host:
    source = hostdata.as_host_source(data, steps_per_epoch)
    first = source.peek()
    if not isinstance(first, Mapping):
      raise hostdata.SourceError(
          f"the data's first batch is a {type(first).__name__}, not a dict "
          "of arrays (e.g. {'image': ..., 'label': ...}); nothing was "
          "trained on.")
    first = jax.tree.map(np.asarray, dict(first))
    given_batch_size = batch_size
    batch_size, num_classes = _check_inputs(
        state, teacher, first, obj=obj, fields=fields, augment_fn=augment_fn,
        input_transform=input_transform, vmapped=vmapped)
    plan = mesh_lib.plan(mesh)
    batch_size = plan.global_batch_size(batch_size)
    if given_batch_size is not None and given_batch_size != batch_size:
      raise ValueError(
          f"fit got batch_size={given_batch_size}, but the host source's "
          f"batches hold {batch_size} examples: host batches bring their own "
          "size; drop batch_size= or batch the source by it.")
    num_examples = batch_size * source.steps_per_epoch
    checker = hostdata.BatchChecker(first, fields, num_classes,
                                    needs_labels=obj.needs_labels)
  else:
    if batch_size is None:
      raise ValueError("fit needs batch_size= for device-resident data.")
    plan = mesh_lib.plan(mesh)
    num_examples = check_inputs(
        state, teacher, data, objective=obj, fields=fields,
        augment_fn=augment_fn, input_transform=input_transform,
        vmapped=vmapped)
  plan.check_batch_size(batch_size)
  if loop == "auto":
    loop = choose_loop(state, first if host else data, fields=fields,
                       input_transform=input_transform, vmapped=vmapped)
  step_kw = dict(fields=fields, augment_fn=augment_fn,
                 input_transform=input_transform,
                 compute_dtype=compute_dtype,
                 keep_float32=tuple(keep_float32 or ()),
                 skip_nonfinite=skip_nonfinite)
  if host:
    runner = _host_runner(obj, vmapped=vmapped, plan=plan, **step_kw)
    steps_per_epoch = source.steps_per_epoch
    block = 1 if loop == "steps" else max(1, min(int(block_steps),
                                                 steps_per_epoch))
  else:
    run_epoch, steps_per_epoch = _device_runner(
        obj, loop=loop, batch_size=batch_size, num_examples=num_examples,
        vmapped=vmapped, plan=plan, **step_kw)

  # The compiled epochs donate the state they are given: train a copy, so
  # that no array the caller holds (the params it created the state from,
  # say) is deleted.
  state = copy_arrays(state) if plan.trivial else plan.place_state(
      state, lead=int(vmapped))
  teacher, run_rng = plan.place_teacher(teacher), plan.place_rng(rng)
  # A run continues from the state's own position: a state that has trained
  # k epochs (an earlier fit call) starts at epoch k.
  done_steps = int(np.ravel(mesh_lib.to_host(state.step))[0])
  start, start_step, data_state = divmod(done_steps, steps_per_epoch) + (
      None,)
  if start_step and not host:
    raise ValueError(
        f"the state has taken {done_steps} steps, not a whole number of "
        f"epochs of {steps_per_epoch} steps; fit continues runs from epoch "
        "boundaries on device-resident data.")
  ckpt, writer = None, None
  if workdir is not None:
    workdir = pathlib.Path(workdir)
    check_run_config(workdir, _fit_record(
        state, objective=obj, batch_size=batch_size,
        num_examples=num_examples, augment_fn=augment_fn, vmapped=vmapped,
        skip_nonfinite=skip_nonfinite, fields=fields,
        input_transform=input_transform, compute_dtype=compute_dtype,
        keep_float32=keep_float32, loop=loop,
        source=source.describe() if host else None,
        block=block if host else None), filename="fit.json")
    if run_config is not None:
      check_run_config(workdir, run_config)
    ckpt = Checkpointer(workdir / "checkpoints")
    restored = ckpt.restore_latest(state)
    if restored is not None:
      state, meta = restored
      start = int(meta["epoch"])
      start_step = int(meta.get("step_in_epoch", 0))
      data_state = meta.get("data_state")
      saved_key = np.asarray(meta["rng_key_data"], dtype=np.uint32)
      if not np.array_equal(saved_key, key_data(rng)):
        raise ValueError(
            f"workdir {workdir} was checkpointed with a different rng key; "
            "resume with the same seed or use a new workdir.")
    writer = MetricWriter(workdir) if mesh_lib.is_primary() else None
    # Steps after the restored checkpoint run again: drop their records.
    if writer is not None:
      writer.drop_after(start * steps_per_epoch + start_step)
  elif start >= epochs and epochs > 0:
    raise ValueError(
        f"the state has already trained {start} epoch(s) and epochs={epochs} "
        f"is the run's total: pass epochs={start + 1} to train one more "
        "(fit continues a run from the state's step; a per-epoch loop is "
        "`for e in range(E): state, _ = fit(state, ..., epochs=e + 1)`).")

  if not host:
    data = plan.place_data(data)
  bar = Progress(epochs * steps_per_epoch,
                 initial=start * steps_per_epoch + start_step, desc=desc,
                 enabled=progress if mesh_lib.is_primary() else False)

  def save(state, epoch_done: int, step_in_epoch: int, data_state) -> None:
    if not host:
      ckpt.save(epoch_done, state, rng)
      return
    extra = {"step_in_epoch": int(step_in_epoch)}
    if data_state is not None:
      extra["data_state"] = data_state
    # Host runs number their checkpoints by global step (mid-epoch ones).
    ckpt.save(epoch_done * steps_per_epoch + step_in_epoch, state, rng,
              extra={**extra, "epoch": int(epoch_done)})

  history = []
  try:
    for epoch in range(start, epochs):
      t0 = time.perf_counter()
      first_step = start_step if epoch == start else 0
      if host:
        def on_block(state_now, position, dstate, _epoch=epoch):
          before, on_block.position = on_block.position, position
          bar.update(position - before)
          # Checkpoint at the first block boundary past each multiple of
          # checkpoint_every_steps (blocks are never split).
          if (ckpt is not None and checkpoint_every_steps and
              position // checkpoint_every_steps >
              before // checkpoint_every_steps and
              position < steps_per_epoch):
            save(state_now, _epoch, position, dstate)

        on_block.position = first_step
        state, metrics, data_state = runner.run_epoch(
            state, teacher, source, run_rng, epoch, first_step,
            data_state if epoch == start else None, block=block,
            check=checker, on_block=on_block)
      else:
        state, metrics = run_epoch(state, teacher, data, run_rng, epoch)
      metrics = mesh_lib.to_host(metrics)
      seconds = time.perf_counter() - t0
      bad_metrics = metrics.pop("nonfinite_metrics")
      first_bad = np.asarray(metrics["first_nonfinite_step"])
      epoch_steps = steps_per_epoch - first_step
      if on_nonfinite == "raise" and np.any(first_bad >= 0):
        raise FloatingPointError(_nonfinite_message(
            epoch, epochs, first_bad, bad_metrics, metrics,
            mesh_lib.to_host(state.step), epoch_steps,
            ckpt.all_epochs() if ckpt is not None else None))
      record = {k: np.asarray(v) for k, v in metrics.items()}
      last = epoch + 1 == epochs
      if eval_fn is not None and (last or (eval_every and
                                           (epoch + 1) % eval_every == 0)):
        record.update({k: np.asarray(v) for k, v in eval_fn(state).items()})
      record["epoch_seconds"] = np.asarray(seconds)
      record["steps_per_s"] = np.asarray(epoch_steps / seconds)
      history.append(record)
      bar.update(0 if host else steps_per_epoch, record)
      if writer is not None:
        writer.write((epoch + 1) * steps_per_epoch, record, epoch=epoch + 1)
      if ckpt is not None and (last or (epoch + 1) % checkpoint_every == 0):
        save(state, epoch + 1, 0, data_state)
  finally:
    bar.close()
    if writer is not None:
      writer.close()
    if ckpt is not None:
      ckpt.close()
  return state, history


def _name(fn: Optional[Callable]) -> Optional[str]:
  if fn is None:
    return None
  return getattr(fn, "__qualname__", type(fn).__name__)


def _fit_record(state: PyTree, *, objective, batch_size: int,
                num_examples: int, augment_fn: Optional[Callable],
                vmapped: bool, skip_nonfinite: bool,
                fields: Optional[Fields] = None,
                input_transform: Optional[Callable] = None,
                compute_dtype=None,
                keep_float32: Optional[Sequence[str]] = None,
                loop: str = "scan", source: Optional[str] = None,
                block: Optional[int] = None) -> dict:
  """What ``fit`` sees of a run, for ``<workdir>/fit.json`` (not ``epochs``).

  Settings added to ``fit`` later (fields, input transform, precision,
  schedules, a custom objective's code) are recorded only when they differ
  from their defaults, so that the records of earlier runs still match and
  resume (``temperature`` and ``alpha``, once keys of their own, are read
  as ``hparams``: :func:`kdjax.hparams.upgrade_fit_record`).
  """
  record = {**objectives.record(objective), "batch_size": int(batch_size),
            "num_examples": int(num_examples),
            "augment": augment_lib.describe(augment_fn),
            "vmapped": bool(vmapped), "skip_nonfinite": bool(skip_nonfinite),
            "hparams": {k: np.asarray(mesh_lib.to_host(v)).tolist()
                        for k, v in state.hparams.items()},
            "state": leaf_specs(state)}
  if fields is not None and fields != Fields():
    record["fields"] = fields.describe()
  if input_transform is not None:
    record["input_transform"] = _name(input_transform)
  if compute_dtype is not None:
    record["compute_dtype"] = str(np.dtype(compute_dtype))
    record["keep_float32"] = sorted(keep_float32 or ())
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


def _device_runner(obj, *, loop: str, batch_size: int, num_examples: int,
                   vmapped: bool, plan=None, **step_kw):
  """``(run_epoch, steps_per_epoch)`` for device-resident data."""

  def build():
    step = train.make_train_step(obj, **step_kw)
    if loop == "steps":
      run = loops.make_stepwise_epoch_fn(
          step, batch_size=batch_size, num_examples=num_examples,
          vmapped=vmapped, nonfinite_diagnostics=True,
          plan=_nontrivial(plan))
      return run, run.steps_per_epoch
    epoch_fn = loops.make_epoch_fn(step, batch_size=batch_size,
                                   num_examples=num_examples,
                                   nonfinite_diagnostics=True,
                                   plan=_nontrivial(plan))
    steps = epoch_fn.steps_per_epoch
    if vmapped:
      epoch_fn = sweep.vmap_epoch(epoch_fn)
    return jax.jit(epoch_fn, donate_argnums=(0,)), steps

  key = ("device", obj, loop, batch_size, num_examples, vmapped,
         _nontrivial(plan), *sorted(step_kw.items()))
  return _cached(key, build)


class _HostRunner:
  """Runs host epochs: jitted steps and blocks over prefetched batches."""

  def __init__(self, obj, *, vmapped: bool, plan=None, **step_kw):
    raw_step = train.make_train_step(obj, **step_kw)
    self.vmapped, self.plan = vmapped, _nontrivial(plan)
    if _nontrivial(plan) is not None:  # Keep the state's (FSDP) layout.
      raw_step = _keep_layout(raw_step, plan)
    step = raw_step

    def block(state, teacher, batches, rng):
      return jax.lax.scan(lambda s, b: raw_step(s, teacher, b, rng), state,
                          batches)

    if vmapped:
      step = jax.vmap(step, in_axes=(0, None, None, 0))
      block = jax.vmap(block, in_axes=(0, None, None, 0), out_axes=(0, 1))
    self.step = jax.jit(step, donate_argnums=(0,))
    self.block = jax.jit(block, donate_argnums=(0,))

    def summarise(per_step, state):
      steps = jax.tree.leaves(per_step)[0].shape[0]
      out = jax.tree.map(lambda m: jnp.mean(m, axis=0), per_step)
      diag = loops.nonfinite_diagnostics
      if vmapped:
        diag = jax.vmap(diag, in_axes=(1, 0, None))
      out.update(diag(per_step, state, steps))
      return out

    self.summarise = jax.jit(summarise)
    self.position = 0

  def run_epoch(self, state, teacher, source, rng, epoch: int, start: int,
                data_state, *, block: int, check, on_block):
    n = source.steps_per_epoch
    self.position = start
    prefetch = hostdata.Prefetcher(
        source.batches(epoch, start, data_state), block=block,
        place=None if self.plan is None else self.plan.place_batch,
        check=lambda b, i: check(b, epoch, start + i), total=n - start)
    per_step = []
    try:
      for batch, count, dstate in prefetch:
        if count > 1:
          state, metrics = self.block(state, teacher, batch, rng)
        else:
          state, metrics = self.step(state, teacher, batch, rng)
          metrics = jax.tree.map(lambda m: m[None], metrics)
        per_step.append(metrics)
        self.position += count
        data_state = dstate
        on_block(state, self.position, dstate)
    finally:
      prefetch.close()
    stacked = jax.tree.map(lambda *m: jnp.concatenate(m), *per_step)
    return state, self.summarise(stacked, state), data_state


def _host_runner(obj, *, vmapped: bool, plan=None, **step_kw) -> _HostRunner:
  key = ("host", obj, vmapped, plan, *sorted(step_kw.items()))
  return _cached(key, lambda: _HostRunner(obj, vmapped=vmapped, plan=plan,
                                          **step_kw))


def _nontrivial(plan):
  """``plan`` where it does something; None on one device (as before)."""
  return None if plan is None or plan.trivial else plan


def _keep_layout(step, plan):
  """``step`` with its batch split and its new state in the plan's layout."""
  def constrained(state, teacher, batch, rng):
    state, metrics = step(state, teacher, plan.constrain_batch(batch), rng)
    return plan.constrain_state(state), metrics
  return constrained


def _example_specs(data) -> PyTree:
  """Shape structs of one example of ``data`` (a batch axis of 1)."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(
      (1,) + tuple(np.shape(a)[1:]), np.asarray(a).dtype
      if not hasattr(a, "dtype") else a.dtype), data)


def _member_specs(tree: PyTree, vmapped: bool) -> PyTree:
  """Shape structs of one sweep member's leaves (all of them if not vmapped)."""
  cut = 1 if vmapped else 0
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[cut:], a.dtype),
                      tree)


def _model_inputs(batch, names, input_transform=None, augment_fn=None):
  """The model inputs the step builds from ``batch`` (abstractly here)."""
  xs = [batch[n] for n in names]
  if input_transform is not None:
    xs = [input_transform(x) for x in xs]
  if augment_fn is not None:
    xs[0] = augment_fn(jax.random.key(0), xs[0])
  return xs


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


def choose_loop(state: PyTree, data: dict, *, fields: Optional[Fields] = None,
                input_transform: Optional[Callable] = None,
                vmapped: bool = False) -> str:
  """The epoch form :func:`fit` uses with ``loop="auto"``.

  The rule, from measurements on XLA:CPU (``benchmarks/train_step.py``):
  a step with a convolution runs several times slower inside a
  ``lax.scan`` than as a jitted program of its own (a two-layer CNN at
  batch 128: about 15x), while an MLP's step runs faster in the scan (no
  dispatch per step). So: on the CPU, ``"steps"`` for a student whose
  forward pass has a convolution, else ``"scan"``; on GPU and TPU always
  ``"scan"``. The rule looks only at the student's traced forward pass
  (``jax.make_jaxpr``, nothing is compiled), so it is deterministic and a
  resumed run makes the same choice.
  """
  if jax.default_backend() != "cpu":
    return "scan"
  fields = Fields() if fields is None else fields
  apply_fn = getattr(state, "apply_fn", None)
  if apply_fn is None:
    return "scan"
  def forward(params, model_state, batch):
    xs = _model_inputs(batch, fields.input_names, input_transform)
    return apply_fn(params, model_state, *xs, train=True,
                    rng=jax.random.key(0))[0]

  jaxpr = jax.make_jaxpr(forward)(_member_specs(state.params, vmapped),
                                  _member_specs(state.model_state, vmapped),
                                  _example_specs(data))
  return "steps" if _has_convolution(jaxpr) else "scan"


def check_inputs(state: PyTree, teacher, data: dict, *,
                 objective: Union[str, Callable] = "kd",
                 fields: Optional[Fields] = None,
                 augment_fn: Optional[Callable] = None,
                 input_transform: Optional[Callable] = None,
                 vmapped: bool = False) -> int:
  """Host-side checks of :func:`fit`'s inputs; nothing is compiled.

  The student's (and teacher's) logits shapes come from ``jax.eval_shape``
  on one example, which traces the models abstractly without compiling.

  Returns:
    The number of examples (the data's leading axis).

  Raises:
    kdjax.fields.BatchError: the data does not match ``fields`` (leaves
      with different leading axes, a missing or unknown field, weights of
      the wrong shape).
    ValueError: teacher and student predict different numbers of classes,
      a label (of positive weight) lies outside ``[0, num_classes)``, or a
      stateful student came without its model state.
    TypeError: the labels are not integers, or the objective has the wrong
      signature.
  """
  return _check_inputs(state, teacher, data, obj=objectives.get(objective),
                       fields=Fields() if fields is None else fields,
                       augment_fn=augment_fn, input_transform=input_transform,
                       vmapped=vmapped)[0]


def _check_inputs(state, teacher, data, *, obj, fields, augment_fn,
                  input_transform, vmapped) -> tuple[int, Optional[int]]:
  """:func:`check_inputs`, returning ``(num_examples, num_classes)``."""
  num_examples = fields_lib.check_batch(data, fields,
                                        needs_labels=obj.needs_labels,
                                        what="data")
  apply_fn = getattr(state, "apply_fn", None)
  params = getattr(state, "params", None)
  if apply_fn is None or params is None:
    return num_examples, None
  one = _example_specs(data)
  model_inputs = lambda names, b: _model_inputs(b, names, input_transform,
                                                augment_fn)
  student = train.abstract_student_logits(
      apply_fn, _member_specs(params, vmapped),
      _member_specs(getattr(state, "model_state", {}), vmapped),
      lambda b: model_inputs(fields.input_names, b), one)
  if fields.weights is not None:
    fields_lib.check_weights(np.shape(data[fields.weights]),
                             (num_examples,) + tuple(student[1:]),
                             fields.weights)
  teacher_shape = None
  if obj.needs_teacher:
    if fields.teacher_logits in data:
      teacher_shape = (1,) + tuple(np.shape(data[fields.teacher_logits])[1:])
    elif teacher is not None:
      teacher_shape = jax.eval_shape(
          lambda t, b: t(*model_inputs(fields.teacher_input_names, b)),
          teacher, one).shape
  validate.validate_models(teacher_shape, student)
  if fields.labels is not None:
    labels = np.asarray(data[fields.labels])
    if fields.weights is not None:
      labels = labels[np.asarray(data[fields.weights]) > 0]
    validate.validate_labels(labels, student[-1])
  return num_examples, student[-1]


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
