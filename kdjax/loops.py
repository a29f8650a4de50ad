"""Two training paths over a train step.

**The fast path** (:func:`make_epoch_fn`): the whole transfer set lives on
the device as a dict of arrays; one compiled program shuffles it (a
``jax.random.permutation`` keyed by the epoch), gathers each batch and runs
every step of the epoch inside ``lax.scan``. There is no host round trip per
step, so a small MLP runs at the speed of a hand-written scan.

**The general path** (:func:`run_host_batches`): any iterator of host
batches (NumPy arrays, ``tf.data`` via ``tfds.as_numpy``, ...) fed to a
jitted step from a Python loop, with a live progress bar.

Both are pure with respect to the training state: they take a state and
return a new one. Progress display and metric logging live in
:mod:`kdjax.progress`, checkpoints in :mod:`kdjax.checkpoint`, and the
resumable outer loop in :func:`kdjax.trainer.fit`.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import jax
import jax.numpy as jnp

__all__ = ["make_epoch_fn", "make_stepwise_epoch_fn", "epoch_key",
           "run_host_batches", "mean_metrics", "nonfinite_diagnostics"]



def epoch_key(rng: jax.Array, epoch: int | jax.Array) -> jax.Array:
  """The data-order key of ``epoch``: a pure function of the run's key.

  Deriving it from the epoch index (rather than threading a key through the
  loop) makes the data order part of the checkpointed step counter: a
  resumed run replays exactly the same batches.
  """
  return jax.random.fold_in(jax.random.fold_in(rng, 0x5EED), epoch)


def make_epoch_fn(step: Callable, *, batch_size: int, num_examples: int,
                  nonfinite_diagnostics: bool = False,
                  plan: Optional[Any] = None) -> Callable:
  """A whole epoch as one pure function, for ``jax.jit`` (or ``jax.vmap``).

  ``epoch(state, teacher, data, rng, epoch_index) -> (state, metrics)``:

  * ``data``: a dict pytree of device arrays with a common leading axis of
    length ``num_examples`` (the fields of :class:`kdjax.fields.Fields`);
  * the order is ``permutation(epoch_key(rng, epoch_index))``, the last
    ``num_examples % batch_size`` examples of that order are dropped;
  * ``step`` is the raw (un-jitted) train step; it receives ``rng``
    unchanged and folds in its own step counter;
  * ``metrics`` are the per-step metrics averaged over the epoch.

  With ``nonfinite_diagnostics`` (the step must report a ``'finite'``
  metric, as :func:`kdjax.train.make_train_step` does), ``metrics`` also
  holds, computed on the device from the per-step values:

  * ``'first_nonfinite_step'``: the global step number (``state.step``
    before that step) of the epoch's first non-finite step, -1 if none;
  * ``'nonfinite_metrics'``: ``{name: bool}``, which metrics were not finite
    at that step (all False if none);
  * ``'skipped'``: ``state.skipped`` after the epoch, when the state has it.

  Args:
    step: ``(state, teacher, batch, rng) -> (state, metrics)``.
    batch_size: examples per step.
    num_examples: length of the data's leading axis.
    nonfinite_diagnostics: add the entries above to ``metrics``.
    plan: a :class:`kdjax.mesh.Plan`: each gathered batch is split over its
      batch axes and the returned state keeps its (FSDP) layout. None: as
      on one device.

  Returns:
    The epoch function (not yet compiled).
  """
  if batch_size <= 0 or num_examples < batch_size:
    raise ValueError(
        f"batch_size={batch_size} must be positive and at most the number of "
        f"examples ({num_examples}).")
  steps = num_examples // batch_size

  def epoch(state, teacher, data, rng, epoch_index):
    for path, v in jax.tree_util.tree_flatten_with_path(data)[0]:
      if not v.shape or v.shape[0] != num_examples:
        raise ValueError(
            f"data{jax.tree_util.keystr(path)} has shape {v.shape}, expected "
            f"{num_examples} examples on its leading axis (every leaf shares "
            "it).")
    perm = jax.random.permutation(epoch_key(rng, epoch_index), num_examples)
    order = perm[:steps * batch_size].reshape(steps, batch_size)

    def body(state, idx):
      batch = jax.tree.map(lambda v: jnp.take(v, idx, axis=0), data)
      return step(state, teacher, _constrain_batch(plan, batch), rng)

    state, metrics = jax.lax.scan(body, state, order)
    state = _constrain_state(plan, state)
    out = jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)
    if nonfinite_diagnostics:
      out.update(_diagnostics(metrics, state, steps))
    return state, out

  epoch.steps_per_epoch = steps
  return epoch


def make_stepwise_epoch_fn(step: Callable, *, batch_size: int,
                          num_examples: int, vmapped: bool = False,
                          nonfinite_diagnostics: bool = False,
                          plan: Optional[Any] = None) -> Callable:
  """The epoch of :func:`make_epoch_fn` as a Python loop of jitted steps.

  Same contract and same computation: the same permutation of the same
  device-resident data, the same batches, the same keys, so the result is
  the scan's to float32 rounding. It is the faster form where XLA runs the
  step's body more slowly inside a ``lax.scan`` than as a program of its own
  (convolutions on XLA:CPU, ``benchmarks/train_step.py``); each step is one
  dispatch, and the host does not wait for it (the per-step metrics are
  stacked on the device at the end of the epoch).

  Returns:
    ``epoch(state, teacher, data, rng, epoch_index) -> (state, metrics)``,
    already compiled (do not wrap it in ``jax.jit``); it donates ``state``.
  """
  if batch_size <= 0 or num_examples < batch_size:
    raise ValueError(
        f"batch_size={batch_size} must be positive and at most the number of "
        f"examples ({num_examples}).")
  steps = num_examples // batch_size

  def order(rng, epoch_index):
    perm = jax.random.permutation(epoch_key(rng, epoch_index), num_examples)
    return perm[:steps * batch_size].reshape(steps, batch_size)

  def one(state, teacher, data, rng, idx):
    batch = jax.tree.map(lambda v: jnp.take(v, idx, axis=0), data)
    state, metrics = step(state, teacher, _constrain_batch(plan, batch), rng)
    return _constrain_state(plan, state), metrics

  if vmapped:
    order = jax.vmap(order, in_axes=(0, None))
    one = jax.vmap(one, in_axes=(0, None, None, 0, 0))
  order = jax.jit(order)
  one = jax.jit(one, donate_argnums=(0,))

  @jax.jit
  def summarise(per_step, state):
    out = jax.tree.map(lambda m: jnp.mean(m, axis=0), per_step)
    if nonfinite_diagnostics:
      diag = _diagnostics
      if vmapped:
        diag = jax.vmap(_diagnostics, in_axes=(1, 0, None))
      out.update(diag(per_step, state, steps))
    return out

  def epoch(state, teacher, data, rng, epoch_index):
    idx = order(rng, epoch_index)
    per_step = []
    for i in range(steps):
      state, metrics = one(state, teacher, data, rng,
                           idx[:, i] if vmapped else idx[i])
      per_step.append(metrics)
    stacked = jax.tree.map(lambda *m: jnp.stack(m), *per_step)
    return state, summarise(stacked, state)

  epoch.steps_per_epoch = steps
  return epoch


def _constrain_batch(plan, batch):
  return batch if plan is None else plan.constrain_batch(batch)


def _constrain_state(plan, state):
  return state if plan is None else plan.constrain_state(state)


def nonfinite_diagnostics(per_step: dict, state, steps: int) -> dict:
  """Where the epoch's first non-finite step was, from ``[steps]`` metrics."""
  if "finite" not in per_step:
    raise ValueError("nonfinite_diagnostics needs a step that reports a "
                     "'finite' metric (see kdjax.train.make_train_step).")
  finite = (per_step["finite"] > 0).astype(jnp.int32)
  first = jnp.argmin(finite)  # The first 0; 0 when every step is finite.
  any_bad = jnp.any(finite == 0)
  end_step = getattr(state, "step", None)
  start = 0 if end_step is None else end_step - steps
  out = {
      "first_nonfinite_step": jnp.where(any_bad, start + first,
                                        -1).astype(jnp.int32),
      "nonfinite_metrics": {
          k: jnp.logical_and(any_bad, jnp.logical_not(jnp.isfinite(v[first])))
          for k, v in per_step.items() if k != "finite"},
  }
  skipped = getattr(state, "skipped", None)
  if skipped is not None:
    out["skipped"] = skipped
  return out


# (make_epoch_fn's argument of the same name would shadow it.)
_diagnostics = nonfinite_diagnostics


def mean_metrics(metrics: list[dict]) -> dict:
  """Averages a list of per-step metric dicts (host floats)."""
  if not metrics:
    return {}
  return {k: float(sum(float(m[k]) for m in metrics) / len(metrics))
          for k in metrics[0]}


def run_host_batches(step: Callable, state, teacher, batches: Iterable[dict],
                     rng: jax.Array, *, progress: Optional[Any] = None):
  """Runs a jitted step over an iterator of host batches (the general path).

  Args:
    step: a compiled step ``(state, teacher, batch, rng) -> (state, metrics)``
      (e.g. :func:`kdjax.train.jit_train_step`).
    state: the starting :class:`kdjax.train.TrainState`.
    teacher: the frozen teacher (or None for hard labels / cached logits).
    batches: an iterable of dicts of NumPy arrays.
    rng: the run's base key.
    progress: optional object with ``update(n, metrics)`` (e.g.
      :class:`kdjax.progress.Progress`).

  Returns:
    ``(state, mean metrics over the batches)``.
  """
  history = []
  for batch in batches:
    state, metrics = step(state, teacher, batch, rng)
    history.append(metrics)
    if progress is not None:
      progress.update(1, metrics)
  history = jax.device_get(history)
  return state, mean_metrics(history)
