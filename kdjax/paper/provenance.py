"""Where a number came from: parameter hashes, git commit, device, versions.

Every results JSON written by kdjax's experiments and benchmarks records
these, so any rerun can be compared with the committed figures.
"""

from __future__ import annotations

import hashlib
import platform
import subprocess

import jax
import numpy as np

from kdjax._types import PyTree

__all__ = ["params_sha256", "git_commit", "device_description", "cpu_record",
           "schedulable_cores", "environment"]

# The x86 vector extensions XLA:CPU selects its kernels by (LLVM's target
# features): a different set may give different float rounding, so results
# are bit-identical only between CPUs with the same set (and versions).
VECTOR_EXTENSIONS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f",
                     "avx512dq", "avx512bw", "avx512vl", "avx512_vnni",
                     "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
                     "amx_int8", "asimd", "sve", "sve2")


def params_sha256(params: PyTree) -> str:
  """SHA-256 of a pytree's leaves (shapes, dtypes and bytes, in tree order).

  Two runs with bit-identical parameters have equal hashes; any difference
  in a single bit changes it.
  """
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    a = np.asarray(jax.device_get(leaf))
    h.update(jax.tree_util.keystr(path).encode())
    h.update(str(a.shape).encode() + str(a.dtype).encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def git_commit(cwd: str | None = None) -> str | None:
  """The current git commit (with a ``-dirty`` suffix), or None."""
  try:
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, check=True,
                         capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
        check=True, capture_output=True, text=True).stdout.strip()
    return sha + ("-dirty" if dirty else "")
  except (OSError, subprocess.CalledProcessError):
    return None


def device_description() -> str:
  """The devices in one line, e.g. ``'gpu: 1 x NVIDIA H100'``.

  On the CPU: ``'cpu: 8 x cpu (x86_64, 2 host cores)'``.
  """
  import os
  devs = jax.devices()
  kind = devs[0].device_kind
  extra = ""
  if devs[0].platform == "cpu":
    extra = f" ({platform.machine()}, {os.cpu_count()} host cores)"
  return f"{devs[0].platform}: {len(devs)} x {kind}{extra}"


def cpu_record(cpuinfo: str | None = None) -> dict:
  """The host CPU's model and vector extensions, from ``/proc/cpuinfo``.

  ``{"model": "AMD EPYC", "vector_extensions": ["avx", "avx2", ...]}``: the
  model name and those of ``VECTOR_EXTENSIONS`` among the first
  processor's flags (x86) or features (ARM), in that tuple's order. Where
  ``/proc/cpuinfo`` cannot be read (not Linux), both are None: an unknown
  kind, never equal to a known one. ``cpuinfo`` is the file's text (tests).
  """
  if cpuinfo is None:
    try:
      with open("/proc/cpuinfo", encoding="utf-8") as f:
        cpuinfo = f.read()
    except OSError:
      return {"model": platform.processor() or None,
              "vector_extensions": None}
  fields = {}
  for line in cpuinfo.splitlines():
    key, sep, value = line.partition(":")
    key = key.strip()
    if sep and key not in fields:
      fields[key] = value.strip()
  model = fields.get("model name") or fields.get("CPU part")
  flags = set((fields.get("flags") or fields.get("Features") or "").split())
  return {"model": model,
          "vector_extensions": [x for x in VECTOR_EXTENSIONS if x in flags]}


def schedulable_cores() -> int | None:
  """The cores this process may run on (its affinity), else the CPU count.

  XLA:CPU sizes its thread pool by it, and the pool's size changes how
  work, and so float sums, are split: the demo's student trained on one
  core of two (``taskset -c 0``) ends with other bits than on both.
  """
  import os
  try:
    return len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    return os.cpu_count()


def environment() -> dict:
  """Versions, device and host CPU, for a results JSON.

  ``cpu`` is :func:`cpu_record` plus ``schedulable_cores``
  (:func:`schedulable_cores`). XLA:CPU's code, hence its float rounding,
  depends on the CPU's vector extensions and its thread count, so two runs
  are expected to be bit-identical only when ``cpu`` (but its model name)
  and the versions are equal.
  """
  import flax
  import optax
  return {"jax_version": jax.__version__, "flax_version": flax.__version__,
          "optax_version": optax.__version__, "device": device_description(),
          "python": platform.python_version(),
          "cpu": {**cpu_record(), "schedulable_cores": schedulable_cores()}}
