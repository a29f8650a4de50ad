"""The body of tests/test_mesh_multihost.py: kdjax.fit under jax.distributed.

  python tests/mesh_multihost_script.py multi OUT PORT PROCESS_ID NPROC RUN
  python tests/mesh_multihost_script.py single OUT RUN

``multi``: one process of a localhost ``jax.distributed`` cluster (CPU, gloo
collectives); every process calls the same ``kdjax.fit`` with the default
mesh (all global devices). ``single``: one process with all devices local.
``RUN`` is

* ``device``: device-resident data (every process passes the whole set),
  checkpointed in ``OUT/device_<mode>``; with ``KDJAX_TEST_STALL_AT_EPOCH=k``
  the processes stop (sleep) after training epoch ``k`` without saving it,
  write ``OUT/stalled_<id>``, and wait for the test to SIGKILL them;
* ``host``: a host source, a function ``epoch -> batches`` that returns this
  process's rows of each global batch (the documented rule for functions:
  process ``p`` of ``P`` gets the ``p``-th ``1/P`` of every batch);
* ``both``: ``device`` then ``host`` in the same processes.

Process 0 (the single process) writes ``OUT/<mode>_<run>.npz``: the final
params, model state and last-epoch loss.
"""
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import kdjax  # noqa: E402
from kdjax import distributed, mesh as mesh_lib, train  # noqa: E402

N, BATCH, EPOCHS, NUM_CLASSES = 128, 32, 3, 10
UNSUPPORTED_EXIT = 3
UNSUPPORTED_MARKERS = (
    "Multiprocess computations aren't implemented on the CPU backend",
    "Collectives interface is not set", "make_gloo_tcp_collectives")


class Net(nn.Module):
  """Dense -> BatchNorm -> relu -> Dense: global statistics are tested too."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.reshape(x.shape[0], -1).astype(jnp.float32) / 255.0
    x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(
        nn.Dense(32)(x))
    return nn.Dense(NUM_CLASSES, name="logits")(nn.relu(x))


def make_run():
  tnet, net = Net(), Net()
  teacher = kdjax.Teacher.from_linen(
      tnet, tnet.init(jax.random.key(1), jnp.zeros((1, 8, 8))))
  student = kdjax.Student.from_linen(
      net, net.init(jax.random.key(2), jnp.zeros((1, 8, 8))))
  state = train.TrainState.create(student, tx=optax.sgd(0.1, momentum=0.9),
                                  temperature=2.0, alpha=0.5)
  rs = np.random.RandomState(0)
  data = {"image": rs.randint(0, 256, (N, 8, 8)).astype(np.uint8),
          "label": rs.randint(0, NUM_CLASSES, (N,)).astype(np.int32)}
  return teacher, state, data


def host_source(data):
  """``epoch -> batches``: this process's rows of each global batch."""
  p, count = jax.process_index(), jax.process_count()
  local = BATCH // count

  def batches(epoch):
    order = np.random.RandomState(epoch).permutation(N)
    out = []
    for i in range(N // BATCH):
      rows = order[i * BATCH:(i + 1) * BATCH][p * local:(p + 1) * local]
      out.append({k: v[rows] for k, v in data.items()})
    return out
  return batches


def stall_hook(out_dir):
  """An eval_fn that parks the processes after epoch k (not yet saved)."""
  at = int(os.environ.get("KDJAX_TEST_STALL_AT_EPOCH", "0"))
  calls = [0]

  def eval_fn(state):
    del state
    calls[0] += 1
    if calls[0] == at:
      with open(os.path.join(out_dir, f"stalled_{jax.process_index()}"),
                "w") as f:
        f.write("ready to be killed\n")
      while True:
        time.sleep(1)
    return {}
  return eval_fn if at else None


def run(out_dir, mode, which):
  teacher, state, data = make_run()
  kw = dict(epochs=EPOCHS, rng=jax.random.key(0), progress=False)
  if which == "device":
    state, history = kdjax.fit(
        state, teacher, data, batch_size=BATCH,
        workdir=os.path.join(out_dir, f"device_{mode}"),
        eval_fn=stall_hook(out_dir), eval_every=1, **kw)
  else:
    state, history = kdjax.fit(state, teacher, host_source(data),
                               block_steps=2, **kw)
  assert state.params["logits"]["kernel"].sharding.mesh.size == 8
  host = mesh_lib.to_host({"params": state.params,
                           "model_state": state.model_state})
  if jax.process_index() == 0:
    flat = {jax.tree_util.keystr(k): np.asarray(v) for k, v in
            jax.tree_util.tree_flatten_with_path(host)[0]}
    np.savez(os.path.join(out_dir, f"{mode}_{which}.npz"),
             loss=np.asarray(history[-1]["loss"] if history else np.nan),
             **flat)
  print(f"{mode} {which} process {jax.process_index()}: done", flush=True)


def main():
  mode, out_dir = sys.argv[1], sys.argv[2]
  if mode == "multi":
    port, pid, count, which = sys.argv[3:7]
    try:
      distributed.initialize(f"localhost:{port}", int(count), int(pid),
                             initialization_timeout=120)
      mesh = mesh_lib.make_mesh()
      probe = distributed.global_batch(
          {"x": np.ones((jax.local_device_count(),), np.float32)}, mesh)["x"]
      total = float(mesh_lib.to_host(jax.jit(
          jnp.sum, out_shardings=mesh_lib.plan(mesh).replicated())(probe)))
    except Exception as e:  # pylint: disable=broad-except
      if any(m in str(e) or m in repr(e) for m in UNSUPPORTED_MARKERS):
        print(f"KDJAX_UNSUPPORTED: {e!r}", flush=True)
        sys.exit(UNSUPPORTED_EXIT)
      raise
    assert total == jax.device_count() == 8, total
  else:
    assert jax.device_count() == 8 and jax.process_count() == 1
    which = sys.argv[3]
  for one in (("device", "host") if which == "both" else (which,)):
    run(out_dir, mode, one)
  if mode == "multi":
    jax.distributed.shutdown()


if __name__ == "__main__":
  main()
