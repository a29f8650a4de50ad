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

__all__ = ["params_sha256", "git_commit", "device_description", "environment"]


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


def environment() -> dict:
  """Versions and device, for a results JSON."""
  import flax
  import optax
  return {"jax_version": jax.__version__, "flax_version": flax.__version__,
          "optax_version": optax.__version__, "device": device_description(),
          "python": platform.python_version()}
