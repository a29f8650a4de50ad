"""The distillation train step: one pure function for jit, pmap and sharded jit.

``step(state, teacher, batch, rng) -> (state, metrics)``

* ``state`` (:class:`TrainState`) holds only the **student**: its params,
  optimizer state, step counter and the objective's hyperparameters
  (``temperature``, ``alpha``) as arrays, so a ``jax.vmap`` over states is a
  sweep over seeds, temperatures and alphas (see :mod:`kdjax.sweep`).
* ``teacher`` (:class:`kdjax.teacher.Teacher`) is a frozen pytree, always
  run in inference mode, wrapped in ``stop_gradient``; it is never in the
  optimizer state.
* ``batch`` is a dict with ``'image'`` and ``'label'``, and optionally
  ``'teacher_logits'`` (the teacher-logit cache, :mod:`kdjax.cache`). uint8
  images are scaled to float32 in [0, 1] inside the step.
* ``rng`` is the run's base key; the step folds in ``state.step`` (and the
  device index under pmap), so a resumed run replays the same randomness.

Teacher and student see the **same augmented batch** inside the same
compiled step ("consistent teaching").

The objective (``objective=``):

=================  ==========================================================
``"kd"``           ``alpha * CE(y, softmax(z)) + (1-alpha) T^2 KL(p_T || q_T)``
``"soft"``         ``T^2 KL(p_T || q_T)`` (soft targets only; alpha ignored)
``"logit_matching"`` ``0.5 * mean_c((z - z̄) - (v - v̄))^2`` (Caruana; eq. 4)
``"hard"``         ``CE(y, softmax(z))`` (the student trained alone)
=================  ==========================================================

Data parallelism:

* :func:`make_train_step` with ``axis_name`` gives the classic ``jax.pmap``
  form: gradients and metrics are averaged with ``lax.pmean``.
* :func:`jit_train_step` compiles the axis-free step with buffer donation;
  :func:`sharded_train_step` does the same over a ``jax.sharding.Mesh``
  with the batch split along the data axis and the state and teacher
  replicated (GSPMD inserts the gradient all-reduce).

``jit`` and sharded ``jit`` give the same parameters for the same global
batch, dropout and augmentation included (they draw from the same key).
``pmap`` gives the same parameters for a deterministic step (no dropout, no
augmentation): with either, each device folds its index into the step's key
and draws its own masks and shifts, so the run is as good but not the same
numbers. All of this is tested on 8 virtual CPU devices.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kdjax import losses, validate
from kdjax.teacher import Teacher

__all__ = [
    "OBJECTIVES",
    "TrainState",
    "make_train_step",
    "prepare_images",
    "global_norm",
    "jit_train_step",
    "pmap_train_step",
    "sharded_train_step",
    "shard_batch",
    "replicate",
    "unreplicate",
]

PyTree = Any
OBJECTIVES = ("kd", "soft", "logit_matching", "hard")
StudentApply = Callable[[PyTree, jax.Array, bool, Optional[jax.Array]],
                        jax.Array]


@flax.struct.dataclass
class TrainState:
  """The student's training state (the teacher is never part of it).

  Attributes:
    step: number of optimizer steps taken (int32 scalar).
    params: the student's parameters.
    opt_state: the optax state for ``params``.
    temperature: the distillation temperature ``T`` (float32 scalar).
    alpha: the weight of the hard-label loss (float32 scalar).
    skipped: number of steps skipped for a non-finite loss or gradient.
    apply_fn: ``(params, x, train, rng) -> logits`` (static).
    tx: the optax ``GradientTransformation`` (static).
  """
  step: jax.Array
  params: PyTree
  opt_state: PyTree
  temperature: jax.Array
  alpha: jax.Array
  skipped: jax.Array
  apply_fn: StudentApply = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  @classmethod
  def create(cls, *, apply_fn: StudentApply, params: PyTree,
             tx: optax.GradientTransformation, temperature: float = 1.0,
             alpha: float = 0.0) -> "TrainState":
    """A fresh state at step 0 (validates ``temperature`` and ``alpha``)."""
    losses._check_temperature(temperature)  # pylint: disable=protected-access
    losses._check_alpha(alpha)  # pylint: disable=protected-access
    return cls(step=jnp.zeros((), jnp.int32), params=params,
               opt_state=tx.init(params),
               temperature=jnp.asarray(temperature, jnp.float32),
               alpha=jnp.asarray(alpha, jnp.float32),
               skipped=jnp.zeros((), jnp.int32), apply_fn=apply_fn, tx=tx)


def global_norm(tree: PyTree) -> jax.Array:
  """``sqrt(sum_leaves sum(x**2))``, the gradient-norm metric of the step.

  The same value as ``optax.tree.norm`` (up to summation order), computed as
  one ``dot_general`` per leaf (``einsum('ij,ij->', m, m)`` over the leaf
  viewed as a matrix) in at least float32. XLA:CPU runs a dot as a
  vectorised, multi-threaded contraction but a reduce-of-squares as a scalar
  loop; on the paper's MNIST step the reduction cost about 5% of the step
  (``benchmarks/train_step.py``). NaN or inf in any leaf gives a non-finite
  norm, which is what the step's non-finite guard tests.

  >>> float(global_norm({"w": jnp.full((2, 3), 2.0), "b": jnp.ones(3)}))
  5.196...
  """
  squares = []
  for x in jax.tree.leaves(tree):
    if x.size == 0:
      continue
    m = x.reshape(x.shape[0] if x.ndim >= 2 else 1, -1)
    squares.append(jnp.einsum("ij,ij->", m, m, preferred_element_type=(
        jnp.promote_types(x.dtype, jnp.float32))))
  if not squares:
    return jnp.zeros((), jnp.float32)
  return jnp.sqrt(sum(squares))


def prepare_images(x: jax.Array) -> jax.Array:
  """The step's input rule: uint8 pixels -> float32 ``x / 255``; else as is.

  The teacher-logit cache (:mod:`kdjax.cache`) applies the same rule, so
  cached and online teacher logits are identical.
  """
  if x.dtype == jnp.uint8:
    return x.astype(jnp.float32) / 255.0
  return x


def make_train_step(objective: str = "kd", *,
                    augment_fn: Optional[Callable] = None,
                    axis_name: Optional[str] = None,
                    skip_nonfinite: bool = True,
                    skip_impl: str = "auto"):
  """Builds the pure train step ``(state, teacher, batch, rng) -> (state, metrics)``.

  Args:
    objective: one of :data:`OBJECTIVES` (see the module docstring).
    augment_fn: optional ``(rng, images) -> images`` (e.g.
      :func:`kdjax.augment.jitter`). The teacher sees the augmented batch;
      it may not be combined with cached teacher logits (they would be stale).
    axis_name: set for ``jax.pmap``: gradients and metrics are ``pmean``-ed
      over this axis, and dropout/augmentation keys differ per device.
    skip_nonfinite: if the loss or the gradients' global norm is not finite
      (any NaN/inf gradient, or a norm overflowing float32), keep the old
      params and optimizer state and count the step in ``state.skipped``
      (the step counter still advances). If False the update is applied.
    skip_impl: how a skipped update is expressed: ``"cond"`` (``lax.cond``,
      fastest on XLA:CPU), ``"select"`` (``jnp.where`` over params and
      optimizer state, which fuses into the update on GPU/TPU and needs no
      host round trip), or ``"auto"`` (cond on CPU, select elsewhere). The
      results are identical.

  Returns:
    The step function (not yet compiled). Metrics: ``loss``, ``hard_loss``,
    ``soft_loss`` (when a teacher is used), ``accuracy`` (vs labels),
    ``agreement`` (student/teacher top-1), ``grad_norm``, ``finite``.
  """
  if objective not in OBJECTIVES:
    raise ValueError(f"objective must be one of {OBJECTIVES}, got "
                     f"{objective!r}.")
  if skip_impl not in ("auto", "cond", "select"):
    raise ValueError(f"skip_impl must be 'auto', 'cond' or 'select', got "
                     f"{skip_impl!r}.")
  needs_teacher = objective != "hard"

  def step(state: TrainState, teacher: Optional[Teacher], batch: dict,
           rng: jax.Array):
    if "image" not in batch or "label" not in batch:
      raise ValueError("batch must be a dict with 'image' and 'label' keys, "
                       f"got keys {sorted(batch)}.")
    rng = jax.random.fold_in(rng, state.step)
    if axis_name is not None:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
    rng_aug, rng_drop = jax.random.split(rng)
    x, y = prepare_images(batch["image"]), batch["label"]
    if augment_fn is not None:
      x = augment_fn(rng_aug, x)

    t_logits = None
    if needs_teacher:
      if "teacher_logits" in batch:
        if augment_fn is not None:
          raise ValueError(
              "Cached teacher logits are stale under augmentation: the "
              "teacher must see the same augmented batch as the student. "
              "Drop 'teacher_logits' from the data (online teacher) or "
              "disable augmentation.")
        t_logits = jax.lax.stop_gradient(batch["teacher_logits"])
      elif teacher is None:
        raise ValueError(f"objective={objective!r} needs a teacher; pass a "
                         "kdjax.Teacher or cached 'teacher_logits'.")
      else:
        t_logits = teacher(x)
    temperature, alpha = state.temperature, state.alpha

    def loss_fn(params):
      s_logits = state.apply_fn(params, x, True, rng_drop)
      hard = losses.hard_label_loss(s_logits, y)
      aux = {"hard_loss": jnp.mean(hard)}
      if objective == "hard":
        total = hard
      elif objective == "logit_matching":
        soft = losses.logit_matching_loss(s_logits, t_logits)
        total = soft
      else:
        soft = losses.distillation_loss(s_logits, t_logits, temperature)
        total = soft if objective == "soft" else (
            alpha * hard + (1.0 - alpha) * soft)
      if objective != "hard":
        aux["soft_loss"] = jnp.mean(soft)
      return jnp.mean(total), (aux, s_logits)

    (loss, (aux, s_logits)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    s_pred = jnp.argmax(s_logits, -1)
    metrics = {"loss": loss, **aux,
               "accuracy": jnp.mean((s_pred == y).astype(jnp.float32))}
    if t_logits is not None:
      metrics["agreement"] = jnp.mean(
          (s_pred == jnp.argmax(t_logits, -1)).astype(jnp.float32))
    if axis_name is not None:
      grads = jax.lax.pmean(grads, axis_name)
      metrics = jax.lax.pmean(metrics, axis_name)
    metrics["grad_norm"] = global_norm(grads)

    # One scalar test instead of a pass over every gradient: the global norm
    # is NaN/inf iff some gradient is (or if its sum of squares overflows
    # float32, i.e. a norm above ~1e19, which is divergence too).
    finite = jnp.logical_and(jnp.isfinite(metrics["loss"]),
                             jnp.isfinite(metrics["grad_norm"]))

    def apply(operands):
      grads, opt_state, params = operands
      updates, opt_state = state.tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    operands = (grads, state.opt_state, state.params)
    use_cond = skip_impl == "cond" or (
        skip_impl == "auto" and jax.default_backend() == "cpu")
    if skip_nonfinite and use_cond:
      # XLA:CPU: a conditional skips the update's memory passes entirely.
      params, opt_state = jax.lax.cond(finite, apply,
                                       lambda o: (o[2], o[1]), operands)
    elif skip_nonfinite:
      # GPU/TPU: an elementwise select fuses into the update kernels and
      # needs no host round trip for the predicate.
      new_params, new_opt_state = apply(operands)
      keep = lambda new, old: jax.tree.map(
          lambda n, o: jnp.where(finite, n, o), new, old)
      params = keep(new_params, state.params)
      opt_state = keep(new_opt_state, state.opt_state)
    else:
      params, opt_state = apply(operands)
    metrics["finite"] = finite.astype(jnp.float32)
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state,
        skipped=state.skipped + (1 - finite.astype(jnp.int32)) * int(
            skip_nonfinite))
    return new_state, metrics

  return step


# ----------------------------------------------------------------------------
# Compiled forms.
# ----------------------------------------------------------------------------


def jit_train_step(objective: str = "kd", **kwargs):
  """``jax.jit`` of :func:`make_train_step`, donating the old state's buffers."""
  return jax.jit(make_train_step(objective, **kwargs), donate_argnums=(0,))


def pmap_train_step(objective: str = "kd", *, axis_name: str = "batch",
                    **kwargs):
  """The classic TPU form: ``jax.pmap`` over local devices.

  ``state`` must be replicated (:func:`replicate`) and ``batch`` split into a
  leading device axis (:func:`shard_batch` with ``mesh=None``); the teacher
  and ``rng`` are broadcast (``in_axes=None``).
  """
  step = make_train_step(objective, axis_name=axis_name, **kwargs)
  return jax.pmap(step, axis_name=axis_name, in_axes=(0, None, 0, None),
                  donate_argnums=(0,))


def data_mesh(devices=None, axis: str = "data") -> Mesh:
  """A 1-D data-parallel mesh over ``devices`` (default: all devices)."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), (axis,))


def sharded_train_step(mesh: Mesh, objective: str = "kd", *,
                       data_axis: str = "data", **kwargs):
  """The modern form: jit over a ``Mesh``, batch sharded along ``data_axis``.

  The state, the teacher and the rng are replicated; the batch's leading
  axis is split over ``data_axis``. Under GSPMD the mean over the global
  batch becomes a local mean plus an all-reduce, exactly as ``pmean``.

  Tip: place the initial state with
  ``jax.device_put(state, NamedSharding(mesh, P()))`` before the first call;
  a state fresh from ``TrainState.create`` lives on one device, and the
  step then compiles a second time when it sees its own replicated output.
  """
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(data_axis))
  step = make_train_step(objective, **kwargs)
  return jax.jit(step,
                 in_shardings=(replicated, replicated, batch_sharding,
                               replicated),
                 out_shardings=(replicated, replicated),
                 donate_argnums=(0,))


def shard_batch(batch: PyTree, mesh: Optional[Mesh] = None,
                data_axis: str = "data") -> PyTree:
  """Places a host batch for a data-parallel step.

  With a ``mesh``: a global array sharded along ``data_axis``. Without: the
  leading axis is reshaped to ``[num_local_devices, B / n, ...]`` for pmap.
  Raises a ValueError if the batch does not divide evenly.
  """
  n = mesh.shape[data_axis] if mesh is not None else jax.local_device_count()
  for x in jax.tree.leaves(batch):
    validate.validate_batch(int(x.shape[0]), int(n))
  if mesh is not None:
    return jax.device_put(batch, NamedSharding(mesh, P(data_axis)))
  return jax.tree.map(lambda x: x.reshape((n, -1) + x.shape[1:]), batch)


def replicate(tree: PyTree, devices=None, axis_name: str = "batch") -> PyTree:
  """Stacks a leading device axis for pmap (like ``flax.jax_utils.replicate``).

  The result is sharded over a mesh axis named ``axis_name``: pass the
  ``axis_name`` of :func:`pmap_train_step` (default ``"batch"``). pmap's
  outputs live on that mesh, so the second step then reuses the first
  step's compilation instead of retracing for a different input sharding.
  """
  devices = list(jax.local_devices() if devices is None else devices)
  sharding = NamedSharding(Mesh(np.asarray(devices), (axis_name,)),
                           P(axis_name))
  n = len(devices)
  return jax.device_put(
      jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + jnp.shape(x)), tree),
      sharding)


def unreplicate(tree: PyTree) -> PyTree:
  """The first replica of a pmapped pytree."""
  return jax.tree.map(lambda x: x[0], tree)
