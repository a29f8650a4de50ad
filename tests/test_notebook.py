"""Executes notebooks/colab_tpu.ipynb end to end on CPU (8 virtual devices).

The kernel is this interpreter's own ipykernel (never a kernelspec installed
elsewhere on the machine), started in the repository root with an explicit
environment: the real MNIST IDX files, 8 virtual CPU devices and a short
training run (``KDJAX_NOTEBOOK_STEPS``).
"""
import os
import pathlib
import re
import sys
import time

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
from jupyter_client.kernelspec import KernelSpecManager  # pylint: disable=g-import-not-at-top
from jupyter_client.manager import AsyncKernelManager  # pylint: disable=g-import-not-at-top

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "colab_tpu.ipynb"
STEPS = 150
# Chance is ~9000 errors; a student that learned is far below.
MAX_STUDENT_ERRORS = 2000


def _kernel_manager() -> AsyncKernelManager:
  """A kernel manager that can only start this interpreter's ipykernel.

  With no kernel directories to search, the only kernelspec is ipykernel's
  native ``python3``, whose command line is built from ``sys.executable``
  (``[sys.executable, -m, ipykernel_launcher, -f, ...]``), so the kernel
  runs in the same virtual environment as pytest. Nothing is installed.
  """
  ksm = KernelSpecManager(kernel_dirs=[], ensure_native_kernel=True)
  return AsyncKernelManager(kernel_name="python3", kernel_spec_manager=ksm)


def _stream_text(nb) -> str:
  out = []
  for cell in nb.cells:
    for o in cell.get("outputs", []):
      if o.get("output_type") == "stream":
        out.append(o.get("text", ""))
      elif o.get("output_type") in ("execute_result", "display_data"):
        out.append(o.get("data", {}).get("text/plain", ""))
  return "\n".join(out)


def _errors(text: str, who: str) -> int:
  m = re.search(re.escape(who) + r" test errors: (\d+) / 10000", text)
  assert m, f"no '{who} test errors' line in the notebook's output:\n{text}"
  return int(m.group(1))


@pytest.mark.integration
def test_colab_notebook_runs_on_cpu(mnist_dir):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  env = {**os.environ,
         "KDJAX_DATA_DIR": str(mnist_dir),
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "JAX_PLATFORMS": "cpu",
         "KDJAX_NOTEBOOK_STEPS": str(STEPS),
         "MPLBACKEND": "module://matplotlib_inline.backend_inline"}
  env.pop("KDJAX_REPO", None)
  km = _kernel_manager()
  assert km.kernel_spec.argv[0] == sys.executable, km.kernel_spec.argv
  client = nbclient.NotebookClient(
      nb, km=km, timeout=600,
      resources={"metadata": {"path": str(ROOT)}})
  t0 = time.perf_counter()
  # Any cell error raises CellExecutionError (allow_errors is False).
  client.execute(env=env)
  seconds = time.perf_counter() - t0

  for cell in nb.cells:
    for o in cell.get("outputs", []):
      assert o.get("output_type") != "error", o
  text = _stream_text(nb)
  print(f"notebook ran in {seconds:.0f}s\n{text}")
  assert "8 devices" in text, "the kernel did not see 8 virtual CPU devices"
  assert any("image/png" in o.get("data", {})
             for c in nb.cells for o in c.get("outputs", [])), (
                 "the soft-target figure was not displayed")
  teacher = _errors(text, "teacher")
  pmap = _errors(text, "student (pmap)")
  sharded = _errors(text, "student (sharded jit)")
  assert teacher < MAX_STUDENT_ERRORS
  assert pmap < MAX_STUDENT_ERRORS, pmap
  assert sharded < MAX_STUDENT_ERRORS, sharded
