"""The distillation train step: one pure function for jit, pmap and sharded jit.

``step(state, teacher, batch, rng) -> (state, metrics)``

* ``state`` (:class:`TrainState`) holds only the **student**: its params,
  its model state (BatchNorm statistics, ...), the optimizer state, the
  step counter and the objective's hyperparameters (``hparams``:
  ``temperature``, ``alpha``, ``beta``, ...) as arrays, so a ``jax.vmap``
  over states is a sweep over seeds and any hyperparameter (see
  :mod:`kdjax.sweep`). Each may also be a schedule: a function of the step
  (:mod:`kdjax.hparams`). The objective is passed exactly the ones it
  declares (:mod:`kdjax.objectives`).
* ``teacher`` (:class:`kdjax.teacher.Teacher`) is a frozen pytree, always
  run in inference mode, wrapped in ``stop_gradient``; it is never in the
  optimizer state.
* ``batch`` is a dict whose leaves share a leading axis; which fields are
  the inputs, the labels, the weights and the cached teacher logits is said
  by a :class:`kdjax.fields.Fields` (default: ``'image'``, ``'label'``, no
  weights, ``'teacher_logits'``). A field the step does not read is refused.
  Nothing is rescaled unless ``input_transform`` says so (e.g.
  :func:`kdjax.preprocess.scale_pixels`).
* ``rng`` is the run's base key; the step folds in ``state.step`` (and the
  device index under pmap), so a resumed run replays the same randomness.

Teacher and student see the **same augmented batch** inside the same
compiled step ("consistent teaching").

The loss. The objective (:mod:`kdjax.objectives`: a registered name or a
function) gives a loss per example, or per position for sequences (a
hidden-state objective, ``form="hidden"``, gets the models' hidden states
and output projections instead of logits and returns the weighted sums
itself: :mod:`kdjax.fused`); the step's loss is

.. math::
  L = \\frac{\\sum_i w_i \\ell_i}{\\sum_i w_i}

over the **global** batch, with the weights ``w`` of ``fields.weights``
(shape ``logits.shape[:-1]``, 0 for padding), or a plain mean without them.
Positions of weight 0 contribute exactly nothing, whatever their inputs,
labels or logits hold (NaN included); an all-zero batch gives a zero loss
and zero gradients. Accuracy, agreement and the loss terms are weighted the
same way.

Gradient accumulation: with ``StepSpec(accumulate=k)`` the step runs the
batch as ``k`` micro-batches in a ``lax.scan`` and divides the accumulated
weighted sums by the accumulated weight once, so that :math:`L` and its
gradient are the whole batch's (:mod:`kdjax.accumulate`, which also states
the rule for BatchNorm).

Data parallelism:

* :func:`make_train_step` with ``axis_name`` gives the classic ``jax.pmap``
  form: both sums of the loss are reduced across devices (``psum``; the
  local loss is the local weighted sum over the global weight), not averaged
  per device, and the model state is averaged (``pmean``) so that every
  replica holds the same statistics.
* :func:`jit_train_step` compiles the axis-free step with buffer donation;
  :func:`sharded_train_step` does the same over a ``jax.sharding.Mesh``
  with the batch split along the data axis and the state and teacher
  replicated (GSPMD inserts the all-reduces; BatchNorm statistics are those
  of the global batch).

``jit`` and sharded ``jit`` give the same params and model state for the same
global batch, dropout and augmentation included (they draw from the same
key). ``pmap`` gives the same params for a deterministic step (no dropout, no
augmentation; with each device's own key, masks and shifts differ); with
BatchNorm, the same model state only when the BatchNorm layers synchronise
their statistics across devices (``nn.BatchNorm(axis_name=...)``, as the Flax
ImageNet example does): otherwise each device normalises with its own
batch's statistics and the averaged state differs from the global batch's.
All of this is tested on 8 virtual CPU devices.

Buffer donation: the compiled forms donate the ``state`` they are given (its
buffers are reused for the new state). Pass each call the state the last
one returned; a state whose buffers were donated raises a ``ValueError``
saying so, instead of JAX's ``Array has been deleted``. Build the step with
``donate=False`` to keep the old states. :func:`kdjax.fit` never donates
arrays the caller holds.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Union

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kdjax import accumulate as accumulate_lib
from kdjax import fused, heads
from kdjax import hparams as hparams_lib
from kdjax import mesh as mesh_lib
from kdjax import options, precision, validate
from kdjax import student as student_lib
from kdjax.student import Student, abstract_student_logits  # noqa: F401
from kdjax.teacher import Teacher
from kdjax._types import PyTree
from kdjax.trees import copy_arrays

__all__ = [
    "OBJECTIVES",
    "DonatedStateError",
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

# The built-in objectives' names (kdjax.objectives.names() lists all).
OBJECTIVES = ("kd", "soft", "logit_matching", "hard")
Schedule = Callable[[jax.Array], jax.Array]


@flax.struct.dataclass
class TrainState:
  """The student's training state (the teacher is never part of it).

  Attributes:
    step: number of optimizer steps taken (int32 scalar).
    params: the student's parameters.
    model_state: the student's other collections (BatchNorm statistics;
      ``{}`` for a stateless model): checkpointed, never in the optimizer.
    opt_state: the optax state for ``params``.
    hparams: the objective's hyperparameters, name -> float32 array
      (``temperature`` and ``alpha`` always; ``beta``, ... as given); a
      scheduled one holds the value used by the last step
      (:mod:`kdjax.hparams`).
    skipped: number of steps skipped for a non-finite loss or gradient.
    apply_fn: the student's forward, ``(params, model_state, *inputs,
      train, rng) -> (logits, new_model_state)`` (static; see
      :class:`kdjax.Student`).
    tx: the optax ``GradientTransformation`` (static).
    schedules: ``((name, fn), ...)``, the hyperparameters that are
      schedules ``step -> value`` (static).
    export_fn: ``(params, model_state) -> model`` (static; see
      :meth:`kdjax.Student.export`).
  """
  step: jax.Array
  params: PyTree
  model_state: PyTree
  opt_state: PyTree
  hparams: dict
  skipped: jax.Array
  apply_fn: Callable = flax.struct.field(pytree_node=False)
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  schedules: tuple = flax.struct.field(pytree_node=False, default=())
  export_fn: Optional[Callable] = flax.struct.field(pytree_node=False,
                                                    default=None)

  @classmethod
  def create(cls, student: Optional[Student] = None, *,
             tx: optax.GradientTransformation,
             apply_fn: Optional[Callable] = None,
             params: Optional[PyTree] = None,
             temperature: Union[float, Schedule, None] = None,
             alpha: Union[float, Schedule, None] = None,
             hparams: Optional[dict] = None) -> "TrainState":
    """A fresh state at step 0, owning copies of the student's arrays.

    The compiled steps donate the state they are given; the copies make sure
    that this never deletes the params (or student) the caller still holds.

    Either ``student`` (a :class:`kdjax.Student`, possibly with model
    state), or the stateless shorthand ``apply_fn(params, *inputs, train,
    rng) -> logits`` plus ``params`` (:meth:`kdjax.Student.from_logits_fn`).

    ``temperature`` (default 1.0), ``alpha`` (default 0.0) and the entries
    of ``hparams`` (e.g. ``{"beta": 0.3}``) are the objective's
    hyperparameters: numbers or schedules (functions of the int32 step,
    e.g. an ``optax`` schedule). They are checked here (a schedule at step
    0; see :mod:`kdjax.hparams`).

    Raises:
      ValueError: a bad hyperparameter (or one given twice), or both or
        neither of ``student`` and ``apply_fn`` given.
    """
    if student is not None and (apply_fn is not None or params is not None):
      raise ValueError("pass either student=kdjax.Student(...) or "
                       "apply_fn= and params=, not both.")
    if student is None:
      if apply_fn is None or params is None:
        raise ValueError(
            "TrainState.create needs a student (kdjax.Student.from_linen / "
            "from_nnx / from_fn) or apply_fn= and params=.")
      student = Student.from_logits_fn(apply_fn, params)
    if not isinstance(student, Student):
      raise TypeError(f"student must be a kdjax.Student, got "
                      f"{type(student).__name__}.")
    values, schedules = hparams_lib.build(temperature, alpha, hparams)
    # The state owns its buffers: the compiled steps donate them, which must
    # not delete the arrays of the student (or params) it was made from.
    params, model_state = copy_arrays((student.params, student.model_state))
    return cls(step=jnp.zeros((), jnp.int32), params=params,
               model_state=model_state, opt_state=tx.init(params),
               hparams=values, skipped=jnp.zeros((), jnp.int32),
               apply_fn=student.apply_fn, tx=tx, schedules=schedules,
               export_fn=student.export_fn)

  @property
  def temperature(self) -> jax.Array:
    """``hparams["temperature"]`` (read-only)."""
    return self.hparams["temperature"]

  @property
  def alpha(self) -> jax.Array:
    """``hparams["alpha"]`` (read-only)."""
    return self.hparams["alpha"]

  def current_hparams(self) -> dict:
    """The hyperparameters for the next step (schedules evaluated)."""
    return hparams_lib.current(self.hparams, self.schedules, self.step)

  def predict(self, *inputs) -> jax.Array:
    """The student's logits in evaluation mode (model state read only)."""
    logits, _ = self.apply_fn(self.params, self.model_state, *inputs,
                              train=False, rng=None)
    return heads.to_logits(logits)  # A student built with head=.

  def export(self):
    """The trained model (see :meth:`kdjax.Student.export`)."""
    if self.export_fn is None:
      return self.params, self.model_state
    return self.export_fn(self.params, self.model_state)


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
  """Deprecated alias of :func:`kdjax.preprocess.scale_pixels`."""
  from kdjax.preprocess import scale_pixels  # pylint: disable=g-import-not-at-top
  return scale_pixels(x)


def _inexact(x) -> bool:
  return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)


def _weighted(values, weights, denominator):
  """``sum(w * v) / denominator`` with zero-weight positions exactly 0."""
  v = values.astype(jnp.promote_types(values.dtype, jnp.float32))
  return jnp.sum(jnp.where(weights > 0, v, 0.0) * weights) / denominator


def _casts(prec: options.Precision):
  """``(cast_params, cast_inputs)`` for the step's precision."""
  if prec.compute_dtype is None:
    return (lambda tree: tree), (lambda tree: tree)
  return (functools.partial(precision.cast_floating, dtype=prec.compute_dtype,
                            keep_float32=prec.keep_float32),
          functools.partial(precision.cast_floating,
                            dtype=prec.compute_dtype))


def _step_keys(rng, step, axis_name):
  """``(augmentation key, dropout key)`` of a step: pure in the step count."""
  rng = jax.random.fold_in(rng, step)
  if axis_name is not None:
    rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
  return jax.random.split(rng)


def _teacher_logits(spec: options.StepSpec, teacher, batch, inputs,
                    model_inputs, cast, cast_inputs):
  """The teacher's logits: cached in the batch, online, or None."""
  fields, obj = spec.fields, spec.objective
  cached = fields.teacher_logits in batch
  if cached and spec.augment is not None and obj.needs_teacher:
    raise ValueError(
        "Cached teacher logits are stale under augmentation: the "
        "teacher must see the same augmented batch as the student. "
        f"Drop {fields.teacher_logits!r} from the data (online teacher) "
        "or disable augmentation.")
  if cached and obj.form == "hidden" and obj.needs_teacher:
    raise ValueError(
        f"objective {obj.name!r} works from the teacher's hidden states, "
        f"not cached logits: drop {fields.teacher_logits!r} from the data "
        "and pass a kdjax.Teacher built with head=, or cache top-k targets "
        "for 'chunked_topk'.")
  if cached:
    return jax.lax.stop_gradient(batch[fields.teacher_logits])
  if not obj.needs_teacher:
    return None
  if teacher is None:
    raise ValueError(
        f"objective {obj.name!r} needs a teacher; pass a kdjax.Teacher "
        f"or cached {fields.teacher_logits!r} in the data.")
  t_inputs = (inputs if fields.teacher_input_names == fields.input_names
              else model_inputs(fields.teacher_input_names))
  t = teacher if spec.precision.compute_dtype is None else teacher.replace(
      params=cast(teacher.params))
  out = t(*cast_inputs(list(t_inputs)))
  # A teacher built with head= gives hidden states: a logits objective
  # gets their logits.
  return out if obj.form == "hidden" else heads.to_logits(out)


def _reduce(obj, per_position, aux, logits_shape, weights, axis_name,
            sums=False):
  """The objective's per-position values summed over the global batch.

  Returns ``(loss, aux, w, denominator)``; ``w`` is None for a plain mean.
  With ``sums`` (a micro-batch, :mod:`kdjax.accumulate`): the weighted
  sums, not yet divided (``denominator`` 1).
  """
  want = logits_shape[:-1]
  for name, v in [("loss", per_position), *aux.items()]:
    if jnp.shape(v) != want:
      raise ValueError(
          f"objective {obj.name!r} returned {name} of shape "
          f"{jnp.shape(v)}; an objective returns one value per position, "
          f"shape {want} (logits {logits_shape} without the class axis).")
  if sums:
    w = (jnp.ones(want, jnp.float32) if weights is None
         else weights.astype(jnp.float32))
    one = jnp.ones((), jnp.float32)
    return (_weighted(per_position, w, one),
            {k: _weighted(v, w, one) for k, v in aux.items()}, w, one)
  if weights is None and axis_name is None:
    return (jnp.mean(per_position), {k: jnp.mean(v) for k, v in aux.items()},
            None, None)
  w = (jnp.ones(want, jnp.float32) if weights is None
       else weights.astype(jnp.float32))
  denominator = jnp.sum(w)
  if axis_name is not None:
    denominator = jax.lax.psum(denominator, axis_name)
  denominator = jax.lax.stop_gradient(
      jnp.where(denominator > 0, denominator, 1.0))
  return (_weighted(per_position, w, denominator),
          {k: _weighted(v, w, denominator) for k, v in aux.items()},
          w, denominator)


def _make_loss_fn(spec, state, inputs, t_logits, batch, hp, rng_drop,
                  cast, cast_inputs, axis_name, sums=False):
  """``params -> (loss, (aux, logits, model_state, w, denominator))``.

  ``sums``: weighted sums instead of means (see :func:`_reduce`).
  """
  fields, obj = spec.fields, spec.objective
  if obj.form == "hidden":  # The fused chunked loss (kdjax.fused).
    return fused.make_loss_fn(spec, state, inputs, t_logits, batch, hp,
                              rng_drop, cast, cast_inputs, axis_name)
  weights = batch[fields.weights] if fields.weights is not None else None
  objective_batch = dict(batch)
  if fields.labels is not None:
    objective_batch["label"] = batch[fields.labels]

  def loss_fn(params):
    s_logits, new_model_state = student_lib.student_forward(
        state.apply_fn, cast(params), state.model_state,
        cast_inputs(list(inputs)), train=True, rng=rng_drop)
    s_logits = heads.to_logits(s_logits)  # A student built with head=.
    s_for_loss, t_for_loss = s_logits, t_logits
    if weights is not None:
      validate.check_weights(weights.shape, s_logits.shape, fields.weights)
      keep = weights[..., None] > 0
      s_for_loss = jnp.where(keep, s_logits, 0.0)
      if t_logits is not None:
        t_for_loss = jnp.where(keep, t_logits, 0.0)
    per_position, aux = obj(s_for_loss, t_for_loss, objective_batch,
                            **obj.select(hp))
    total, aux, w, denominator = _reduce(
        obj, per_position, aux, s_logits.shape, weights, axis_name, sums)
    return total, (aux, s_logits, new_model_state, w, denominator)

  return loss_fn


def _metrics(loss, aux, s_logits, t_logits, labels, w, denominator):
  """The step's loss, terms, accuracy and agreement (local sums)."""
  s_pred = jnp.argmax(s_logits, -1)

  def rate(hits):
    hits = hits.astype(jnp.float32)
    return jnp.mean(hits) if w is None else _weighted(hits, w, denominator)

  metrics = {"loss": loss, **aux}
  if labels is not None:
    metrics["accuracy"] = rate(s_pred == labels)
  if t_logits is not None:
    metrics["agreement"] = rate(s_pred == jnp.argmax(t_logits, -1))
  return metrics


def _update(state, grads, new_model_state, finite, *, skip: bool,
            use_cond: bool):
  """``(params, opt_state, model_state)``: the update, or the old ones.

  With ``skip`` (policies ``"skip"`` and ``"raise"``), a step whose loss
  or gradients' global norm is not finite keeps the old params, optimizer
  state and model state, and the step counts it in ``state.skipped`` (its
  step counter still advances): on XLA:CPU by a ``lax.cond`` (which skips
  the update's memory passes), elsewhere by an elementwise select (which
  fuses into the update kernels and needs no host round trip for the
  predicate). With ``"apply"`` the update is applied.
  """

  def apply(operands):
    grads, opt_state, params, _, model_state = operands
    updates, opt_state = state.tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, model_state

  def keep_old(operands):
    _, opt_state, params, old_model_state, _ = operands
    return params, opt_state, old_model_state

  operands = (grads, state.opt_state, state.params, state.model_state,
              new_model_state)
  if skip and use_cond:
    return jax.lax.cond(finite, apply, keep_old, operands)
  if skip:
    new, old = apply(operands), keep_old(operands)
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  return apply(operands)


def _whole_batch(spec, state, teacher, batch, inputs, model_inputs,
                 rng_drop, cast, cast_inputs, axis_name):
  """``(hparams, metrics, grads, model_state)`` of the batch in one pass."""
  fields = spec.fields
  t_logits = _teacher_logits(spec, teacher, batch, inputs, model_inputs,
                             cast, cast_inputs)
  hp = state.current_hparams()
  loss_fn = _make_loss_fn(spec, state, inputs, t_logits, batch, hp,
                          rng_drop, cast, cast_inputs, axis_name)
  (loss, (aux, s_logits, new_model_state, w, denominator)), grads = (
      jax.value_and_grad(loss_fn, has_aux=True)(state.params))
  labels = batch[fields.labels] if fields.labels is not None else None
  metrics = (fused.metrics(loss, aux) if spec.objective.form == "hidden" else
             _metrics(loss, aux, s_logits, t_logits, labels, w, denominator))
  return hp, metrics, grads, new_model_state


def _accumulated(spec, state, teacher, batch, inputs, model_inputs, hp,
                 rng_drop, cast, cast_inputs, axis_name, plan):
  """``(metrics, grads, model_state)`` over ``spec.accumulate`` micro-batches.

  The weighted sums of the loss, the metrics and the gradients, and the
  weight sum, are accumulated over the micro-batches and divided once
  (:mod:`kdjax.accumulate`); the model state is threaded through them.
  """
  fields, obj, k = spec.fields, spec.objective, spec.accumulate
  size = validate.leading_size(batch)
  validate.check_accumulate(
      size, k, 1 if plan is None else plan.data_size,
      "" if plan is None else " x ".join(
          f"{a}={plan.mesh.shape[a]}" for a in plan.batch_axes),
      what="the batch's size")
  t_inputs = []
  if (fields.teacher_logits not in batch and obj.needs_teacher and
      fields.teacher_input_names != fields.input_names):
    t_inputs = model_inputs(fields.teacher_input_names)
  micro = accumulate_lib.split((dict(batch), list(inputs), list(t_inputs)),
                               k, plan)

  def one(model_state, x):
    j, (mb, m_inputs, m_t_inputs) = x
    t_logits = _teacher_logits(spec, teacher, mb, m_inputs,
                               lambda names: list(m_t_inputs), cast,
                               cast_inputs)
    loss_fn = _make_loss_fn(
        spec, state.replace(model_state=model_state), m_inputs, t_logits, mb,
        hp, jax.random.fold_in(rng_drop, j), cast, cast_inputs, None,
        sums=True)
    (loss, (aux, s_logits, new_model_state, w, one_)), grads = (
        jax.value_and_grad(loss_fn, has_aux=True)(state.params))
    labels = mb[fields.labels] if fields.labels is not None else None
    sums = _metrics(loss, aux, s_logits, t_logits, labels, w, one_)
    return new_model_state, (sums, grads, jnp.sum(w))

  new_model_state, (sums, grads, weight) = accumulate_lib.scan(
      one, state.model_state, micro, k)
  if axis_name is not None:
    weight = jax.lax.psum(weight, axis_name)
  denominator = jax.lax.stop_gradient(jnp.where(weight > 0, weight, 1.0))
  divide = lambda tree: jax.tree.map(lambda x: x / denominator, tree)
  return divide(sums), divide(grads), new_model_state


def make_train_step(spec: Union[options.StepSpec, str, Callable, None] = None,
                    *, axis_name: Optional[str] = None,
                    skip_impl: str = "auto", plan=None, **options_kw):
  """The pure train step ``(state, teacher, batch, rng) -> (state, metrics)``.

  Args:
    spec: a :class:`kdjax.StepSpec` (objective, fields, input transform,
      augmentation, precision, non-finite policy), or just an objective (a
      registered name such as ``"kd"``, an
      :class:`kdjax.objectives.Objective`, or a function
      ``(student_logits, teacher_logits, batch, *, <hyperparameters>) ->
      per-position loss``; it is passed exactly the hyperparameters it
      declares, from ``state.hparams``, schedules evaluated at the step);
      None is ``"kd"``.
    axis_name: set for ``jax.pmap``: the loss's sums and the gradients are
      ``psum``-ed over this axis, the model state ``pmean``-ed, and
      dropout/augmentation keys differ per device.
    skip_impl: how a skipped non-finite update is expressed: ``"cond"``
      (``lax.cond``, fastest on XLA:CPU), ``"select"`` (``jnp.where`` over
      the state, fuses into the update on GPU/TPU), or ``"auto"`` (cond on
      CPU, select elsewhere). The results are identical.
    plan: the :class:`kdjax.mesh.Plan` the step is compiled for (None: one
      device, or let GSPMD decide). Only ``spec.accumulate > 1`` reads it:
      its micro-batches are constrained to the plan's batch axes, so that
      every device keeps its rows (:mod:`kdjax.accumulate`).
    **options_kw: StepSpec's fields as keywords when ``spec`` is not a
      StepSpec (``make_train_step("kd", fields=...)``); the older keywords
      ``augment_fn``, ``compute_dtype``, ``keep_float32`` and
      ``skip_nonfinite`` are deprecated (:func:`kdjax.options.step_spec`).

  Non-finite steps (``spec.on_nonfinite``): see :func:`_update`.

  Returns:
    The step function (not yet compiled; ``step.spec`` is its StepSpec).
    Metrics: ``loss``, the objective's terms (``hard_loss``, ``soft_loss``
    for the built-ins), ``accuracy`` (vs labels, when there are labels),
    ``agreement`` (student/teacher top-1, when there are teacher logits),
    every hyperparameter of the state by its name (``temperature``,
    ``alpha``, ...: the values the step used), ``grad_norm``, ``finite``.

  Raises:
    ValueError, TypeError: an unknown objective name or an objective of the
      wrong signature (here); a batch that does not match ``fields``, a
      weight of the wrong shape, a missing teacher, a hyperparameter the
      objective reads missing from the state (when the step is traced,
      before anything compiles).
  """
  spec = options.step_spec(spec, **options_kw)
  if skip_impl not in ("auto", "cond", "select"):
    raise ValueError(f"skip_impl must be 'auto', 'cond' or 'select', got "
                     f"{skip_impl!r}.")
  cast, cast_inputs = _casts(spec.precision)
  fields, obj, skip = spec.fields, spec.objective, spec.skip_nonfinite

  def step(state: TrainState, teacher: Optional[Teacher], batch: dict,
           rng: jax.Array):
    validate.check_batch(batch, fields, needs_labels=obj.needs_labels)
    rng_aug, rng_drop = _step_keys(rng, state.step, axis_name)
    model_inputs = functools.partial(
        student_lib.model_inputs, batch, input_transform=spec.input_transform,
        augment=spec.augment, rng=rng_aug)
    inputs = model_inputs(fields.input_names)
    if spec.accumulate == 1:
      hp, metrics, grads, new_model_state = _whole_batch(
          spec, state, teacher, batch, inputs, model_inputs, rng_drop, cast,
          cast_inputs, axis_name)
    else:
      hp = state.current_hparams()
      metrics, grads, new_model_state = _accumulated(
          spec, state, teacher, batch, inputs, model_inputs, hp, rng_drop,
          cast, cast_inputs, axis_name, plan)
    if axis_name is not None:
      # Each device holds its part of the global sums: add them up.
      grads = jax.lax.psum(grads, axis_name)
      metrics = jax.lax.psum(metrics, axis_name)
      new_model_state = jax.tree.map(
          lambda x: jax.lax.pmean(x, axis_name) if _inexact(x) else x,
          new_model_state)
    metrics.update(hp)  # Every hyperparameter, by name.
    metrics["grad_norm"] = global_norm(grads)
    # One scalar test instead of a pass over every gradient: the global norm
    # is NaN/inf iff some gradient is (or if its sum of squares overflows
    # float32, i.e. a norm above ~1e19, which is divergence too).
    finite = jnp.logical_and(jnp.isfinite(metrics["loss"]),
                             jnp.isfinite(metrics["grad_norm"]))
    params, opt_state, model_state = _update(
        state, grads, new_model_state, finite, skip=skip,
        use_cond=skip_impl == "cond" or (
            skip_impl == "auto" and jax.default_backend() == "cpu"))
    metrics["finite"] = finite.astype(jnp.float32)
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state,
        model_state=model_state, hparams=hp,
        skipped=state.skipped + (1 - finite.astype(jnp.int32)) * int(skip))
    return new_state, metrics

  step.spec = spec
  step.objective = obj
  step.fields = fields
  return step


# ----------------------------------------------------------------------------
# Compiled forms.
# ----------------------------------------------------------------------------


class DonatedStateError(ValueError):
  """A compiled step was given a state whose buffers an earlier call donated."""


def _guard_donated(compiled: Callable, what: str) -> Callable:
  """``compiled`` with a clear error for a state it already donated.

  JAX's own error for a donated (deleted) buffer is ``RuntimeError: Array
  has been deleted``, raised deep inside the call; this checks the state's
  leaves first (a few microseconds) and names the fix.
  """

  @functools.wraps(compiled)
  def call(state, *args, **kwargs):
    for leaf in jax.tree.leaves(state):
      if isinstance(leaf, jax.Array) and leaf.is_deleted():
        raise DonatedStateError(
            f"the state passed to {what} was donated to an earlier call of "
            "a compiled step, which reused its buffers for the state it "
            "returned. Pass the state returned by the last call, or build "
            "the step with donate=False to keep old states (e.g. to reuse "
            "the params you created the state from).")
    return compiled(state, *args, **kwargs)

  for attr in ("lower", "trace", "eval_shape", "_cache_size", "clear_cache"):
    if hasattr(compiled, attr):
      setattr(call, attr, getattr(compiled, attr))
  call.compiled = compiled
  return call


def jit_train_step(objective: Union[str, Callable] = "kd", *,
                   donate: bool = True, **kwargs):
  """``jax.jit`` of :func:`make_train_step`.

  Args:
    objective: see :func:`make_train_step`.
    **kwargs: the other arguments of :func:`make_train_step`.
    donate: reuse the buffers of the ``state`` argument for the new state
      (the default; saves a copy of params and optimizer state per step).
      The state given is then deleted: pass each call the state the
      previous one returned. A deleted state raises
      :class:`DonatedStateError`.
  """
  compiled = jax.jit(make_train_step(objective, **kwargs),
                     donate_argnums=(0,) if donate else ())
  return _guard_donated(compiled, "jit_train_step") if donate else compiled


def pmap_train_step(objective: Union[str, Callable] = "kd", *,
                    axis_name: str = "batch", donate: bool = True, **kwargs):
  """The classic TPU form: ``jax.pmap`` over local devices.

  ``state`` must be replicated (:func:`replicate`) and ``batch`` split into a
  leading device axis (:func:`shard_batch` with ``mesh=None``); the teacher
  and ``rng`` are broadcast (``in_axes=None``). ``donate``: as for
  :func:`jit_train_step`.
  """
  step = make_train_step(objective, axis_name=axis_name, **kwargs)
  compiled = jax.pmap(step, axis_name=axis_name, in_axes=(0, None, 0, None),
                      donate_argnums=(0,) if donate else ())
  return _guard_donated(compiled, "pmap_train_step") if donate else compiled


def data_mesh(devices=None, axis: str = "data") -> Mesh:
  """A 1-D data-parallel mesh over ``devices`` (default: all devices)."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(-1), (axis,))


def sharded_train_step(mesh: Mesh, objective: Union[str, Callable] = "kd", *,
                       data_axis: str = "data", donate: bool = True,
                       **kwargs):
  """The modern form: jit over a ``Mesh``, batch sharded along ``data_axis``.

  The state, the teacher and the rng are replicated; the batch's leading
  axis is split over ``data_axis``. Under GSPMD the sums over the global
  batch become local sums plus an all-reduce. ``donate``: as for
  :func:`jit_train_step`.

  Tip: place the initial state with
  ``jax.device_put(state, NamedSharding(mesh, P()))`` before the first call;
  a state fresh from ``TrainState.create`` lives on one device, and the
  step then compiles a second time when it sees its own replicated output.
  """
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(data_axis))
  step = make_train_step(objective, plan=mesh_lib.Plan(mesh, (data_axis,)),
                         **kwargs)
  compiled = jax.jit(step,
                     in_shardings=(replicated, replicated, batch_sharding,
                                   replicated),
                     out_shardings=(replicated, replicated),
                     donate_argnums=(0,) if donate else ())
  return _guard_donated(compiled, "sharded_train_step") if donate else compiled


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

  The ``jax.pmap`` helper only: the result has a new leading axis of one
  copy per device. For ``jax.jit`` over a mesh (what :func:`kdjax.fit`
  uses) the one ``replicate`` is :func:`kdjax.mesh.replicate`: the same
  shapes, every device holding the whole array.

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
