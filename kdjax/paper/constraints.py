r"""Max-norm weight constraint (Srivastava et al., 2014), as an optax transform.

The dropout recipe that Hinton, Vinyals & Dean (2015) use for their MNIST
teacher bounds the length of every hidden unit's **incoming** weight vector.
For a Dense kernel :math:`W \in \mathbb{R}^{n_{in} \times n_{out}}` (flax
layout ``[fan_in, fan_out]``) unit :math:`j` owns the column
:math:`w_j = W_{:, j}`, and after every optimiser step the constraint applies
the projection onto the ball :math:`\|w_j\|_2^2 \le c`:

.. math::
  w_j \leftarrow \begin{cases}
    w_j & \text{if } \|w_j\|^2 \le c, \\
    w_j \sqrt{c / \|w_j\|^2} & \text{otherwise,}
  \end{cases}

i.e. a column outside the ball is rescaled onto its surface, keeping its
direction; a column inside is left bit-for-bit unchanged. The paper value is
:math:`c = 15` (a squared norm). For a conv kernel ``[kh, kw, c_in, c_out]``
the incoming vector of output channel :math:`j` is ``W[..., j]``, so the norm
is taken over all axes but the last. Biases are never constrained.

:func:`max_norm` is an ``optax.GradientTransformation`` meant to be chained
**last**, after the optimiser, so that it sees the final update:

>>> import optax
>>> from kdjax import constraints
>>> tx = optax.chain(optax.sgd(0.1, momentum=0.9), constraints.max_norm(15.0))

It must be called as ``tx.update(grads, opt_state, params)``.
"""

from __future__ import annotations

import numbers
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from kdjax._types import PyTree

Array = jax.Array
KeyPath = Sequence[Any]
Predicate = Callable[[KeyPath, Array], bool]

__all__ = [
    "max_norm",
    "project_max_norm",
    "default_predicate",
]

_MISSING_PARAMS = ("max_norm needs params; call tx.update(grads, opt_state, "
                   "params)")


def default_predicate(path: KeyPath, leaf: Array) -> bool:
  """Selects weight kernels: leaves of rank >= 2 whose path ends in 'kernel'.

  This picks flax ``Dense`` kernels ``[fan_in, fan_out]`` and ``Conv`` kernels
  ``[kh, kw, c_in, c_out]`` and skips biases (and any other 1-D leaf).
  """
  return (bool(path) and jnp.ndim(leaf) >= 2
          and jax.tree_util.keystr(tuple(path[-1:]), simple=True) == "kernel")


def _check_max_sq_norm(max_sq_norm) -> None:
  if isinstance(max_sq_norm, bool):
    raise TypeError(
        f"max_sq_norm must be a positive number, got {max_sq_norm!r}.")
  if isinstance(max_sq_norm, numbers.Real) and not max_sq_norm > 0:
    raise ValueError(
        f"max_sq_norm must be > 0, got {max_sq_norm!r} (a *squared* norm; the "
        "paper uses 15).")


def _project_leaf(w: Array, max_sq_norm) -> tuple[Array, Array]:
  r"""Projects each ``w[..., j]`` onto :math:`\|\cdot\|^2 \le c`.

  Returns the projected leaf (in ``w``'s dtype) and the boolean ``[fan_out]``
  mask of the columns that were rescaled. Norms are computed in >= float32.
  """
  if w.ndim < 2:
    raise ValueError(
        f"max-norm projects incoming weight vectors of kernels of rank >= 2, "
        f"got a leaf of shape {w.shape}; check the predicate.")
  wf = w.astype(jnp.promote_types(w.dtype, jnp.float32))
  c = jnp.asarray(max_sq_norm, wf.dtype)
  sq = jnp.sum(jnp.square(wf), axis=tuple(range(w.ndim - 1)))  # [fan_out]
  outside = sq > c
  # sqrt(c / max(sq, c)) is 1 inside the ball and never divides by zero.
  scale = jnp.sqrt(c / jnp.maximum(sq, c))
  projected = jnp.where(outside, wf * scale, wf).astype(w.dtype)
  return projected, outside


def project_max_norm(params: PyTree, max_sq_norm: float = 15.0,
                     predicate: Optional[Predicate] = None) -> PyTree:
  r"""Pure max-norm projection of every selected kernel in ``params``.

  For each selected leaf ``W`` and output unit ``j``, with
  :math:`s_j = \sum_{i} W_{i j}^2` (sum over all axes but the last):
  :math:`W_{:, j} \leftarrow W_{:, j} \sqrt{c / s_j}` if :math:`s_j > c`,
  else unchanged (exactly). Other leaves are returned as they are.

  Args:
    params: a parameter pytree.
    max_sq_norm: :math:`c`, the bound on the **squared** column norm.
    predicate: ``predicate(key_path, leaf) -> bool`` choosing the leaves to
      project; defaults to :func:`default_predicate` (rank >= 2 ``kernel``).

  Returns:
    A pytree like ``params`` with the constrained kernels.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import constraints
    >>> p = {'kernel': jnp.array([[3.0, 1.0], [4.0, 0.0]]),
    ...      'bias': jnp.array([9.0, 9.0])}
    >>> out = constraints.project_max_norm(p, max_sq_norm=1.0)
    >>> out['kernel']  # column 0 had norm 5 -> rescaled to norm 1
    Array([[0.6, 1. ],
           [0.8, 0. ]], dtype=float32)
    >>> out['bias']
    Array([9., 9.], dtype=float32)
  """
  _check_max_sq_norm(max_sq_norm)
  predicate = default_predicate if predicate is None else predicate

  def f(path, w):
    if not predicate(path, w):
      return w
    return _project_leaf(w, max_sq_norm)[0]

  return jax.tree_util.tree_map_with_path(f, params)


def max_norm(max_sq_norm: float = 15.0,
             predicate: Optional[Predicate] = None
             ) -> optax.GradientTransformation:
  r"""Max-norm constraint as a stateless ``optax.GradientTransformation``.

  Chain it **last**: given the optimiser's final ``updates`` :math:`u` and the
  current ``params`` :math:`\theta`, it forms the would-be new parameters
  :math:`\theta' = \theta + u`, projects every selected kernel of
  :math:`\theta'` with :func:`project_max_norm` and returns

  .. math::
    u' = \Pi_c(\theta + u) - \theta

  for the columns that were rescaled, and :math:`u` itself (bit-for-bit) for
  columns already inside the ball and for unselected leaves such as biases.
  So ``optax.apply_updates(params, u')`` gives the projected parameters (up
  to one rounding of the subtraction), and a step that stays inside the ball
  is exactly the unconstrained optimiser step.

  Args:
    max_sq_norm: :math:`c`, the bound on each incoming weight vector's squared
      L2 norm (paper/dropout-recipe value: 15).
    predicate: ``predicate(key_path, leaf) -> bool`` choosing the leaves to
      constrain; defaults to :func:`default_predicate` (rank >= 2 leaves named
      ``kernel``; norms over all axes but the last).

  Returns:
    A ``GradientTransformation`` with an empty state; its ``update`` raises
    ``ValueError`` when called without ``params``. It is jittable.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> from kdjax import constraints
    >>> params = {'kernel': jnp.zeros((2, 1)), 'bias': jnp.zeros(1)}
    >>> tx = optax.chain(optax.sgd(1.0), constraints.max_norm(1.0))
    >>> state = tx.init(params)
    >>> grads = {'kernel': jnp.array([[-3.0], [-4.0]]),
    ...          'bias': jnp.array([-5.0])}
    >>> updates, state = jax.jit(tx.update)(grads, state, params)
    >>> new = optax.apply_updates(params, updates)
    >>> new['kernel'].ravel(), new['bias']
    (Array([0.6, 0.8], dtype=float32), Array([5.], dtype=float32))
  """
  _check_max_sq_norm(max_sq_norm)
  predicate = default_predicate if predicate is None else predicate

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(_MISSING_PARAMS)

    def f(path, u, p):
      if not predicate(path, p):
        return u
      new = jnp.asarray(p + u).astype(p.dtype)
      projected, outside = _project_leaf(new, max_sq_norm)
      constrained = (projected - p).astype(u.dtype)
      # `outside` broadcasts on fan_out.
      return jnp.where(outside, constrained, u)

    updates = jax.tree_util.tree_map_with_path(f, updates, params)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)
