"""The student: the counterpart of :class:`kdjax.Teacher`, with model state.

A :class:`Student` holds

* ``apply_fn(params, model_state, *inputs, train, rng) -> (logits,
  new_model_state)``: a pure forward function. In training
  (``train=True``) it may update ``model_state`` (BatchNorm's running
  statistics, say) and draw dropout masks from ``rng``; in evaluation
  (``train=False``) it reads ``model_state`` and returns it unchanged;
* ``params``: what the optimizer trains;
* ``model_state``: every other collection (``{}`` for a stateless model).
  It lives in :class:`kdjax.step.TrainState` beside the params, is
  checkpointed with them, never enters the optimizer, and is left unchanged
  by a skipped (non-finite) step.

Constructors:

* :meth:`Student.from_linen`: a ``flax.linen`` module and its variables;
  every collection but ``params`` (e.g. ``batch_stats``) is mutable in
  training and read in evaluation, as in the Flax ImageNet example;
* :meth:`Student.from_nnx`: an ``nnx.Module`` (``nnx.BatchNorm``,
  ``nnx.Dropout``, ``nnx.Rngs``...), split into graph and state once, merged
  inside the compiled step (the NNX training examples' functional pattern).
  The caller's module is never modified; :meth:`Student.export` gives the
  trained one back;
* :meth:`Student.from_fn`: a pure forward function of the signature above;
* :meth:`Student.from_logits_fn`: a stateless ``(params, *inputs, train,
  rng) -> logits`` (kdjax's models through
  :func:`kdjax.paper.models.linen_student_apply`).
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
import zlib
from typing import Callable, Optional, Sequence

import flax
import jax
from kdjax._types import PyTree
from kdjax.trees import copy_arrays, split_variables

__all__ = ["Student", "model_inputs", "student_forward",
           "abstract_student_logits"]

Forward = Callable[..., tuple[jax.Array, PyTree]]


# One forward per wrapped function: states built from the same function then
# share their static metadata, so jit reuses compilations and two such states
# (sweep members, a resumed run) have the same pytree structure.
_LOGITS_FORWARDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _logits_forward(fn: Callable[..., jax.Array]) -> Forward:
  try:
    return _LOGITS_FORWARDS[fn]
  except (KeyError, TypeError):
    pass

  def forward(params, model_state, *inputs, train, rng):
    return fn(params, *inputs, train, rng), model_state

  forward.logits_fn = fn
  try:
    _LOGITS_FORWARDS[fn] = forward
  except TypeError:  # Not weak-referenceable: no sharing.
    pass
  return forward


def _linen_forward(*args):
  try:
    return _cached_linen_forward(*args)
  except TypeError:  # An unhashable module attribute: no sharing.
    return _build_linen_forward(*args)


def _build_linen_forward(module, train_kwargs: tuple, eval_kwargs: tuple,
                         mutable: tuple, rng_collections: tuple,
                         head: Optional[str] = None):
  """The forward of a linen student, one per configuration.

  Students of equal modules (linen modules compare and hash by their
  attributes) share it, so that a new seed's state reuses the compiled
  step instead of compiling its own.
  """
  train_kwargs, eval_kwargs = dict(train_kwargs), dict(eval_kwargs)

  def rngs_for(rng):
    if rng is None:
      return {}
    return {name: (rng if i == 0 else jax.random.fold_in(rng, i))
            for i, name in enumerate(rng_collections)}

  if head is not None:
    return _with_linen_head(
        _build_linen_forward(module, train_kwargs, eval_kwargs, mutable,
                             rng_collections), head)

  def forward(params, model_state, *inputs, train, rng):
    variables = {"params": params, **model_state}
    if train and mutable:
      logits, updates = module.apply(variables, *inputs, rngs=rngs_for(rng),
                                     mutable=list(mutable), **train_kwargs)
      return logits, {**model_state, **dict(updates)}
    kwargs = train_kwargs if train else eval_kwargs
    rngs = rngs_for(rng) if train else {}
    return module.apply(variables, *inputs, rngs=rngs, **kwargs), model_state

  def export(params, model_state):
    return {"params": params, **model_state}

  return forward, export


def _with_linen_head(built, head: str):
  """A linen ``(forward, export)`` returning :class:`kdjax.heads.Hidden`."""
  from kdjax import heads  # pylint: disable=g-import-not-at-top
  inner, export = built

  def forward(params, model_state, *inputs, train, rng):
    (out, new_state), captured = heads.linen_call(head, lambda: inner(
        params, model_state, *inputs, train=train, rng=rng))
    return heads.check_head(head, out, captured), new_state

  return forward, export


_cached_linen_forward = functools.lru_cache(maxsize=256)(_build_linen_forward)


@flax.struct.dataclass
class Student:
  """A student model: a pure forward function, its params and model state.

  Attributes:
    apply_fn: ``(params, model_state, *inputs, train, rng) ->
      (logits, new_model_state)`` (static).
    params: the trainable parameters.
    model_state: the non-trainable collections (``{}`` if none).
    export_fn: ``(params, model_state) -> model`` giving back a usable
      model (linen: the variables dict; NNX: the module), or None (static).
  """
  apply_fn: Forward = flax.struct.field(pytree_node=False)
  params: PyTree
  model_state: PyTree = dataclasses.field(default_factory=dict)
  export_fn: Optional[Callable] = flax.struct.field(pytree_node=False,
                                                    default=None)

  def __call__(self, *inputs, train: bool = False,
               rng: Optional[jax.Array] = None):
    """``(logits, new_model_state)`` for ``inputs``."""
    return self.apply_fn(self.params, self.model_state, *inputs, train=train,
                         rng=rng)

  def export(self, params: Optional[PyTree] = None,
             model_state: Optional[PyTree] = None):
    """The model with ``params`` and ``model_state`` (default: its own).

    Pass a trained :class:`kdjax.step.TrainState`'s ``params`` and
    ``model_state``. linen: the variables dict ``{'params': ...,
    'batch_stats': ...}`` for ``module.apply``; NNX: a new ``nnx.Module``
    in eval mode (call ``.train()`` on it to train on); a plain function:
    ``(params, model_state)``.
    """
    params = self.params if params is None else params
    model_state = self.model_state if model_state is None else model_state
    if self.export_fn is None:
      return params, model_state
    return self.export_fn(params, model_state)

  # -- constructors ----------------------------------------------------------

  @classmethod
  def from_fn(cls, fn: Forward, params: PyTree,
              model_state: Optional[PyTree] = None) -> "Student":
    """A student from a pure forward function (the signature above)."""
    return cls(apply_fn=fn, params=params,
               model_state={} if model_state is None else model_state)

  @classmethod
  def from_logits_fn(cls, fn: Callable[..., jax.Array],
                     params: PyTree) -> "Student":
    """A stateless student from ``fn(params, *inputs, train, rng) -> logits``.

    ``train`` and ``rng`` are passed positionally after the inputs, as
    :func:`kdjax.paper.models.linen_student_apply` takes them.
    """

    return cls(apply_fn=_logits_forward(fn), params=params, model_state={})

  @classmethod
  def from_linen(cls, module, variables: PyTree, *,
                 train_kwargs: Optional[dict] = None,
                 eval_kwargs: Optional[dict] = None,
                 mutable: Optional[Sequence[str]] = None,
                 rng_collections: Sequence[str] = ("dropout",),
                 head: Optional[str] = None) -> "Student":
    """A student from a ``flax.linen`` module and its variables.

    Args:
      module: the ``nn.Module``.
      variables: ``module.init``'s result: ``{'params': ..., <collections>}``.
        Pass all of it: a BatchNorm student given only its params fails with
        an error naming the missing collection.
      train_kwargs: keywords that put the module in training mode; default
        ``{'train': True}`` (kdjax's and the Flax examples' convention).
      eval_kwargs: keywords for evaluation; default ``{'train': False}``.
      mutable: collections updated in training; default every collection
        of ``variables`` except ``params``.
      rng_collections: rng streams given a key in training (the step's key
        for ``'dropout'``, keys folded from it for the others).
      head: the output layer's path (``"logits"``, ``"decoder/lm_head"``):
        the forward then returns a :class:`kdjax.heads.Hidden` (its input
        hidden states and ``[D, V]`` kernel and bias) instead of logits,
        for the hidden-state objectives (:mod:`kdjax.fused`); the head
        must be the model's last operation (:mod:`kdjax.heads`).

    Returns:
      A :class:`Student`; :meth:`export` gives back the variables dict.
    """
    train_kwargs = {"train": True} if train_kwargs is None else dict(
        train_kwargs)
    eval_kwargs = {"train": False} if eval_kwargs is None else dict(
        eval_kwargs)
    params, model_state = split_variables(variables, who="Student.from_linen")
    mutable = tuple(model_state) if mutable is None else tuple(mutable)
    forward, export = _linen_forward(
        module, tuple(sorted(train_kwargs.items())),
        tuple(sorted(eval_kwargs.items())), mutable, tuple(rng_collections),
        head)
    return cls(apply_fn=forward, params=params, model_state=model_state,
               export_fn=export)

  @classmethod
  def from_nnx(cls, model, *, head: Optional[str] = None) -> "Student":
    """A student from a Flax NNX module; the module itself is not modified.

    The module is cloned and split into a graph definition, its
    ``nnx.Param`` variables (the params), its rng state and everything else
    (the model state: ``nnx.BatchStat``, ...). Inside the step the graph is
    merged with the current params and state, run in training mode
    (``.train()``) or evaluation mode (``.eval()``), and split again; the
    updated batch statistics become the new model state.

    Randomness: before each training forward every rng stream of the module
    is reseeded (``nnx.reseed``) from the step's key, so dropout follows the
    step's key like a linen student's (a resumed run replays it, and the
    sharded step draws one mask over the global batch). The rng state is not
    part of the model state.

    :meth:`export` returns a new module in eval mode holding the trained
    params and statistics.

    ``head``: the output layer's attribute path (``"lm_head"``,
    ``"decoder/lm_head"``): the forward then returns a
    :class:`kdjax.heads.Hidden` instead of logits (see
    :meth:`from_linen` and :mod:`kdjax.heads`).
    """
    from flax import nnx  # Local import: NNX is optional for linen users.

    model = nnx.clone(model)
    model.train()
    graph_train, params, rng_state, model_state = nnx.split(
        model, nnx.Param, nnx.RngState, ...)
    model.eval()
    graph_eval = nnx.graphdef(model)
    params, rng_state, model_state = copy_arrays(
        (params, rng_state, model_state))
    streams = sorted({getattr(v, "tag", None) for v in jax.tree.leaves(
        rng_state, is_leaf=lambda v: isinstance(v, nnx.Variable))
                      if isinstance(v, nnx.RngKey)} - {None})

    def forward(params, model_state, *inputs, train, rng):
      # Fresh Variables at this trace level (NNX refuses to update ones made
      # at another: the captured rng state, or a model state closed over by
      # the step's value_and_grad).
      fresh = lambda tree: jax.tree.map(lambda x: x, tree)
      module = nnx.merge(graph_train if train else graph_eval, fresh(params),
                         fresh(rng_state), fresh(model_state))
      if train and rng is not None and streams:
        nnx.reseed(module, **{s: jax.random.fold_in(
            rng, zlib.crc32(s.encode())) for s in streams})
      if head is None:
        logits = module(*inputs)
      else:
        from kdjax import heads  # pylint: disable=g-import-not-at-top
        logits = heads.nnx_head(module, head, lambda m: m(*inputs))
      if not train:
        return logits, model_state
      _, _, _, new_state = nnx.split(module, nnx.Param, nnx.RngState, ...)
      return logits, new_state

    def export(params, model_state):
      return nnx.merge(graph_eval, params, copy_arrays(rng_state),
                       copy_arrays(model_state))

    return cls(apply_fn=forward, params=params, model_state=model_state,
               export_fn=export)


def model_inputs(batch, names, *, input_transform: Optional[Callable] = None,
                 augment: Optional[Callable] = None, rng=None) -> list:
  """The model inputs of ``batch``: its ``names`` fields, transformed.

  ``input_transform`` is applied to every input, then ``augment(rng, x)``
  to the first one. The one rule for the step, its abstract input checks
  and the loop choice (which pass an abstract key).
  """
  xs = [batch[n] for n in names]
  if input_transform is not None:
    xs = [input_transform(x) for x in xs]
  if augment is not None:
    xs[0] = augment(jax.random.key(0) if rng is None else rng, xs[0])
  return xs


def _shapes(inputs) -> str:
  return ", ".join(str(tuple(getattr(x, "shape", ()))) for x in inputs)


def student_forward(apply_fn, params, model_state, inputs, *, train: bool,
                    rng):
  """``apply_fn``, with one-line errors for inputs the student cannot take.

  Raises:
    ValueError: a stateful model missing its model state, or an input of a
      shape the student's params were not built for (Flax's
      ``ScopeParamShapeError``).
  """
  try:
    return apply_fn(params, model_state, *inputs, train=train, rng=rng)
  except flax.errors.ScopeCollectionNotFound as e:
    raise ValueError(
        f"the student reads a model-state collection that its state does not "
        f"hold ({e}). It is a stateful model (BatchNorm, say): build it with "
        "kdjax.Student.from_linen(module, variables), passing every "
        "collection of module.init(...) (not only 'params'), or "
        "kdjax.Student.from_nnx(module).") from None
  except flax.errors.ScopeParamShapeError as e:
    raise ValueError(
        f"the student was not built for inputs of shape {_shapes(inputs)} "
        f"(per example, after input_transform): {str(e).splitlines()[0]} "
        "Initialise the student on an example of the data it trains on "
        "(module.init(rng, x[:1])), or reshape the data's inputs to what "
        "it was built for.") from None


def abstract_student_logits(apply_fn, params, model_state,
                            inputs_fn: Callable, batch) -> tuple[int, ...]:
  """The student's training-mode logits shape on ``batch`` (no compiling).

  ``params``, ``model_state`` and ``batch`` may be ``ShapeDtypeStruct``
  trees; ``inputs_fn(batch)`` returns the model's inputs.
  """

  def logits(params, model_state, batch, rng):
    out, _ = student_forward(apply_fn, params, model_state, inputs_fn(batch),
                             train=True, rng=rng)
    return out

  key = jax.eval_shape(lambda: jax.random.key(0))
  return tuple(jax.eval_shape(logits, params, model_state, batch, key).shape)
