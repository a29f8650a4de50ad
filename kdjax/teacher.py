"""The teacher: a frozen pytree of (apply function, parameters, state).

A :class:`Teacher` is data, not a model object with a training mode. It holds

* ``apply_fn(params, state, *inputs) -> logits``: a pure function that runs the
  teacher in **inference mode** (no dropout, batch statistics read, never
  updated). The constructors below bind the eval flag so it cannot be
  forgotten;
* ``params``: the teacher's parameters;
* ``state``: any non-trainable collections (e.g. ``{'batch_stats': ...}``).

Calling a teacher wraps both the inputs and the output in
``jax.lax.stop_gradient``, so no gradient can reach its parameters even if a
user differentiates with respect to them by mistake. The train step takes
gradients with respect to the student's parameters only and never puts the
teacher into the optimizer state or the checkpoint (big_vision's
distillation trainer does the same).

Ensembles
---------
:func:`ensemble` combines several teachers into one. The default combination
is the **mean of the members' logits**. For every temperature ``T`` this is
exactly the renormalised *geometric* mean of their tempered probabilities:

.. math::
  \\mathrm{softmax}\\Big(\\frac{1}{K}\\sum_k z_k / T\\Big)_i
  = \\frac{\\prod_k q_{k,i}^{1/K}}{\\sum_j \\prod_k q_{k,j}^{1/K}},
  \\qquad q_k = \\mathrm{softmax}(z_k / T),

so a single set of logits serves every ``T`` of a sweep. The paper's
speech ensemble averages *probabilities* (an arithmetic mean), which depends
on ``T``; ``combine="arithmetic"`` returns logits
``T * log(mean_k softmax(z_k / T))`` whose tempered softmax at that one
``T`` is exactly the arithmetic mean.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
from kdjax import heads
from kdjax._types import PyTree
from kdjax.trees import copy_arrays, split_variables

__all__ = ["Teacher", "ensemble"]



@flax.struct.dataclass
class Teacher:
  """A frozen teacher: ``logits = teacher(x)``, always in inference mode.

  Attributes:
    apply_fn: ``(params, state, *inputs) -> logits``, deterministic (eval
      mode). The step passes the batch's teacher inputs
      (:class:`kdjax.fields.Fields`) positionally.
      Static: it is part of the compiled program, not of the pytree's leaves.
    params: the teacher's parameters (a pytree of arrays).
    state: non-trainable collections such as batch statistics (a pytree,
      possibly empty). Read only.
  """
  apply_fn: Callable[..., jax.Array] = flax.struct.field(pytree_node=False)
  params: PyTree
  state: PyTree = dataclasses.field(default_factory=dict)

  def __call__(self, *inputs) -> jax.Array:
    """Teacher logits for ``inputs``; no gradient flows into or out of them."""
    params = jax.lax.stop_gradient(self.params)
    state = jax.lax.stop_gradient(self.state)
    inputs = jax.lax.stop_gradient(inputs)
    return jax.lax.stop_gradient(self.apply_fn(params, state, *inputs))

  # -- constructors ----------------------------------------------------------

  @classmethod
  def from_linen(cls, module, variables: PyTree, *, head: Optional[str] = None,
                 **eval_kwargs) -> "Teacher":
    """A teacher from a ``flax.linen`` module and its variables.

    Args:
      module: the ``nn.Module``.
      variables: ``{'params': ..., <other collections>...}`` as returned by
        ``module.init``.
      **eval_kwargs: the keyword that puts the module in inference mode.
        Defaults to ``train=False`` (kdjax's models and the Flax examples'
        convention); pass e.g. ``deterministic=True`` for other modules.
      head: the output layer's path: the teacher then returns a
        :class:`kdjax.heads.Hidden` (hidden states and output projection)
        instead of logits, for the hidden-state objectives
        (:mod:`kdjax.fused`, :mod:`kdjax.heads`).

    Returns:
      A :class:`Teacher` whose ``apply_fn`` always runs ``module.apply`` with
      ``eval_kwargs`` and no mutable collections.
    """
    if not eval_kwargs:
      eval_kwargs = {"train": False}
    params, variables = split_variables(variables, who="Teacher.from_linen")

    def apply_fn(params, state, *inputs):
      return module.apply({"params": params, **state}, *inputs, **eval_kwargs)

    if head is not None:
      apply_fn = _linen_head_fn(apply_fn, head)
    return cls(apply_fn=apply_fn, params=params, state=variables)

  @classmethod
  def from_nnx(cls, model, *, head: Optional[str] = None) -> "Teacher":
    """A teacher from a Flax NNX module: a snapshot, in eval mode.

    The module is cloned and its arrays copied before the split, so later
    changes to the caller's module (an optimizer step on it, ``.train()``)
    never reach the teacher, and the caller's module is not switched to
    eval mode. The clone runs in eval mode: dropout off, batch statistics
    read, not updated. ``head``: as for :meth:`from_linen` (an attribute
    path).
    """
    from flax import nnx  # Local import: NNX is optional for linen users.

    model = nnx.clone(model)
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params, rest = copy_arrays((params, rest))

    def apply_fn(params, state, *inputs):
      module = nnx.merge(graphdef, params, state)
      if head is None:
        return module(*inputs)
      return heads.nnx_head(module, head, lambda m: m(*inputs))

    return cls(apply_fn=apply_fn, params=params, state=rest)

  @classmethod
  def from_fn(cls, fn: Callable[..., jax.Array],
              params: PyTree) -> "Teacher":
    """A teacher from a pure function ``fn(params, *inputs) -> logits``."""
    return cls(apply_fn=lambda p, _, *inputs: fn(p, *inputs), params=params,
               state={})


def _linen_head_fn(apply_fn, head: str):
  """``apply_fn`` returning :class:`kdjax.heads.Hidden` (``head`` captured)."""

  def fn(params, state, *inputs):
    out, captured = heads.linen_call(head, lambda: apply_fn(params, state,
                                                            *inputs))
    return heads.check_head(head, out, captured)

  return fn


def ensemble(teachers: Sequence[Teacher], *, combine: str = "mean_logits",
             temperature: Optional[float] = None) -> Teacher:
  """Combines several teachers into one :class:`Teacher`.

  Args:
    teachers: the members (any architectures).
    combine: ``"mean_logits"`` (default): the mean of the members' logits,
      i.e. the renormalised geometric mean of their tempered probabilities at
      every temperature. ``"arithmetic"``: logits whose softmax at
      ``temperature`` is the arithmetic mean of the members' tempered
      probabilities (the paper's ensemble averaging); needs ``temperature``.
    temperature: required for ``combine="arithmetic"``.

  Returns:
    A :class:`Teacher` whose params and state are tuples of the members'.
  """
  teachers = tuple(teachers)
  if not teachers:
    raise ValueError("ensemble() needs at least one teacher.")
  if combine not in ("mean_logits", "arithmetic"):
    raise ValueError(f"combine must be 'mean_logits' or 'arithmetic', got "
                     f"{combine!r}.")
  if combine == "arithmetic" and (temperature is None or not temperature > 0):
    raise ValueError("combine='arithmetic' needs a temperature > 0: the "
                     "arithmetic mean of tempered probabilities depends on T.")
  fns = tuple(t.apply_fn for t in teachers)

  def apply_fn(params, state, *inputs):
    logits = jnp.stack([
        heads.to_logits(f(p, s, *inputs)).astype(jnp.float32)
        for f, p, s in zip(fns, params, state)])
    if combine == "mean_logits":
      return jnp.mean(logits, axis=0)
    log_q = jax.nn.log_softmax(logits / temperature, axis=-1)
    log_mean_q = jax.nn.logsumexp(log_q, axis=0) - jnp.log(len(fns))
    return temperature * log_mean_q

  return Teacher(apply_fn=apply_fn,
                 params=tuple(t.params for t in teachers),
                 state=tuple(t.state for t in teachers))
