"""Helpers shared by the test modules (imported as ``_helpers``)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np


def np_init(module, seed, **kwargs):
  """Variables for ``module`` drawn with NumPy (shapes from jax.eval_shape).

  Avoids compiling ``module.init`` (slow on XLA:CPU): kernels are
  N(0, 1/fan_in), BatchNorm scales and variances ones, everything else zero.
  """
  shapes = jax.eval_shape(functools.partial(module.init, **kwargs),
                          jax.random.key(0), jnp.zeros((1, 8, 8)))
  rng = np.random.RandomState(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    if "kernel" in name:
      value = rng.randn(*leaf.shape) / np.sqrt(leaf.shape[0])
    elif "scale" in name or "var" in name:
      value = np.ones(leaf.shape)
    else:
      value = np.zeros(leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)
