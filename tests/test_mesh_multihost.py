"""kdjax.fit under jax.distributed: 2 processes x 4 devices vs 1 x 8.

Runs tests/mesh_multihost_script.py as a localhost cluster (CPU, gloo
collectives) and as one process with 8 virtual devices:

* device-resident data: the same global mesh, the same result;
* a host source whose function returns each process's part of the batch;
* the whole job SIGKILLed after an epoch that was trained but not yet
  checkpointed, then restarted: it resumes from the orbax multi-host
  checkpoint and ends bit-identical to the uninterrupted cluster run.
"""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = pathlib.Path(__file__).with_name("mesh_multihost_script.py")
TIMEOUT_S = 600  # Per phase; a safety net on a shared 2-core machine.
UNSUPPORTED_EXIT = 3
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "grpc_proxy")

pytestmark = pytest.mark.integration


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _env(num_devices: int, **extra) -> dict:
  env = {k: v for k, v in os.environ.items()
         if k != "XLA_FLAGS" and k.lower() not in _PROXY_VARS}
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["KDJAX_PROGRESS"] = "0"
  env["PYTHONPATH"] = os.pathsep.join(
      [str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  env.update(extra)
  return env


def _start(out, which, mode="multi", **extra):
  """Starts the cluster's 2 processes (or the single one)."""
  if mode == "single":
    argvs = [[sys.executable, str(SCRIPT), "single", str(out), which]]
    devices = 8
  else:
    port = _free_port()
    argvs = [[sys.executable, str(SCRIPT), "multi", str(out), str(port),
              str(i), "2", which] for i in range(2)]
    devices = 4
  return [subprocess.Popen(a, env=_env(devices, **extra), cwd=ROOT,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True) for a in argvs]


def _wait(procs, deadline):
  out = []
  try:
    for p in procs:
      try:
        log, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
      except subprocess.TimeoutExpired:
        pytest.fail(f"subprocesses did not finish within {TIMEOUT_S} s: "
                    f"{[p.args for p in procs]}")
      out.append((p.returncode, log))
  finally:
    for p in procs:  # Only ours, by handle.
      if p.poll() is None:
        p.kill()
        p.wait()
  logs = "\n".join(f"--- rc={rc} ---\n{log[-3000:]}" for rc, log in out)
  if any(rc == UNSUPPORTED_EXIT and "KDJAX_UNSUPPORTED:" in log
         for rc, log in out):
    pytest.skip(f"no multi-process CPU collectives in this jax:\n{logs}")
  assert all(rc == 0 for rc, _ in out), logs
  return logs


def _kill_when_stalled(procs, out, deadline):
  """SIGKILLs the whole job once every process parked itself."""
  marks = [out / f"stalled_{i}" for i in range(len(procs))]
  while not all(m.exists() for m in marks):
    if time.monotonic() > deadline or any(p.poll() is not None
                                          for p in procs):
      for p in procs:
        if p.poll() is None:
          p.kill()
      logs = [p.communicate()[0][-3000:] for p in procs]
      pytest.fail(f"the job did not reach the stall point: {logs}")
    time.sleep(0.5)
  for p in procs:
    os.kill(p.pid, signal.SIGKILL)
  for p in procs:
    p.communicate()
    assert p.returncode == -signal.SIGKILL
  for m in marks:
    m.unlink()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  out = tmp_path_factory.mktemp("mesh_multihost")
  deadline = lambda: time.monotonic() + TIMEOUT_S
  # Uninterrupted: the cluster and one process, both data paths.
  _wait(_start(out, "both") + _start(out, "both", "single"), deadline())
  # Killed after epoch 2 was trained (not saved), then restarted.
  killed = out / "killed"
  killed.mkdir()
  _kill_when_stalled(_start(killed, "device",
                            KDJAX_TEST_STALL_AT_EPOCH="2"), killed,
                     deadline())
  saved = sorted(p.name for p in (killed / "device_multi" /
                                  "checkpoints").iterdir())
  _wait(_start(killed, "device"), deadline())
  load = lambda p: dict(np.load(p))
  return {"multi_device": load(out / "multi_device.npz"),
          "single_device": load(out / "single_device.npz"),
          "multi_host": load(out / "multi_host.npz"),
          "single_host": load(out / "single_host.npz"),
          "resumed": load(killed / "multi_device.npz"),
          "saved_before_kill": saved}


def _close(a, b):
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=2e-6, err_msg=k)


def test_two_processes_equal_one_process_with_eight_devices(results):
  _close(results["multi_device"], results["single_device"])


def test_each_process_feeds_its_part_of_host_batches(results):
  _close(results["multi_host"], results["single_host"])


def test_sigkill_of_the_whole_job_then_restart_resumes_bit_identically(
    results):
  assert "1" in results["saved_before_kill"]
  assert "2" not in results["saved_before_kill"]
  resumed, straight = results["resumed"], results["multi_device"]
  assert sorted(resumed) == sorted(straight)
  for k in straight:
    np.testing.assert_array_equal(resumed[k], straight[k], err_msg=k)
