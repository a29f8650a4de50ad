"""Helpers shared by the benchmark scripts (imported as ``_common``)."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Optional


def write_results(path: Optional[pathlib.Path], results: dict,
                  prefix: str = "") -> None:
  """Writes ``results`` as indented JSON to ``path`` (nothing if None).

  The file is written beside its final name and renamed into place, so an
  interrupted run never leaves a truncated results JSON behind.
  """
  if path is None:
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(results, indent=2) + "\n")
  os.replace(tmp, path)
  print(f"{prefix}wrote {path}", flush=True)


def compiled_memory(compiled) -> Optional[dict[str, Optional[int]]]:
  """Byte counts from ``compiled.memory_analysis()``, or None if unavailable.

  ``peak_memory_in_bytes`` is the backend's own figure (XLA:CPU's may
  leave out temporaries); ``argument_plus_output_plus_temp_minus_alias`` is
  an upper bound computed from the four sizes (donated outputs alias their
  inputs).
  """
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  fields = ("argument_size_in_bytes", "output_size_in_bytes",
            "alias_size_in_bytes", "temp_size_in_bytes",
            "generated_code_size_in_bytes", "peak_memory_in_bytes")
  out = {f: (int(getattr(m, f)) if getattr(m, f, None) is not None else None)
         for f in fields}
  parts = [out[f] for f in fields[:4]]
  out["argument_plus_output_plus_temp_minus_alias"] = (
      None if None in parts else parts[0] + parts[1] + parts[3] - parts[2])
  return out
