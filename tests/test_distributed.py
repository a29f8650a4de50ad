"""Tests for kdjax.distributed: multi-host training under jax.distributed.

The main test starts a real two-process ``jax.distributed`` cluster on
localhost (CPU, gloo collectives, 2 virtual devices per process, 4 global
devices) running ``tests/distributed_script.py``: each process loads its
contiguous shard of the same synthetic dataset, builds global batches with
``global_batch`` and trains with ``sharded_train_step`` and a replicated
teacher. One process with 4 local devices (and plain single-device jit),
fed the same global batches, must reach the same parameters.

The unit tests run in the pytest process itself (one process, 8 virtual
devices from the root conftest.py).
"""

import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from kdjax import distributed, train
from kdjax.teacher import Teacher

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = pathlib.Path(__file__).with_name("distributed_script.py")
TIMEOUT_S = 600  # A safety net: ~1.5 min idle, far more on a loaded machine.
NUM_PROCESSES = 2
UNSUPPORTED_EXIT = 3
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "grpc_proxy")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(num_devices: int) -> dict:
  """A clean env: not the 8-device XLA_FLAGS of this pytest process."""
  env = {k: v for k, v in os.environ.items()
         if k != "XLA_FLAGS" and k.lower() not in _PROXY_VARS}
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
      [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  return env


def _run_all(commands):
  """Runs ``(argv, env)`` pairs concurrently; kills them all on timeout.

  Returns a list of ``(returncode, output)``.
  """
  procs = []
  try:
    for argv, env in commands:
      procs.append(subprocess.Popen(
          argv, env=env, cwd=ROOT, stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT, text=True))
    deadline = time.monotonic() + TIMEOUT_S
    results = []
    for p in procs:
      try:
        out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        pytest.fail(f"distributed subprocesses did not finish within "
                    f"{TIMEOUT_S} s (killed): {[c[0] for c in commands]}")
      results.append((p.returncode, out))
    return results
  finally:
    for p in procs:  # Only ours, by handle; no-op for finished ones.
      if p.poll() is None:
        p.kill()
      p.wait()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Runs the two-process cluster and the one-process reference."""
  out = tmp_path_factory.mktemp("distributed")
  port = _free_port()
  multi = [([sys.executable, str(SCRIPT), "multi", str(out), str(port),
             str(i), str(NUM_PROCESSES)], _env(2))
           for i in range(NUM_PROCESSES)]
  single = [([sys.executable, str(SCRIPT), "single", str(out)], _env(4))]
  start = time.monotonic()
  results = _run_all(multi + single)
  elapsed = time.monotonic() - start
  logs = "\n".join(f"--- process {i} (rc={rc}) ---\n{log[-4000:]}"
                   for i, (rc, log) in enumerate(results))
  if any(rc == UNSUPPORTED_EXIT and "KDJAX_UNSUPPORTED:" in log
         for rc, log in results[:NUM_PROCESSES]):
    pytest.skip("multi-process CPU collectives are not supported by this "
                f"jax/jaxlib build:\n{logs}")
  for rc, _ in results:
    assert rc == 0, f"a subprocess failed:\n{logs}"
  print(f"distributed runs took {elapsed:.1f} s")
  return {name: np.load(out / f"{name}.npz") for name in
          [f"multi_{i}" for i in range(NUM_PROCESSES)] + ["single_0", "jit_0"]}


def _params(npz):
  return {k: npz[k] for k in npz.files if k.startswith("param")}


@pytest.mark.integration
def test_two_processes_match_one_process(runs):
  multi = _params(runs["multi_0"])
  assert multi, "no params saved"
  assert int(runs["multi_0"]["step"]) == 4
  # Replicated params are identical on every process.
  for i in range(1, NUM_PROCESSES):
    for k, v in _params(runs[f"multi_{i}"]).items():
      np.testing.assert_array_equal(v, multi[k], err_msg=k)
  # One process, same global batches: 4 local devices, and plain jit.
  for ref in ("single_0", "jit_0"):
    ref_params = _params(runs[ref])
    assert sorted(ref_params) == sorted(multi)
    for k, v in ref_params.items():
      np.testing.assert_allclose(multi[k], v, rtol=0, atol=1e-6,
                                 err_msg=f"{ref} {k}")
    np.testing.assert_allclose(runs["multi_0"]["losses"],
                               runs[ref]["losses"], rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------
# Single-process unit tests (8 virtual devices).
# ----------------------------------------------------------------------------


def _data(n=12):
  return {"image": np.arange(n * 4, dtype=np.float32).reshape(n, 2, 2),
          "label": np.arange(n, dtype=np.int32)}


def test_process_shard_is_contiguous_and_partitions():
  data = _data(12)
  shards = [distributed.process_shard(data, process_index=i, process_count=3)
            for i in range(3)]
  np.testing.assert_array_equal(shards[1]["label"], [4, 5, 6, 7])
  for k in data:
    np.testing.assert_array_equal(
        np.concatenate([s[k] for s in shards]), data[k])
  # Defaults: this (only) process gets everything.
  np.testing.assert_array_equal(distributed.process_shard(data)["label"],
                                data["label"])


def test_process_shard_errors():
  with pytest.raises(ValueError, match="not divisible by the process count"):
    distributed.process_shard(_data(10), process_index=0, process_count=3)
  with pytest.raises(ValueError, match="process_index"):
    distributed.process_shard(_data(12), process_index=3, process_count=3)
  bad = {"image": np.zeros((4, 2)), "label": np.zeros((6,))}
  with pytest.raises(ValueError, match="leading"):
    distributed.process_shard(bad, process_index=0, process_count=2)


def test_global_batch_single_process_equals_shard_batch():
  mesh = train.data_mesh()
  assert distributed.local_data_shards(mesh) == list(range(
      jax.device_count()))
  data = _data(16)
  got = distributed.global_batch(data, mesh)
  want = train.shard_batch(data, mesh)
  for k in data:
    assert got[k].sharding == NamedSharding(mesh, P("data"))
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))
  with pytest.raises(ValueError, match="not divisible"):
    distributed.global_batch(_data(12), mesh)
  with pytest.raises(ValueError, match="no axis"):
    distributed.global_batch(data, mesh, data_axis="batch")


@pytest.mark.integration
def test_replicate_teacher_and_sharded_teacher_step():
  """Replicated teacher, and the sharded-teacher jit from the docstring."""
  mesh = train.data_mesh()
  w = jnp.arange(64 * 10, dtype=jnp.float32).reshape(64, 10) * 1e-4
  teacher = Teacher.from_fn(lambda p, x: x.reshape(x.shape[0], -1) @ p["w"],
                            {"w": w})
  rep = distributed.replicate_teacher(teacher, mesh)
  assert rep.params["w"].sharding == NamedSharding(mesh, P())
  np.testing.assert_array_equal(np.asarray(rep.params["w"]), np.asarray(w))
  sharded = distributed.replicate_teacher(teacher, mesh,
                                          ({"w": P("data")}, {}))
  assert sharded.params["w"].sharding == NamedSharding(mesh, P("data"))

  def student(params, x, training, rng):
    del training, rng
    return x.reshape(x.shape[0], -1) @ params["w"]

  def fresh_state():
    return distributed.replicate(train.TrainState.create(
        apply_fn=student, params={"w": jnp.zeros((64, 10))},
        tx=optax.sgd(0.1), temperature=2.0, alpha=0.5), mesh)

  rng = distributed.replicate(jax.random.key(0), mesh)
  batch = distributed.global_batch(
      {"image": np.random.RandomState(0).rand(16, 8, 8).astype(np.float32),
       "label": np.arange(16, dtype=np.int32) % 10}, mesh)
  repl = NamedSharding(mesh, P())
  step = jax.jit(
      train.make_train_step("kd"),
      in_shardings=(repl, jax.tree.map(lambda x: x.sharding, sharded),
                    NamedSharding(mesh, P("data")), repl),
      out_shardings=(repl, repl), donate_argnums=(0,))
  s_sharded, _ = step(fresh_state(), sharded, batch, rng)
  s_rep, _ = train.sharded_train_step(mesh, "kd")(fresh_state(), rep, batch,
                                                  rng)
  np.testing.assert_allclose(np.asarray(s_sharded.params["w"]),
                             np.asarray(s_rep.params["w"]), atol=1e-6)
