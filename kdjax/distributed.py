"""Multi-host (multi-controller) training under ``jax.distributed``.

JAX's multi-host model: **the same Python program runs on every host**
(one process per host, or per GPU), each process drives only its *local*
devices, and a ``jax.Array`` may span the devices of all processes. A jitted
step applied by every process to such global arrays behaves as one program
on all devices: XLA inserts the cross-process collectives (ICI on TPU pods,
NCCL on GPUs, gloo over TCP on CPUs).

kdjax adds no launcher of its own. The pieces:

* :func:`initialize`: ``jax.distributed.initialize`` (called first, before
  any other JAX call), with CPU collectives enabled for CPU-only clusters.
* :func:`process_shard`: each process's **contiguous** slice of a host
  dataset or of a global batch (rows ``[i n/P, (i+1) n/P)`` for process
  ``i`` of ``P``).
* :func:`global_batch`: the global, data-sharded ``jax.Array`` batch built
  from each process's local batch (``jax.make_array_from_process_local_data``).
  With :func:`kdjax.train.data_mesh` the global batch is the concatenation
  of the processes' local batches in process order, so
  ``global_batch(process_shard(B), mesh)`` is ``B`` again.
* :func:`replicate_teacher` / :func:`replicate`: the teacher (and the
  student's :class:`~kdjax.train.TrainState` and the rng) placed on every
  device of the mesh, replicated by default or sharded by a
  ``PartitionSpec`` tree.

The step itself is unchanged: :func:`kdjax.train.sharded_train_step` over a
mesh of all global devices. Under GSPMD the mean over the global batch is a
local mean plus a cross-process all-reduce, so P processes with local batches
``B_1, ..., B_P`` take exactly the step one process takes on their
concatenation (up to the float summation order of the all-reduce)::

  kdjax.distributed.initialize()                 # first JAX call
  mesh = kdjax.train.data_mesh()                 # all global devices
  step = kdjax.train.sharded_train_step(mesh, "kd")
  teacher = kdjax.distributed.replicate_teacher(teacher, mesh)
  state = kdjax.distributed.replicate(state, mesh)
  rng = kdjax.distributed.replicate(jax.random.key(0), mesh)
  local = kdjax.distributed.process_shard(dataset)   # this host's rows
  for local_batch in batches(local, global_bs // jax.process_count()):
    state, metrics = step(state, teacher,
                          kdjax.distributed.global_batch(local_batch, mesh),
                          rng)

Every process must run the same jitted computations in the same order, with
local batches of the same shape, and must hold the same values wherever an
array is replicated (same checkpoint, same seed): this is not checked.
"""

from __future__ import annotations

from typing import Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kdjax._types import PyTree
from kdjax.teacher import Teacher

__all__ = [
    "initialize",
    "process_shard",
    "global_batch",
    "local_data_shards",
    "replicate",
    "replicate_teacher",
]

def initialize(coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *,
               cpu_collectives: Optional[str] = None,
               **kwargs) -> None:
  """Joins this process to the cluster (``jax.distributed.initialize``).

  Must be called on every process before any other JAX call (even
  ``jax.devices()``). With all three arguments ``None`` JAX auto-detects the
  cluster: Cloud TPU pod slices, SLURM, Open MPI (and ``mpi4py`` with
  ``cluster_detection_method='mpi4py'``). Elsewhere pass all three:
  ``coordinator_address='<host of process 0>:<port>'``, the process count and
  this process's id in ``0 .. num_processes - 1``.

  On CPU the cross-process collectives are chosen by the
  ``jax_cpu_collectives_implementation`` option (``'gloo'``: TCP, or
  ``'mpi'``); without one, a multi-process CPU program compiles but cannot
  all-reduce. This wrapper keeps the configured implementation and sets
  ``'gloo'`` when none is configured (jax 0.10 defaults to ``'gloo'``
  already; older releases defaulted to none). The option only affects the
  CPU backend, so it is harmless on TPU and GPU.

  Args:
    coordinator_address: ``host:port`` of process 0's coordinator service.
    num_processes: the number of processes.
    process_id: this process's id.
    cpu_collectives: force an implementation (``'gloo'`` or ``'mpi'``)
      instead of the configured one.
    **kwargs: passed through to ``jax.distributed.initialize`` (e.g.
      ``local_device_ids``, ``cluster_detection_method``,
      ``initialization_timeout``).
  """
  if cpu_collectives is not None:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  elif jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes,
                             process_id=process_id, **kwargs)


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
  ``[i * n / P, (i + 1) * n / P)`` of every array (numpy slices are views,
  not copies). Shards are **contiguous**, not strided, so that
  :func:`global_batch` of the shards of a global batch (concatenation in
  process order) is that global batch again.

  Sharding a whole dataset once and then batching each shard locally gives
  global batches that are the concatenation of the processes' ``k``-th local
  batches; they differ from the ``k``-th batches of the unsharded dataset,
  but they partition the same examples. Shuffle with the same seed on every
  process *before* sharding for an i.i.d. split.

  Args:
    arrays: a pytree (usually a dict like ``{'image': ..., 'label': ...}``)
      of arrays sharing a leading example axis.
    process_index: the shard to take (default ``jax.process_index()``).
    process_count: the number of shards (default ``jax.process_count()``).

  Returns:
    The same pytree with every array sliced along its leading axis.

  Raises:
    ValueError: if the leading size is not divisible by ``process_count``,
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


def local_data_shards(mesh: Mesh, data_axis: str = "data") -> list[int]:
  """The positions along ``data_axis`` that this process's devices hold.

  A batch sharded ``P(data_axis)`` is split into ``mesh.shape[data_axis]``
  equal blocks; this process feeds the blocks at these positions (sorted),
  each to all of its devices at that position (replicas along other mesh
  axes). For the 1-D :func:`kdjax.train.data_mesh` this is one position per
  local device, ``[i L, ..., (i + 1) L - 1]`` for process ``i`` with ``L``
  local devices.
  """
  if data_axis not in mesh.axis_names:
    raise ValueError(f"mesh has no axis {data_axis!r}; its axes are "
                     f"{mesh.axis_names}.")
  devices = np.moveaxis(mesh.devices, mesh.axis_names.index(data_axis), 0)
  devices = devices.reshape(devices.shape[0], -1)
  me = jax.process_index()
  return [k for k, row in enumerate(devices)
          if any(d.process_index == me for d in row)]


def global_batch(local_batch: PyTree, mesh: Mesh,
                 data_axis: str = "data") -> PyTree:
  """A global batch sharded along ``data_axis`` from this process's rows.

  Every process calls this with its own local batch (same shapes on every
  process). The result is a global ``jax.Array`` per leaf, sharded
  ``NamedSharding(mesh, P(data_axis))``, of leading size
  ``local_size * mesh.shape[data_axis] / len(local_data_shards(mesh))``
  (``local_size * process_count`` for a 1-D mesh over all devices). The
  local batch is split into equal blocks, in order, one per position in
  :func:`local_data_shards`; with :func:`kdjax.train.data_mesh`
  (``jax.devices()`` is ordered by process) the global batch is therefore
  the concatenation of the processes' local batches in process order.

  Single-process, this equals ``kdjax.train.shard_batch(local_batch, mesh)``.

  Args:
    local_batch: a pytree of host arrays (numpy) sharing a leading axis.
    mesh: the device mesh (usually over all global devices).
    data_axis: the mesh axis the batch is split over.

  Returns:
    The pytree of global arrays, ready for
    :func:`kdjax.train.sharded_train_step`.

  Raises:
    ValueError: if this process holds no position along ``data_axis``, or the
      local batch size is not divisible by the number of positions it holds
      (its local device count, for a 1-D data mesh).
  """
  n = _leading_size(local_batch, "local_batch")
  shards = local_data_shards(mesh, data_axis)
  if not shards:
    raise ValueError(f"process {jax.process_index()} has no device in the "
                     f"mesh; it cannot feed a batch sharded over "
                     f"{data_axis!r}.")
  if n % len(shards):
    raise ValueError(
        f"local batch size {n} is not divisible by this process's "
        f"{len(shards)} shards along {data_axis!r} (its local device count "
        f"on a 1-D data mesh); use a multiple of {len(shards)}.")
  sharding = NamedSharding(mesh, P(data_axis))
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding,
                                                       np.asarray(x)),
      local_batch)


def _put(x, sharding: NamedSharding):
  """One leaf, from identical host values on every process, to ``sharding``."""
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key):
    data = _put(jax.random.key_data(x), sharding)
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    # Already global (e.g. a previous replicate): reshard inside a program.
    return jax.jit(lambda y: y, out_shardings=sharding)(x)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding,
                                      lambda index: host[index])


def replicate(tree: PyTree, mesh: Mesh, specs: PyTree = None) -> PyTree:
  """Places a pytree on all devices of ``mesh`` (replicated by default).

  Each process builds only its addressable shards from its own host copy
  (``jax.make_array_from_callback``), with no cross-process traffic; every
  process must pass the same values. Use it for the student's
  :class:`~kdjax.train.TrainState` and the rng key before the first step of
  :func:`kdjax.train.sharded_train_step` (whose replicated in-shardings span
  devices of other processes, which arrays committed to one local device
  cannot be moved to). Typed PRNG keys are supported. Static (non-pytree)
  fields such as ``apply_fn`` are untouched.

  Args:
    tree: the pytree (host or single-device arrays).
    mesh: the device mesh.
    specs: ``None`` (every leaf replicated, ``P()``), one ``PartitionSpec``
      for every leaf, or a pytree of ``PartitionSpec`` matching ``tree``.

  Returns:
    The pytree of global arrays.
  """
  if specs is None:
    specs = P()
  if isinstance(specs, P):
    return jax.tree.map(lambda x: _put(x, NamedSharding(mesh, specs)), tree)
  return jax.tree.map(lambda x, s: _put(x, NamedSharding(mesh, s)), tree,
                      specs, is_leaf=lambda s: isinstance(s, P))


def replicate_teacher(teacher: Teacher, mesh: Mesh,
                      specs: PyTree = None) -> Teacher:
  """The teacher's params and state placed on every device of ``mesh``.

  By default every device holds a full copy (``NamedSharding(mesh, P())``),
  the right choice while the teacher fits in one device's memory: its
  forward pass then needs no communication. A teacher too large for that
  can be **sharded** instead: pass ``specs``, a pytree of ``PartitionSpec``
  matching ``(params, state)`` (e.g. ``P(None, 'model')`` for the kernels of
  a mesh with a ``'model'`` axis, or ``P('data')`` for FSDP-style sharding),
  and GSPMD inserts the gathers. :func:`kdjax.train.sharded_train_step`
  declares the teacher replicated (``jax.jit`` refuses an argument committed
  to another sharding), so a sharded teacher needs its own jit of the same
  step, with the teacher's in-sharding taken from the placed arrays::

    teacher = replicate_teacher(teacher, mesh, specs)
    rep = NamedSharding(mesh, P())
    step = jax.jit(
        kdjax.train.make_train_step("kd"),
        in_shardings=(rep, jax.tree.map(lambda x: x.sharding, teacher),
                      NamedSharding(mesh, P("data")), rep),
        out_shardings=(rep, rep), donate_argnums=(0,))

  Each process still needs the full teacher in host memory here; for a
  teacher too large for that, restore it directly into its sharding (e.g.
  orbax ``restore`` with target shardings) instead.

  Args:
    teacher: a :class:`~kdjax.teacher.Teacher` (``apply_fn`` is static and
      kept as is).
    mesh: the device mesh.
    specs: ``None`` (replicated), one ``PartitionSpec`` for every leaf, or a
      pytree of ``PartitionSpec`` matching ``(teacher.params,
      teacher.state)``.

  Returns:
    The same teacher with global arrays.
  """
  if specs is None or isinstance(specs, P):
    params, state = replicate((teacher.params, teacher.state), mesh, specs)
  else:
    param_specs, state_specs = specs
    params = replicate(teacher.params, mesh, param_specs)
    state = replicate(teacher.state, mesh, state_specs)
  return teacher.replace(params=params, state=state)
