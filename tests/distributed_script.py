"""The body of tests/test_distributed.py, run as one or more subprocesses.

  python tests/distributed_script.py multi OUT_DIR PORT PROCESS_ID NUM_PROCESSES
  python tests/distributed_script.py single OUT_DIR

``multi``: one process of a ``jax.distributed`` cluster on localhost (CPU,
gloo collectives). Every process builds the same synthetic dataset (same
seed), keeps its contiguous shard (``process_shard``), cuts it into local
batches, turns each into a global batch (``global_batch``) and runs
``sharded_train_step`` over a mesh of all global devices with a replicated
teacher. ``single``: one process, all devices local, fed the global batches
that the cluster forms (the concatenation of the processes' ``k``-th local
batches, in process order) through ``kdjax.train.shard_batch``; it also runs
the plain single-device ``jit`` step on the same batches.

Each process writes ``OUT_DIR/<mode>_<process_id>.npz``: the final student
params (flattened, keyed by path) and the per-step losses. If this jax build
cannot run multi-process CPU collectives, it prints ``KDJAX_UNSUPPORTED:``
and exits with status 3.
"""
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from kdjax import distributed, preprocess, train  # noqa: E402
from kdjax.teacher import Teacher  # noqa: E402

NUM_EXAMPLES = 64
NUM_CLASSES = 10
GLOBAL_BATCH = 16
DATA_PROCESSES = 2  # How the dataset is split (the cluster in "multi").
UNSUPPORTED_EXIT = 3
# Errors that mean "this jax build has no multi-process CPU collectives".
UNSUPPORTED_MARKERS = (
    "Multiprocess computations aren't implemented on the CPU backend",
    "Collectives interface is not set",
    "make_gloo_tcp_collectives",
)


class MLP(nn.Module):
  width: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = preprocess.scale_pixels(x)
    x = nn.relu(nn.Dense(self.width)(x.reshape(x.shape[0], -1)))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(NUM_CLASSES)(x)


STUDENT = MLP(16, dropout=0.2)  # Dropout: the rng must agree across hosts.
TEACHER_NET = MLP(32)


def _student_apply(params, x, training, rng):
  return STUDENT.apply({"params": params}, x, train=training,
                       rngs={"dropout": rng})


def make_run():
  """Teacher, fresh student state, base rng and the full host dataset."""
  teacher = Teacher.from_linen(
      TEACHER_NET, TEACHER_NET.init(jax.random.key(1), jnp.zeros((1, 8, 8))))
  params = STUDENT.init(jax.random.key(2), jnp.zeros((1, 8, 8)))["params"]
  state = train.TrainState.create(
      apply_fn=_student_apply, params=params,
      tx=optax.sgd(0.1, momentum=0.9), temperature=3.0, alpha=0.3)
  rs = np.random.RandomState(0)
  data = {"image": rs.randint(0, 256, (NUM_EXAMPLES, 8, 8)).astype(np.uint8),
          "label": rs.randint(0, NUM_CLASSES, (NUM_EXAMPLES,)).astype(np.int32)}
  return teacher, state, jax.random.key(0), data


def local_batches(shard):
  """A process's shard cut into consecutive local batches."""
  local = GLOBAL_BATCH // DATA_PROCESSES
  n = next(iter(shard.values())).shape[0]
  return [{k: v[i:i + local] for k, v in shard.items()}
          for i in range(0, n - local + 1, local)]


def expected_global_batches(data):
  """The global batches the cluster forms: k-th local batches concatenated."""
  per_process = [
      local_batches(distributed.process_shard(
          data, process_index=p, process_count=DATA_PROCESSES))
      for p in range(DATA_PROCESSES)]
  return [{k: np.concatenate([b[k] for b in group]) for k in group[0]}
          for group in zip(*per_process)]


def host(x):
  """Host copy of a (replicated, possibly global) array."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


def save(path, state, losses, **extra):
  flat = {jax.tree_util.keystr(k): host(v) for k, v in
          jax.tree_util.tree_flatten_with_path(state.params)[0]}
  np.savez(path, losses=np.asarray(losses, np.float64),
           step=host(state.step), **{f"param{k}": v for k, v in flat.items()},
           **extra)


def run_multi(out_dir, port, process_id, num_processes):
  try:
    distributed.initialize(f"localhost:{port}", num_processes, process_id,
                           initialization_timeout=120)
    assert jax.process_index() == process_id, jax.process_index()
    assert jax.process_count() == num_processes == DATA_PROCESSES
    print(f"process {process_id}: {jax.local_device_count()} local of "
          f"{jax.device_count()} devices; collectives="
          f"{jax.config.jax_cpu_collectives_implementation}", flush=True)
    mesh = train.data_mesh()
    # A first cross-process collective: fails here if unsupported.
    probe = distributed.global_batch(
        {"x": np.full((jax.local_device_count(),), process_id + 1.0,
                      np.float32)}, mesh)["x"]
    replicated = NamedSharding(mesh, PartitionSpec())
    total = float(host(jax.jit(jnp.sum, out_shardings=replicated)(probe)))
  except Exception as e:  # pylint: disable=broad-except
    if any(m in str(e) or m in repr(e) for m in UNSUPPORTED_MARKERS):
      print(f"KDJAX_UNSUPPORTED: {e!r}", flush=True)
      sys.exit(UNSUPPORTED_EXIT)
    raise
  local = jax.local_device_count()
  assert total == local * sum(range(1, num_processes + 1)), total

  teacher, state, rng, data = make_run()
  expected = expected_global_batches(data)
  teacher = distributed.replicate_teacher(teacher, mesh)
  state = distributed.replicate(state, mesh)
  rng = distributed.replicate(rng, mesh)
  step = train.sharded_train_step(mesh, "kd")
  losses = []
  for k, batch in enumerate(local_batches(distributed.process_shard(data))):
    gbatch = distributed.global_batch(batch, mesh)
    # This process's shards of the global batch are the expected rows.
    for name, arr in gbatch.items():
      assert arr.shape == expected[k][name].shape, (arr.shape, name)
      for shard in arr.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data),
                                      expected[k][name][shard.index])
    state, metrics = step(state, teacher, gbatch, rng)
    losses.append(float(host(metrics["loss"])))
  save(os.path.join(out_dir, f"multi_{process_id}.npz"), state, losses)
  print(f"process {process_id}: done, losses {losses}", flush=True)
  jax.distributed.shutdown()


def run_single(out_dir):
  assert jax.process_count() == 1
  mesh = train.data_mesh()
  batches = expected_global_batches(make_run()[3])
  # The same global batches, sharded over all (local) devices.
  teacher, state, rng, _ = make_run()
  step = train.sharded_train_step(mesh, "kd")
  losses = []
  for batch in batches:
    state, metrics = step(state, teacher, train.shard_batch(batch, mesh), rng)
    losses.append(float(metrics["loss"]))
  save(os.path.join(out_dir, "single_0.npz"), state, losses)
  # And with plain jit on one device.
  teacher, state, rng, _ = make_run()
  step = train.jit_train_step("kd")
  losses = []
  for batch in batches:
    state, metrics = step(state, teacher, batch, rng)
    losses.append(float(metrics["loss"]))
  save(os.path.join(out_dir, "jit_0.npz"), state, losses)
  print(f"single: {jax.device_count()} devices, done", flush=True)


def main():
  mode, out_dir = sys.argv[1], sys.argv[2]
  if mode == "multi":
    run_multi(out_dir, int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
  elif mode == "single":
    run_single(out_dir)
  else:
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
  main()
