"""Teacher and student networks for the MNIST experiments (``flax.linen``).

The paper's MNIST nets (Hinton, Vinyals & Dean, 2015, Section 3) are plain
fully-connected ReLU networks on the 784 flattened pixels:

* **teacher**: ``784-1200-1200-10`` trained with dropout (20% on the inputs,
  50% on the hidden units) and a max-norm weight constraint (see
  :mod:`kdjax.paper.constraints`) on jittered images (see
  :mod:`kdjax.paper.augment`);
* **student**: ``784-800-800-10`` with no regularisation, trained either on
  hard labels or distilled from the teacher's soft targets.

Conventions shared by every module here:

* ``__call__(self, x, *, train=False)`` returns **logits** ``[B, num_classes]``;
  dropout is active only when ``train=True`` and then draws from the
  ``'dropout'`` rng collection. ``train`` must be a Python bool (it selects
  the graph), so mark it static when jitting a function that takes it.
* ``uint8`` inputs are raw pixels and are scaled to ``[0, 1]`` float32 by
  ``x / 255``; floating inputs are used as they are (no rescaling); other
  integer/bool inputs are cast to float32 without rescaling.
* The final layer is named ``'logits'`` so a class-bias shift can address
  ``params['logits']['bias']`` directly.

The thin adapters :func:`linen_student_apply` and :func:`linen_teacher_apply`
turn a module into the pure functions the train step expects.
"""

from __future__ import annotations

import pathlib
from typing import Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdjax.preprocess import scale_pixels
from kdjax._types import PyTree

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

__all__ = [
    "MLP",
    "CNN",
    "paper_teacher",
    "paper_student",
    "count_params",
    "init_params",
    "linen_student_apply",
    "linen_teacher_apply",
    "load_shipped_teacher",
    "shipped_teacher_path",
]


def _to_float(x: ArrayLike) -> Array:
  """Pixels to floats: :func:`kdjax.preprocess.scale_pixels` (``uint8 -> x /
  255``), then any other non-float input cast to float32 unscaled."""
  x = scale_pixels(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return x.astype(jnp.float32)
  return x


class MLP(nn.Module):
  r"""Fully-connected ReLU network with optional (input and hidden) dropout.

  With :math:`h_0 = \mathrm{drop}_{p_{in}}(\mathrm{flatten}(x))`, the network
  computes

  .. math::
    h_{l} = \mathrm{drop}_{p_{h}}(\mathrm{relu}(W_l h_{l-1} + b_l)),
    \quad l = 1..L, \qquad z = W_{L+1} h_L + b_{L+1},

  where dropout (inverted: kept units are scaled by :math:`1/(1-p)`) is only
  applied when ``train=True``.

  Parameters are named ``hidden_0 .. hidden_{L-1}`` and ``logits``; the
  parameter count is :math:`\sum_l (n_{l-1} + 1)\, n_l`.

  Attributes:
    hidden: widths of the hidden layers, e.g. ``(1200, 1200)``.
    num_classes: number of output logits.
    input_dropout: dropout rate on the (flattened) inputs.
    hidden_dropout: dropout rate after every hidden ReLU.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from kdjax import models
    >>> net = models.MLP((32,), num_classes=10)
    >>> params = models.init_params(net, jax.random.key(0), (1, 28, 28))
    >>> sorted(params)
    ['hidden_0', 'logits']
    >>> net.apply({'params': params}, jnp.zeros((4, 28, 28))).shape
    (4, 10)
  """

  hidden: Sequence[int]
  num_classes: int = 10
  input_dropout: float = 0.0
  hidden_dropout: float = 0.0

  @nn.compact
  def __call__(self, x: ArrayLike, *, train: bool = False) -> Array:
    """Logits for a batch of images.

    Args:
      x: ``[B, 28, 28]``, ``[B, 28, 28, 1]`` or ``[B, 784]`` (any trailing
        shape: all axes but the leading batch axis are flattened). ``uint8``
        is scaled to ``[0, 1]``; floats are used as given.
      train: enables dropout (needs a ``'dropout'`` rng when a rate is > 0).

    Returns:
      ``[B, num_classes]`` logits.
    """
    x = _to_float(x)
    if x.ndim < 2:
      raise ValueError(
          f"MLP expects a leading batch axis, got an input of shape {x.shape}.")
    x = x.reshape((x.shape[0], -1))
    x = nn.Dropout(rate=self.input_dropout, deterministic=not train)(x)
    for i, width in enumerate(self.hidden):
      x = nn.Dense(width, name=f"hidden_{i}")(x)
      x = nn.relu(x)
      x = nn.Dropout(rate=self.hidden_dropout, deterministic=not train)(x)
    return nn.Dense(self.num_classes, name="logits")(x)


class CNN(nn.Module):
  r"""A small CNN: ``(conv3x3 -> relu -> avgpool2) x 2 -> dense -> logits``.

  ``SAME`` padding, so a ``28 x 28`` input becomes ``7 x 7 x features[-1]``
  before the dense layer. Parameters are named ``conv_0``, ``conv_1``, ...,
  ``dense`` and ``logits``. With the defaults the parameter count is
  :math:`(9\cdot1+1)32 + (9\cdot32+1)64 + (49\cdot64+1)128 + (128+1)10 =
  421{,}642`.

  Attributes:
    num_classes: number of output logits.
    features: output channels of each conv block.
    dense: width of the hidden dense layer.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from kdjax import models
    >>> net = models.CNN()
    >>> params = models.init_params(net, jax.random.key(0), (1, 28, 28))
    >>> net.apply({'params': params}, jnp.zeros((2, 28, 28, 1))).shape
    (2, 10)
  """

  num_classes: int = 10
  features: Sequence[int] = (32, 64)
  dense: int = 128

  @nn.compact
  def __call__(self, x: ArrayLike, *, train: bool = False) -> Array:
    """Logits for a batch of images.

    Args:
      x: ``[B, H, W]`` (a channel axis is added) or ``[B, H, W, C]``;
        ``uint8`` is scaled to ``[0, 1]``.
      train: accepted for interface parity with :class:`MLP`; the CNN has no
        dropout, so it changes nothing.

    Returns:
      ``[B, num_classes]`` logits.
    """
    del train  # No stochastic layers.
    x = _to_float(x)
    if x.ndim == 3:
      x = x[..., None]
    if x.ndim != 4:
      raise ValueError(
          f"CNN expects [B, H, W] or [B, H, W, C] inputs, got shape {x.shape}.")
    for i, feat in enumerate(self.features):
      x = nn.Conv(feat, kernel_size=(3, 3), padding="SAME", name=f"conv_{i}")(x)
      x = nn.relu(x)
      x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2), padding="VALID")
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(self.dense, name="dense")(x))
    return nn.Dense(self.num_classes, name="logits")(x)


def paper_teacher(num_classes: int = 10) -> MLP:
  """The paper's MNIST teacher: ``784-1200-1200-10``, dropout 0.2 / 0.5.

  2,395,210 parameters. Train it with :func:`kdjax.paper.constraints.max_norm`
  (squared norm 15) and :func:`kdjax.paper.augment.jitter` (up to 2 pixels) to
  follow the paper's recipe.
  """
  return MLP((1200, 1200), num_classes=num_classes, input_dropout=0.2,
             hidden_dropout=0.5)


def paper_student(width: int = 800, num_classes: int = 10) -> MLP:
  """The paper's MNIST student: ``784-width-width-10`` with no dropout.

  With the default ``width=800`` it has 1,276,810 parameters.
  """
  return MLP((width, width), num_classes=num_classes)


def count_params(params: PyTree) -> int:
  """Total number of scalar entries in a parameter pytree.

  Example:
    >>> import jax.numpy as jnp
    >>> from kdjax import models
    >>> models.count_params({'a': {'kernel': jnp.zeros((3, 4)),
    ...                            'bias': jnp.zeros(4)}})
    16
  """
  return int(sum(int(np.prod(np.shape(leaf)))
                 for leaf in jax.tree.leaves(params)))


def init_params(module: nn.Module, rng: jax.Array,
                input_shape: Sequence[int]) -> PyTree:
  """Initialises ``module`` on a float32 zero input; returns its ``'params'``.

  Args:
    module: a module following this file's ``__call__(x, *, train)`` convention.
    rng: a PRNG key for the initialisers.
    input_shape: shape of the dummy input, batch axis included, e.g.
      ``(1, *splits.input_shape)`` for :class:`kdjax.paper.data.MnistSplits`
      (``(1, 28, 28)``); no data set is assumed.

  Returns:
    The ``'params'`` pytree (plain nested dicts).
  """
  variables = module.init(rng, jnp.zeros(tuple(input_shape), jnp.float32),
                          train=False)
  return variables["params"]


def linen_student_apply(
    module: nn.Module) -> Callable[..., Array]:
  """Wraps ``module`` as ``apply(params, x, train=False, rng=None) -> logits``.

  The returned function calls
  ``module.apply({'params': params}, x, train=train, rngs={'dropout': rng})``
  (no ``rngs`` when ``rng`` is None, which is fine when ``train=False`` or the
  module has no dropout). ``train`` must be a Python bool.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from kdjax import models
    >>> net = models.MLP((8,), input_dropout=0.5)
    >>> apply = models.linen_student_apply(net)
    >>> p = models.init_params(net, jax.random.key(0), (1, 28, 28))
    >>> apply(p, jnp.ones((2, 784)), True, jax.random.key(1)).shape
    (2, 10)
  """

  def apply(params: PyTree, x: ArrayLike, train: bool = False,
            rng: Optional[jax.Array] = None) -> Array:
    rngs = {} if rng is None else {"dropout": rng}
    return module.apply({"params": params}, x, train=train, rngs=rngs)

  return apply


def linen_teacher_apply(
    module: nn.Module) -> Callable[[PyTree, ArrayLike], Array]:
  """Wraps ``module`` as ``apply(variables, x) -> logits``, always in eval mode.

  Note the asymmetry with :func:`linen_student_apply`: the teacher takes the
  full ``variables`` dict (``{'params': ...}`` plus any other collections),
  and dropout is always off (``train=False``), so its soft targets are
  deterministic.
  """

  def apply(variables: PyTree, x: ArrayLike) -> Array:
    return module.apply(variables, x, train=False)

  return apply


def shipped_teacher_path(name: str = "teacher_cpu") -> pathlib.Path:
  """Where the shipped MNIST teacher ``<name>.msgpack`` is, from any cwd.

  Looked up beside the package (``kdjax/_assets/``, for an installed wheel
  that carries it) and in the repository the package lives in
  (``experiments/mnist/teacher/``, for a checkout or an editable install),
  never relative to the working directory.

  Raises:
    FileNotFoundError: naming every place looked in.
  """
  package = pathlib.Path(__file__).resolve().parents[1]  # kdjax/
  places = [package / "_assets", package.parent / "experiments" / "mnist" /
            "teacher"]
  for place in places:
    path = place / f"{name}.msgpack"
    if path.is_file():
      return path
  raise FileNotFoundError(
      f"shipped teacher {name}.msgpack not found; looked in "
      + ", ".join(str(p) for p in places) + ". It ships with the kdjax "
      "repository (experiments/mnist/teacher/); install kdjax from a "
      "checkout (pip install -e .) or pass the file's path to "
      "kdjax.checkpoint.load_params.")


def load_shipped_teacher(name: str = "teacher_cpu"):
  """The shipped 784-1200-1200-10 MNIST teacher as a :class:`kdjax.Teacher`.

  63 test errors (``experiments/mnist/teacher/teacher_cpu.json``); found by
  :func:`shipped_teacher_path`, so this works from any directory.
  """
  from kdjax import checkpoint  # pylint: disable=g-import-not-at-top
  from kdjax.teacher import Teacher  # pylint: disable=g-import-not-at-top
  net = paper_teacher()
  # Only the structure and shapes are needed: no initialisation is run.
  like = jax.eval_shape(lambda: init_params(net, jax.random.key(0),
                                            (1, 28, 28)))
  params = checkpoint.load_params(shipped_teacher_path(name), like=like)
  return Teacher.from_linen(net, {"params": params})
