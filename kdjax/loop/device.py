"""Epochs over device-resident data: a whole-epoch scan, or jitted steps.

The whole transfer set lives on the device as a dict of arrays. Each epoch
draws its order from a key (:func:`batch_order`: a
``jax.random.permutation``, the remainder dropped) and runs one step per
batch, gathering the batch by index on the device:

* :func:`make_epoch_fn`: the whole epoch in one ``lax.scan`` (no host round
  trip per step: a small MLP runs at the speed of a hand-written scan);
* :func:`make_stepwise_epoch_fn`: the same epoch as a Python loop of jitted
  steps (faster where XLA runs the step's body more slowly inside a scan,
  e.g. convolutions on XLA:CPU);
* :func:`scan_epochs`: many epochs of a plain ``(carry, indices) -> (carry,
  loss)`` step in one scan, for trainers without a
  :class:`kdjax.TrainState` (the specialists of :mod:`kdjax.specialists`
  and of ``experiments/specialists``).

They are pure with respect to the training state: they take a state and
return a new one. Host batches are :mod:`kdjax.loop.host`'s, the epoch's
metric summary :mod:`kdjax.loop.summary`'s, and the resumable outer loop
:func:`kdjax.fit`'s (:mod:`kdjax.fitting`).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from kdjax.loop.summary import summarise

__all__ = ["make_epoch_fn", "make_stepwise_epoch_fn", "epoch_key",
           "batch_order", "scan_epochs"]


def epoch_key(rng: jax.Array, epoch: int | jax.Array) -> jax.Array:
  """The data-order key of ``epoch``: a pure function of the run's key.

  Deriving it from the epoch index (rather than threading a key through the
  loop) makes the data order part of the checkpointed step counter: a
  resumed run replays exactly the same batches.
  """
  return jax.random.fold_in(jax.random.fold_in(rng, 0x5EED), epoch)


def batch_order(key: jax.Array, num_examples: int,
                batch_size: int) -> jax.Array:
  """``int [steps, batch_size]``: a permutation of ``num_examples`` by ``key``.

  ``steps = num_examples // batch_size``; the last ``num_examples %
  batch_size`` examples of the permutation are dropped.
  """
  steps = num_examples // batch_size
  perm = jax.random.permutation(key, num_examples)
  return perm[:steps * batch_size].reshape(steps, batch_size)


def _gather(data, idx):
  return jax.tree.map(lambda v: jnp.take(v, idx, axis=0), data)


def _constrain_batch(plan, batch):
  return batch if plan is None else plan.constrain_batch(batch)


def _constrain_state(plan, state):
  return state if plan is None else plan.constrain_state(state)


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
  metric, as :func:`kdjax.make_train_step` does), ``metrics`` also holds
  :func:`kdjax.loop.summary.nonfinite_diagnostics`, computed on the device
  from the per-step values.

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
    order = batch_order(epoch_key(rng, epoch_index), num_examples,
                        batch_size)

    def body(state, idx):
      return step(state, teacher, _constrain_batch(plan, _gather(data, idx)),
                  rng)

    state, metrics = jax.lax.scan(body, state, order)
    state = _constrain_state(plan, state)
    return state, summarise(metrics, state, diagnostics=nonfinite_diagnostics)

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
    return batch_order(epoch_key(rng, epoch_index), num_examples, batch_size)

  def one(state, teacher, data, rng, idx):
    state, metrics = step(state, teacher,
                          _constrain_batch(plan, _gather(data, idx)), rng)
    return _constrain_state(plan, state), metrics

  if vmapped:
    order = jax.vmap(order, in_axes=(0, None))
    one = jax.vmap(one, in_axes=(0, None, None, 0, 0))
  order = jax.jit(order)
  one = jax.jit(one, donate_argnums=(0,))

  summary = jax.jit(lambda per_step, state: summarise(
      per_step, state, diagnostics=nonfinite_diagnostics, vmapped=vmapped))

  def epoch(state, teacher, data, rng, epoch_index):
    idx = order(rng, epoch_index)
    per_step = []
    for i in range(steps):
      state, metrics = one(state, teacher, data, rng,
                           idx[:, i] if vmapped else idx[i])
      per_step.append(metrics)
    stacked = jax.tree.map(lambda *m: jnp.stack(m), *per_step)
    return state, summary(stacked, state)

  epoch.steps_per_epoch = steps
  return epoch


def scan_epochs(step: Callable, carry, *, key: jax.Array, epochs: int,
                num_examples: int, batch_size: int,
                step_keys: bool = False):
  """``epochs`` epochs of ``step`` in one ``lax.scan`` (for ``jax.jit``).

  Epoch ``e`` draws its order from ``k = fold_in(key, e)``
  (:func:`batch_order`) and scans ``step(carry, idx) -> (carry, loss)`` over
  its ``[batch_size]`` index batches; with ``step_keys`` the step is called
  as ``step(carry, (idx, k_s))`` with ``k_s = fold_in(k, s + 1)`` for step
  ``s`` of the epoch (e.g. dropout keys). The step gathers its own batch
  from ``idx`` (the data stay where the caller keeps them, possibly shared
  by ``vmap``-ed members).

  Returns:
    ``(carry, losses)``: the final carry and the ``[epochs]`` mean step loss
    of each epoch.
  """
  steps = num_examples // batch_size

  def epoch(carry, e):
    k = jax.random.fold_in(key, e)
    batches = batch_order(k, num_examples, batch_size)
    if step_keys:
      keys = jax.vmap(lambda s: jax.random.fold_in(k, s + 1))(
          jnp.arange(steps))
      batches = (batches, keys)
    carry, step_losses = jax.lax.scan(step, carry, batches)
    return carry, jnp.mean(step_losses)

  return jax.lax.scan(epoch, carry, jnp.arange(epochs))
