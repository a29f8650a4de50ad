"""Helpers shared by the test modules (imported as ``_helpers``).

NumPy parameter draws and the tiny nets on 8x8 inputs that the train-step,
student and teacher tests train and compare.
"""
import functools

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from kdjax import preprocess


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


# ----------------------------------------------------------------------------
# Tiny nets on 8x8 inputs, shared by test_student, test_teacher, test_train.
# ----------------------------------------------------------------------------

NUM_CLASSES = 10


class BNNet(nn.Module):
  """Dense -> BatchNorm -> relu -> Dense on 8x8 inputs."""
  width: int = 16
  bn_axis: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)
    x = nn.Dense(self.width)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.5,
                     axis_name=self.bn_axis)(x)
    return nn.Dense(NUM_CLASSES, name="logits")(nn.relu(x))


class NnxNet(nnx.Module):
  """The NNX counterpart, with dropout drawing from the module's Rngs."""

  def __init__(self, rngs: nnx.Rngs, width: int = 16, dropout: float = 0.2):
    self.hidden = nnx.Linear(64, width, rngs=rngs)
    self.bn = nnx.BatchNorm(width, momentum=0.5, rngs=rngs)
    self.drop = nnx.Dropout(dropout, rngs=rngs)
    self.out = nnx.Linear(width, NUM_CLASSES, rngs=rngs)

  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    return self.out(self.drop(nnx.relu(self.bn(self.hidden(x)))))


class TokenNet(nn.Module):
  """A per-position token model: position t's logits depend on token t only."""
  vocab: int = 11
  width: int = 8

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    x = nn.Embed(self.vocab, self.width)(tokens)
    x = nn.relu(nn.Dense(self.width)(x))
    return nn.Dense(self.vocab)(x)


class OptionsMLP(nn.Module):
  """A tiny MLP on 8x8 inputs with optional BatchNorm and Dropout."""
  width: int = 32
  dropout: float = 0.0
  batchnorm: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1)
    x = nn.Dense(self.width)(x)
    if self.batchnorm:
      x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
    x = nn.relu(x)
    if self.dropout:
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(NUM_CLASSES)(x)


class NnxMLP(nnx.Module):
  """An NNX teacher with BatchNorm and Dropout, its values drawn by NumPy."""

  def __init__(self, rngs: nnx.Rngs, width: int = 32, seed: int = 0):
    zeros = nnx.initializers.zeros_init()  # Cheap; NumPy values below.
    self.hidden = nnx.Linear(64, width, kernel_init=zeros, rngs=rngs)
    self.bn = nnx.BatchNorm(width, momentum=0.5, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.out = nnx.Linear(width, NUM_CLASSES, kernel_init=zeros, rngs=rngs)
    init = np.random.RandomState(seed)
    self.hidden.kernel[...] = jnp.asarray(init.randn(64, width) / 8.0,
                                          jnp.float32)
    self.out.kernel[...] = jnp.asarray(
        init.randn(width, NUM_CLASSES) / np.sqrt(width), jnp.float32)
    # Non-trivial running statistics, as after some training.
    self.bn.mean[...] = jnp.asarray(init.randn(width), jnp.float32)
    self.bn.var[...] = jnp.asarray(init.rand(width) + 0.5, jnp.float32)

  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    return self.out(self.drop(nnx.relu(self.bn(self.hidden(x)))))


class PixelMLP(nn.Module):
  """A tiny deterministic MLP on 8x8 uint8 pixels (scaled inside)."""
  width: int = 16

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # No dropout or batch norm: the same in both modes.
    x = preprocess.scale_pixels(x)  # uint8 pixels -> [0, 1] floats.
    x = nn.relu(nn.Dense(self.width)(x.reshape(x.shape[0], -1)))
    return nn.Dense(NUM_CLASSES)(x)


def assert_trees_equal(a, b):
  """Same structure and bit-identical leaves."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def trees_differ(a, b):
  """Whether any leaf differs in any element."""
  return any(not np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
