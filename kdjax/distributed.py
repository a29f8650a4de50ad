"""Multi-host (multi-controller) training under ``jax.distributed``.

JAX's multi-host model: **the same Python program runs on every host**
(one process per host, or per GPU), each process drives only its *local*
devices, and a ``jax.Array`` may span the devices of all processes. A jitted
step applied by every process to such global arrays behaves as one program
on all devices: XLA inserts the cross-process collectives (ICI on TPU pods,
NCCL on GPUs, gloo over TCP on CPUs).

kdjax adds no launcher of its own. :func:`kdjax.fit` runs under it as it
is: call :func:`initialize` first, then the same ``fit(...)`` on every
process, with a mesh over all global devices (the default,
:func:`kdjax.mesh.default_mesh`); :mod:`kdjax.mesh` says what each process
must feed. The pieces below are those ``fit`` uses (they live in
:mod:`kdjax.mesh`), for a loop of one's own:

* :func:`initialize`: ``jax.distributed.initialize`` (called first, before
  any other JAX call), with CPU collectives enabled for CPU-only clusters.
* :func:`process_shard`: each process's **contiguous** slice of a host
  dataset or of a global batch.
* :func:`global_batch`: the global, data-sharded ``jax.Array`` batch built
  from each process's local batch (:meth:`kdjax.mesh.Plan.place_batch`);
  the global batch is the concatenation of the processes' local batches in
  process order, so ``global_batch(process_shard(B), mesh)`` is ``B``.
* :func:`replicate` (:func:`kdjax.mesh.replicate`) /
  :func:`replicate_teacher`: the student's state, the rng and the teacher
  placed on every device of the mesh, replicated or sharded by a
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
from jax.sharding import Mesh, PartitionSpec as P

from kdjax import mesh as mesh_lib
from kdjax._types import PyTree
from kdjax.mesh import local_data_shards, process_shard, replicate
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
  plan = mesh_lib.Plan(mesh, (data_axis,))
  n = mesh_lib._leading_size(local_batch, "local_batch")  # pylint: disable=protected-access
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
  if jax.process_count() == 1:
    return jax.device_put(local_batch, plan.batch_sharding())
  return plan.place_batch(local_batch)


def replicate_teacher(teacher: Teacher, mesh: Mesh,
                      specs: PyTree = None) -> Teacher:
  """The teacher's params and state placed on every device of ``mesh``.

  By default every device holds a full copy (``NamedSharding(mesh, P())``),
  the right choice while the teacher fits in one device's memory: its
  forward pass then needs no communication. A teacher too large for that
  can be **sharded** instead: pass ``specs``, a pytree of ``PartitionSpec``
  matching ``(params, state)`` (e.g. ``P(None, 'model')`` for the kernels of
  a mesh with a ``'model'`` axis, or ``P('data')`` for FSDP-style sharding),
  and GSPMD inserts the gathers (:func:`kdjax.fit` does this itself on a
  mesh with an ``"fsdp"`` axis). :func:`kdjax.train.sharded_train_step`
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
