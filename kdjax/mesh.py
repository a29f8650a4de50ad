"""Where :func:`kdjax.fit` puts things on a device mesh: data, FSDP, hosts.

A :class:`jax.sharding.Mesh` names its axes; kdjax reads two of them:

* ``"data"``: the batch's leading axis is split over it (data parallel).
  Every device computes its rows; the step's sums (the weighted loss, the
  accuracy and agreement, the gradients, the BatchNorm statistics) are sums
  over the **global** batch, because the step is one ``jax.jit`` program
  over global arrays and GSPMD turns each sum into a local sum plus an
  all-reduce. So ``batch_size`` is the global batch and the result is one
  device's to float32 rounding (the all-reduce adds in another order).
* ``"fsdp"``: fully sharded data parallel (ZeRO-3). The batch is split over
  it too (it is a data axis), and in addition the student's params, its
  optimizer state and the frozen teacher's params are sharded over it
  (:meth:`Plan.state_shardings`: each leaf's largest dimension that the
  ``fsdp`` size divides; leaves under ``fsdp_min_size`` elements and leaves
  with no such dimension stay replicated). GSPMD all-gathers a layer's
  weights where it is used and reduce-scatters the gradients, so a device
  holds about ``1/fsdp`` of the parameter bytes.

Combining them: ``make_mesh(data=D, fsdp=F)`` lays ``D * F`` devices out as
a ``[D, F]`` grid; the batch is split ``D * F`` ways (``batch_size`` must be
a multiple of ``D * F``), the params ``F`` ways and replicated ``D`` times.
Pick ``F`` as small as lets the model fit (its all-gathers run every step),
and put it on the faster interconnect: the ``fsdp`` axis is the mesh's
last, so its devices are consecutive in ``jax.devices()`` (one host's
devices on a multi-host slice). ``fsdp=-1`` puts every device on it.

A mesh may carry more axes (a ``"model"`` axis for tensor parallelism of a
user's own layers): kdjax replicates over them unless told otherwise.

Several hosts (``jax.distributed``, :func:`kdjax.distributed.initialize`):
the mesh spans every process's devices (``jax.devices()`` is ordered by
process), and every process runs the same ``fit`` call. Then

* device-resident data (a dict of arrays) is given in full to every
  process, with the same values; each process copies only the rows its own
  devices hold (:meth:`Plan.place_data`);
* a host source yields, on process ``p`` of ``P``, that process's part of
  each global batch: ``batch_size / P`` rows, the ``p``-th ``1/P`` of the
  global batch (the global batch is the processes' local batches
  concatenated in process order, :meth:`Plan.place_batch`). For grain, take
  the process's records before batching (``ds[p::P].batch(B // P)`` on a
  ``MapDataset``, ``grain.sharding.ShardByJaxProcess()`` for a
  ``DataLoader``); a function ``epoch -> batches`` must return process
  ``p``'s batches.

With one device (:attr:`Plan.trivial`) nothing here does anything, and
:func:`kdjax.fit` is exactly what it is without a mesh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Iterator, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kdjax._types import PyTree

__all__ = ["DATA", "FSDP", "default_mesh", "make_mesh", "Plan", "plan",
           "use_default_mesh", "replicate", "process_shard",
           "local_data_shards", "to_host", "is_primary"]

DATA = "data"
FSDP = "fsdp"
BATCH_AXES = (DATA, FSDP)
# Leaves with fewer elements than this stay replicated under FSDP: biases
# and norm scales are cheap to copy and costly to gather one by one.
FSDP_MIN_SIZE = 1024

_DEFAULT: list = []  # The mesh set by use_default_mesh (a stack).


def make_mesh(*, data: int = -1, fsdp: int = 1,
              devices: Optional[Sequence] = None) -> Mesh:
  """A ``[data, fsdp]`` mesh over ``devices`` (default: every global device).

  ``-1`` takes the devices the other axis leaves (``fsdp=-1`` with the
  default ``data=-1``: every device on ``fsdp``). ``make_mesh()`` is data
  parallel over all devices, ``make_mesh(fsdp=-1)`` FSDP over all of them,
  ``make_mesh(data=2, fsdp=4)`` both (see the module docstring).

  Raises:
    ValueError: sizes that do not multiply to the number of devices.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if data == -1 and fsdp == -1:
    data = 1  # make_mesh(fsdp=-1): every device on fsdp.
  if data == -1 or fsdp == -1:
    known = fsdp if data == -1 else data
    if known < 1 or n % known:
      raise ValueError(f"make_mesh: {n} devices cannot be split into "
                       f"{'fsdp' if data == -1 else 'data'}={known} groups.")
    data, fsdp = (n // known, known) if data == -1 else (known, n // known)
  if data < 1 or fsdp < 1 or data * fsdp != n:
    raise ValueError(f"make_mesh: data={data} x fsdp={fsdp} must equal the "
                     f"number of devices ({n}).")
  return Mesh(np.asarray(devices, dtype=object).reshape(data, fsdp),
              BATCH_AXES)


def default_mesh() -> Mesh:
  """The mesh :func:`kdjax.fit` uses when given none.

  Every global device (``jax.devices()``: all processes' devices, in
  process order) on the ``"data"`` axis, ``fsdp=1``. Why this one: data
  parallelism asks nothing of the model (no dimension has to divide
  anything, any Flax/NNX model works), costs one all-reduce of the
  gradients per step, keeps every device's memory what one device needs
  today (params replicated), and gives one device's result to float32
  rounding; so it is the only layout that is safe to choose for a user who
  did not ask. Sharding the params (``fsdp``) trades step time for memory,
  which only the user can judge. On one device this mesh is trivial and
  ``fit`` is unchanged. :func:`use_default_mesh` replaces it for a block
  of code.
  """
  if _DEFAULT:
    return _DEFAULT[-1]
  return make_mesh()


@contextlib.contextmanager
def use_default_mesh(mesh: Mesh) -> Iterator[Mesh]:
  """Within the block, :func:`default_mesh` (fit's ``mesh=None``) is ``mesh``.

  E.g. ``with use_default_mesh(make_mesh(devices=jax.devices()[:1])):``
  keeps code written for one device on one device (the test suite does
  this, as it runs with 8 virtual devices).
  """
  _DEFAULT.append(mesh)
  try:
    yield mesh
  finally:
    _DEFAULT.pop()


def is_primary() -> bool:
  """Whether this process writes the run's files (process 0)."""
  return jax.process_index() == 0


def _shape_of(x) -> tuple[int, ...]:
  return tuple(np.shape(x))


def _is_key(x) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype,
                                                     jax.dtypes.prng_key)


@dataclasses.dataclass(frozen=True)
class Plan:
  """How :func:`kdjax.fit` lays a run out on ``mesh`` (hashable: a cache key).

  Attributes:
    mesh: the device mesh.
    batch_axes: the mesh axes the batch's leading axis is split over (those
      of ``"data"`` and ``"fsdp"`` that the mesh has).
    fsdp_min_size: leaves with fewer elements stay replicated under FSDP.
  """
  mesh: Mesh
  batch_axes: tuple[str, ...]
  fsdp_min_size: int = FSDP_MIN_SIZE

  @property
  def data_size(self) -> int:
    """Into how many parts the global batch is split."""
    return math.prod(self.mesh.shape[a] for a in self.batch_axes)

  @property
  def fsdp_size(self) -> int:
    return self.mesh.shape.get(FSDP, 1)

  @property
  def trivial(self) -> bool:
    """One device: nothing is placed or constrained; fit is as without one."""
    return self.mesh.size == 1

  def describe(self) -> dict:
    """The mesh's axis sizes (``{'data': 8, 'fsdp': 1}``), for logs.

    ``fit.json`` does not record the mesh, so a resume on another mesh is
    not refused (orbax restores into the placed state's layout; untested
    across meshes, and bit-identical resumes are tested on the same mesh
    only).
    """
    return {str(k): int(v) for k, v in self.mesh.shape.items()}

  def check_batch_size(self, batch_size: int, what: str = "batch_size"
                       ) -> None:
    """Refuses a global batch the batch axes do not split evenly.

    Raises:
      ValueError: naming the batch size, the axes' sizes and the nearest
        sizes that work.
    """
    n = self.data_size
    if batch_size % n:
      lo, hi = (batch_size // n) * n, (batch_size // n + 1) * n
      sizes = " x ".join(f"{a}={self.mesh.shape[a]}" for a in self.batch_axes)
      raise ValueError(
          f"{what}={batch_size} is the global batch and must be a multiple "
          f"of the mesh's batch axes ({sizes} = {n} devices): use "
          f"{' or '.join(str(s) for s in (lo, hi) if s > 0)}, or pass "
          "mesh= with fewer devices on those axes (e.g. "
          "mesh=kdjax.mesh.make_mesh(devices=jax.devices()[:1])).")

  # -- shardings ------------------------------------------------------------

  def _batch_entry(self):
    axes = self.batch_axes
    return axes if len(axes) > 1 else axes[0]

  def batch_spec(self, lead: int = 0) -> P:
    """``P(batch_axes)`` after ``lead`` unsplit axes (a block's step axis)."""
    return P(*([None] * lead), self._batch_entry())

  def batch_sharding(self, lead: int = 0) -> NamedSharding:
    return NamedSharding(self.mesh, self.batch_spec(lead))

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  def leaf_spec(self, shape: Sequence[int], lead: int = 0) -> P:
    """The FSDP rule for one leaf of ``shape`` (its first ``lead`` axes kept).

    The largest dimension (the first of equals) that the ``fsdp`` size
    divides is split over ``"fsdp"``; a leaf of fewer than
    ``fsdp_min_size`` elements, or with no such dimension, is replicated.
    Without an ``fsdp`` axis (or of size 1) every leaf is replicated.
    """
    f = self.fsdp_size
    shape = tuple(shape)
    if f == 1 or math.prod(shape[lead:]) < self.fsdp_min_size:
      return P()
    best = None
    for i in range(lead, len(shape)):
      if shape[i] % f == 0 and (best is None or shape[i] > shape[best]):
        best = i
    if best is None:
      return P()
    return P(*([None] * best), FSDP)

  def state_shardings(self, tree: PyTree, lead: int = 0) -> PyTree:
    """A ``NamedSharding`` per leaf of ``tree`` by :meth:`leaf_spec`.

    Used for the student's state (params and optimizer state alike: the
    optimizer's moments have the params' shapes, so they are split the
    same way; counters are small and stay replicated) and the teacher.
    ``lead=1`` for a stacked sweep state (its member axis is not split).
    """
    return jax.tree.map(
        lambda x: NamedSharding(self.mesh, P() if _is_key(x) else
                                self.leaf_spec(_shape_of(x), lead)), tree)

  # -- inside jit -----------------------------------------------------------

  def constrain_batch(self, batch: PyTree, lead: int = 0) -> PyTree:
    """Inside ``jit``: the batch split along its leading axis (after ``lead``).

    A batch gathered inside the program (``jnp.take`` of device-resident
    data) would otherwise be laid out as XLA likes, replicated at worst:
    every device would then compute the whole batch.
    """
    if self.trivial:
      return batch
    return jax.lax.with_sharding_constraint(batch, self.batch_sharding(lead))

  def constrain_state(self, tree: PyTree, lead: int = 0) -> PyTree:
    """Inside ``jit``: ``tree`` in the layout of :meth:`state_shardings`.

    Applied to the state a compiled epoch returns, so that the FSDP layout
    is kept from one epoch to the next (and the donated input buffers are
    reused) instead of whatever layout XLA's propagation picks.
    """
    if self.trivial:
      return tree
    return jax.lax.with_sharding_constraint(
        tree, self.state_shardings(tree, lead))

  # -- placing host values --------------------------------------------------

  def place(self, tree: PyTree, shardings: PyTree = None, *,
            copy: bool = False) -> PyTree:
    """``tree``'s arrays as global arrays in ``shardings`` (default replicated).

    Multi-process safe: every process passes the same values and builds
    only the shards its own devices hold (``jax.make_array_from_callback``),
    with no cross-process traffic. Arrays already global are resharded by a
    compiled identity. Typed PRNG keys are placed through their key data.
    Static fields (``apply_fn``, ``tx``) are kept. ``copy``: never share a
    buffer with ``tree`` (for a state that will be donated).
    """
    if shardings is None:
      shardings = jax.tree.map(lambda _: self.replicated(), tree)
    return jax.tree.map(lambda x, s: _put(x, s, copy), tree, shardings)

  def place_state(self, tree: PyTree, lead: int = 0) -> PyTree:
    """The student's state (or the teacher): the FSDP rule, new buffers."""
    if self.trivial:
      return tree
    return self.place(tree, self.state_shardings(tree, lead), copy=True)

  def place_data(self, data: PyTree) -> PyTree:
    """Device-resident data, placed once: a full copy on every device.

    Why replicated and not split along the examples: the epoch draws a
    global permutation (so that the data order is one device's), and the
    rows of a batch then lie on every device. With the data split, XLA
    gathers each batch as a masked local gather plus an all-reduce of the
    whole global batch, every step (measured in the compiled HLO of the
    MNIST MLP epoch on 8 devices: a ``u8[256,784]`` all-reduce per step);
    replicated, each device gathers its own rows of the batch
    (:meth:`constrain_batch`) with no communication at all. The cost is
    memory: each device holds the data, as the one device did before. Data
    larger than one device's memory streams from the host instead (a host
    source: each batch goes straight to its shards). Every process passes
    the same arrays.
    """
    if self.trivial:
      return jax.device_put(data)
    return self.place(data)

  def place_teacher(self, teacher):
    """The frozen teacher, by the FSDP rule (replicated without ``fsdp``).

    It is never donated, so its buffers are not copied where not needed.
    """
    if self.trivial or teacher is None:
      return teacher
    return self.place(teacher, self.state_shardings(teacher))

  def place_rng(self, rng: jax.Array) -> jax.Array:
    """The run's key, replicated (a global array under several processes)."""
    return rng if self.trivial else self.place(rng)

  def global_batch_size(self, local_size: int) -> int:
    """The global batch of which this process feeds ``local_size`` rows."""
    if self.trivial or jax.process_count() == 1:
      return local_size
    shards = len(local_data_shards(self.mesh, self.batch_axes))
    if not shards:
      raise ValueError(f"process {jax.process_index()} has no device in the "
                       "mesh; every process of the run must have one.")
    if local_size % shards:
      raise ValueError(
          f"this process's batches hold {local_size} rows, which its "
          f"{shards} devices on the batch axes cannot split evenly; batch "
          f"each process's data by a multiple of {shards}.")
    return local_size * self.data_size // shards

  def local_batch_size(self, global_size: int) -> int:
    """Rows of a global batch that this process feeds (its local batch)."""
    return global_size * len(local_data_shards(self.mesh, self.batch_axes)) \
        // self.data_size

  def place_batch(self, batch: PyTree, lead: int = 0) -> PyTree:
    """This process's rows of a global batch -> the global batch, sharded.

    One process: ``jax.device_put`` into the shards. Several: every process
    passes its own rows (same shapes everywhere), and the global batch is
    the processes' local batches concatenated in process order
    (``jax.make_array_from_process_local_data``; the mesh's devices are in
    process order). ``lead``: axes before the batch axis (a block of steps
    stacked on a leading axis).
    """
    if self.trivial:
      return jax.device_put(batch)
    sharding = self.batch_sharding(lead)
    if jax.process_count() == 1:
      return jax.device_put(batch, sharding)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding,
                                                         np.asarray(x)),
        batch)


def plan(mesh: Optional[Mesh] = None, *,
         fsdp_min_size: int = FSDP_MIN_SIZE) -> Plan:
  """The :class:`Plan` of ``mesh`` (None: :func:`default_mesh`).

  Raises:
    TypeError: ``mesh`` is not a ``jax.sharding.Mesh``.
    ValueError: the mesh has neither a ``"data"`` nor an ``"fsdp"`` axis.
  """
  if mesh is None:
    mesh = default_mesh()
  if not isinstance(mesh, Mesh):
    raise TypeError(f"mesh must be a jax.sharding.Mesh (e.g. "
                    f"kdjax.mesh.make_mesh()), got {type(mesh).__name__}.")
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  if not axes:
    raise ValueError(
        f"the mesh's axes are {tuple(mesh.axis_names)}; fit splits the batch "
        f"over a {DATA!r} axis and shards params over an {FSDP!r} axis, so it "
        "needs at least one of them (kdjax.mesh.make_mesh builds both).")
  return Plan(mesh, axes, int(fsdp_min_size))


def _put(x, sharding: NamedSharding, copy: bool = False):
  """One leaf, from identical host values on every process, to ``sharding``."""
  if not hasattr(x, "shape") and not isinstance(x, (int, float, bool)):
    return x
  if _is_key(x):
    data = _put(jax.random.key_data(x), sharding, copy)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    # Already global (e.g. placed before): reshard inside a program.
    return jax.jit(lambda y: y, out_shardings=sharding)(x)
  host = np.array(x) if copy else np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding,
                                      lambda index: host[index])


def replicate(tree: PyTree, mesh: Mesh, specs: PyTree = None) -> PyTree:
  """Places a pytree on all devices of ``mesh`` (replicated by default).

  kdjax's one ``replicate`` for ``jax.jit`` over a mesh (what :func:`kdjax.fit`
  uses, through :meth:`Plan.place`): global ``jax.Array`` s, multi-process
  safe. (:func:`kdjax.step.replicate` is a different thing: the leading
  device axis ``jax.pmap`` wants.)

  Args:
    tree: the pytree (host or single-device arrays).
    mesh: the device mesh.
    specs: ``None`` (every leaf replicated), one ``PartitionSpec`` for every
      leaf, or a pytree of ``PartitionSpec`` matching ``tree``.
  """
  p = Plan(mesh, tuple(a for a in mesh.axis_names))
  if specs is None:
    specs = P()
  if isinstance(specs, P):
    return p.place(tree, jax.tree.map(lambda _: NamedSharding(mesh, specs),
                                      tree))
  return p.place(tree, jax.tree.map(
      lambda _, s: NamedSharding(mesh, s), tree, specs,
      is_leaf=lambda s: isinstance(s, P)))


def to_host(tree: PyTree) -> PyTree:
  """NumPy values of ``tree``'s arrays, on every process.

  A replicated global array is read from this process's first shard;
  one spread over other processes' devices is all-gathered (every process
  must call this then).
  """
  def one(x):
    if not isinstance(x, jax.Array):
      return x
    if x.is_fully_addressable:
      return np.asarray(jax.device_get(x))
    if x.sharding.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(one, tree)


def _leading_size(tree: PyTree, what: str) -> int:
  leaves = jax.tree.leaves(tree)
  if not leaves:
    raise ValueError(f"{what} has no arrays.")
  sizes = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
  if None in sizes or len(sizes) != 1:
    raise ValueError(f"all arrays of {what} must share a leading (example) "
                     f"axis; got leading sizes "
                     f"{[np.shape(x)[:1] for x in leaves]}.")
  return sizes.pop()


def process_shard(arrays: PyTree, *, process_index: Optional[int] = None,
                  process_count: Optional[int] = None) -> PyTree:
  """This process's contiguous shard of a host dataset or global batch.

  For ``n`` examples and ``P`` processes, process ``i`` gets rows
  ``[i * n / P, (i + 1) * n / P)`` of every array (views, not copies).
  Contiguous, so that the processes' shards of a global batch, fed to
  :meth:`Plan.place_batch`, give that global batch again.

  Raises:
    ValueError: the leading size is not divisible by ``process_count``,
      the arrays' leading sizes differ, or ``process_index`` is out of range.
  """
  if process_count is None:
    process_count = jax.process_count()
  if process_index is None:
    process_index = jax.process_index()
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index must be in [0, {process_count}), got "
                     f"{process_index} (process_count={process_count}).")
  n = _leading_size(arrays, "arrays")
  if n % process_count:
    raise ValueError(
        f"leading size {n} is not divisible by the process count "
        f"{process_count}; drop or pad to a multiple of {process_count}.")
  per = n // process_count
  lo, hi = process_index * per, (process_index + 1) * per
  return jax.tree.map(lambda x: x[lo:hi], arrays)


def local_data_shards(mesh: Mesh, axes=DATA) -> list[int]:
  """The positions along the batch axes that this process's devices hold.

  ``axes``: one axis name or a tuple of them (flattened in order, as
  ``P(axes)`` splits the batch). A batch split over them is cut into
  ``prod(sizes)`` blocks; this process feeds the blocks at these positions
  (sorted). For a mesh over all devices in process order, process ``i``
  with ``L`` local devices holds ``[i L, ..., (i + 1) L - 1]``.
  """
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  for a in axes:
    if a not in mesh.axis_names:
      raise ValueError(f"mesh has no axis {a!r}; its axes are "
                       f"{mesh.axis_names}.")
  order = [mesh.axis_names.index(a) for a in axes]
  rest = [i for i in range(mesh.devices.ndim) if i not in order]
  devices = np.transpose(mesh.devices, order + rest)
  devices = devices.reshape(math.prod(mesh.shape[a] for a in axes), -1)
  me = jax.process_index()
  return [k for k, row in enumerate(devices)
          if any(d.process_index == me for d in row)]
