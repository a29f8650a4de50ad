"""Helpers shared by the benchmark scripts (imported as ``_common``)."""

from __future__ import annotations

from typing import Optional


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
