r"""Exact gradient accumulation: one global batch as ``k`` micro-batches.

``kdjax.StepSpec(accumulate=k)`` makes the train step (:mod:`kdjax.step`)
run its global batch of ``B`` rows as ``k`` micro-batches of ``B / k``
rows, one after the other inside one ``lax.scan``, so that only one
micro-batch's activations (and logits) are live at a time. The step still
takes **one** optimizer step per global batch, with the loss and gradient
of the whole batch.

**The normalisation.** With per-position losses :math:`\ell` and weights
:math:`w` (0 for padding; all 1 without a weights field), micro-batch
:math:`j` contributes its weighted sums

.. math::
  S_j = \sum_{n \in j} w_n \ell_n, \qquad
  G_j = \nabla_\theta S_j, \qquad W_j = \sum_{n \in j} w_n,

which are added up over the micro-batches and divided **once**:

.. math::
  L = \frac{\sum_j S_j}{\sum_j W_j}, \qquad
  \nabla_\theta L = \frac{\sum_j G_j}{\sum_j W_j},

exactly the single large batch's ``sum(w * loss) / sum(w)`` over all its
real positions (to float32 rounding: only the order of the sums differs).
The metrics (the objective's terms, accuracy, agreement) are accumulated
the same way. A mean of micro-batch means, :math:`\frac1k \sum_j S_j /
W_j` (what ``optax.MultiSteps`` gives a per-batch mean loss), differs
whenever the micro-batches hold different numbers of real positions: it
gives a position of a micro-batch with few real tokens more weight than one
of a full micro-batch (verl #7200, TRL #6006). Under ``jax.pmap`` the
weight sum is ``psum``-ed over the devices before the division; under a
mesh GSPMD sums over the global micro-batch.

**The split keeps every device's rows local.** Micro-batch ``j`` is rows
``j, j + k, j + 2k, ...`` of the global batch (:func:`split`: ``[B, ...]``
reshaped to ``[B / k, k, ...]``, column ``j``), not the ``j``-th contiguous
block: with the batch split over ``D`` devices along its leading axis,
each device's ``B / D`` rows hold ``B / (k D)`` rows of every micro-batch,
so no row moves between devices. The global batch must therefore be a
multiple of ``k * D`` (:func:`kdjax.validate.check_accumulate`, before
anything compiles). The gradients are another matter: GSPMD reduces each
micro-batch's gradient over the devices inside the loop (in the compiled
program of a token model's step on 8 virtual CPU devices: one combined
all-reduce in the loop's body, no all-gather, all-to-all or
collective-permute; ``tests/test_accumulate.py``), so a step moves the
gradients ``k`` times, where the step without accumulation moves them
once.

**What is per step, and what per micro-batch.**

* Per step (as without accumulation): the input transform and the
  augmentation (applied to the whole global batch with the step's key, so
  every example sees the same augmentation as at ``k = 1``), the
  hyperparameters and schedules (evaluated at the step), the non-finite
  guard (on the accumulated loss and gradient), the optimizer update and
  ``state.step`` (one per global batch), checkpoints.
* Per micro-batch: the teacher's forward pass (in inference mode, so its
  logits are the whole batch's, row by row), the student's forward and
  backward passes, and the dropout key (``fold_in(key, j)``).
* **BatchNorm** (and any model state the student updates in training):
  the statistics are those of each micro-batch (of all devices' rows of
  it, under a mesh), and the model state is threaded through the
  micro-batches in order, micro-batch ``j`` starting from the state that
  micro-batch ``j - 1`` returned; a step thus moves the running averages
  ``k`` times. This is what training on the micro-batches one step at a
  time would do to the statistics, and it differs from the large batch's
  own statistics (normalisation is not linear in the batch), which is why
  a BatchNorm student's gradients are not the large batch's: only a model
  with no batch-dependent layer is exact.

``accumulate=1`` (the default) is the step without any of this (its
program is unchanged).

>>> import jax.numpy as jnp
>>> from kdjax import accumulate
>>> accumulate.split({"x": jnp.arange(6)}, 2)["x"]  # micro-batches as rows
Array([[0, 2, 4],
       [1, 3, 5]], dtype=int32)
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

from kdjax._types import PyTree

__all__ = ["split", "scan"]


def split(tree: PyTree, k: int, plan: Optional[Any] = None) -> PyTree:
  """``[B, ...]`` leaves as ``[k, B / k, ...]``: micro-batch ``j`` is row ``j``.

  Micro-batch ``j`` holds rows ``j, j + k, ...`` of the batch (see the
  module docstring), so a batch split over devices along its leading axis
  keeps every row on its device. ``plan`` (a :class:`kdjax.mesh.Plan`):
  the micro-batches are constrained to the plan's batch axes, after the
  leading micro-batch axis (inside ``jit``).
  """

  def one(x):
    if x.shape[0] % k:
      raise ValueError(f"a leaf of {x.shape[0]} rows cannot be split into "
                       f"{k} micro-batches.")
    y = x.reshape((x.shape[0] // k, k) + x.shape[1:])
    return jnp.swapaxes(y, 0, 1)

  micro = jax.tree.map(one, tree)
  if plan is not None:
    micro = plan.constrain_batch(micro, lead=1)
  return micro


def scan(fn: Callable, carry: PyTree, micro: PyTree, k: int):
  """Runs ``fn`` over the ``k`` micro-batches in order, summing its outputs.

  ``fn(carry, (j, micro_j)) -> (carry, out)``; ``carry`` (the model state)
  is threaded from one micro-batch to the next, ``out`` (a pytree of
  arrays: weighted sums, gradients) is added up.

  Returns:
    ``(carry, sum_j out_j)``.
  """
  xs = (jnp.arange(k, dtype=jnp.int32), micro)
  first = jax.tree.map(lambda x: x[0], xs)
  shapes = jax.eval_shape(fn, carry, first)[1]
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

  def body(state, x):
    carry, total = state
    carry, out = fn(carry, x)
    return (carry, jax.tree.map(jnp.add, total, out)), None

  (carry, total), _ = jax.lax.scan(body, (carry, zeros), xs)
  return carry, total
