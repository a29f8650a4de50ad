"""Small pytree helpers shared by the student, teacher, train state and fit.

>>> import jax.numpy as jnp
>>> from kdjax import trees
>>> x = jnp.ones(3)
>>> trees.copy_arrays({"w": x})["w"] is x
False
>>> variables = {"params": {"w": x}, "batch_stats": {}}
>>> params, rest = trees.split_variables(variables, who="Student.from_linen")
>>> sorted(rest)
['batch_stats']
"""

from __future__ import annotations

import jax

from kdjax._types import PyTree

__all__ = ["copy_arrays", "split_variables"]


def copy_arrays(tree: PyTree) -> PyTree:
  """A copy of every concrete ``jax.Array`` leaf (same sharding).

  Tracers and other leaves are returned as they are. A snapshot that no
  later update (or buffer donation) of the original can reach.
  """

  def copy(x):
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
      return x.copy()
    return x

  return jax.tree.map(copy, tree)


def split_variables(variables: PyTree, *, who: str) -> tuple[PyTree, dict]:
  """``module.init``'s variables as ``(params, {other collections})``.

  Raises:
    ValueError: naming ``who``, when there is no ``'params'`` collection.
  """
  variables = dict(variables)
  if "params" not in variables:
    raise ValueError(
        f"{who} expects the variables returned by module.init, with a "
        f"'params' collection; got keys {sorted(variables)}.")
  params = variables.pop("params")
  return params, variables
