"""Side effects at the edge: live progress display and metric logs.

* :class:`Progress` is a tqdm bar over optimizer steps that shows steps/s,
  the ETA and the latest loss. It is disabled when ``enabled=False`` or when
  the ``KDJAX_PROGRESS=0`` environment variable is set (CI logs).
* :class:`MetricWriter` appends one JSON object per line to
  ``<workdir>/metrics.jsonl`` and mirrors scalars to TensorBoard when
  ``tensorboardX`` is installed.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from kdjax.checkpoint import write_atomic

__all__ = ["Progress", "MetricWriter"]


def _enabled(flag: Optional[bool]) -> bool:
  if flag is not None:
    return flag
  return os.environ.get("KDJAX_PROGRESS", "1") != "0"


class Progress:
  """A tqdm bar counting optimizer steps (steps/s and ETA come from tqdm)."""

  def __init__(self, total_steps: int, *, desc: str = "train",
               initial: int = 0, enabled: Optional[bool] = None):
    self._bar = tqdm(total=total_steps, initial=initial, desc=desc,
                     unit="step", dynamic_ncols=True, leave=True,
                     disable=not _enabled(enabled), mininterval=0.5)

  def update(self, n: int, metrics: Optional[dict] = None) -> None:
    if metrics:
      post = {}
      for k in ("loss", "accuracy", "agreement"):
        if k in metrics:
          v = np.asarray(metrics[k])
          post[k] = f"{float(v.mean()):.4f}"
      self._bar.set_postfix(post, refresh=False)
    self._bar.update(n)

  def write(self, msg: str) -> None:
    self._bar.write(msg) if not self._bar.disable else print(msg, flush=True)

  def close(self) -> None:
    self._bar.close()


def _to_json(v):
  v = np.asarray(v)
  return v.item() if v.ndim == 0 else v.tolist()


class MetricWriter:
  """Appends metrics to ``metrics.jsonl`` (and TensorBoard if available)."""

  def __init__(self, workdir: str | pathlib.Path, *, tensorboard: bool = True):
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self.path.parent.mkdir(parents=True, exist_ok=True)
    self._tb = None
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # optional
        self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tb"))
      except ImportError:
        self._tb = None

  def drop_after(self, step: int) -> None:
    """Removes the records of steps after ``step`` (and a torn last line).

    A run resumed from the checkpoint at ``step`` runs the epochs after it
    again; without this, ``metrics.jsonl`` would hold those epochs twice.
    The file is rewritten atomically, and only when something is dropped.
    """
    if not self.path.exists():
      return
    lines = self.path.read_text().splitlines()
    keep = []
    for line in lines:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue  # a line torn by a kill mid-write
      if int(record.get("step", 0)) <= step:
        keep.append(line)
    if len(keep) != len(lines):
      write_atomic(self.path, "".join(l + "\n" for l in keep))

  def write(self, step: int, metrics: dict, **fields) -> None:
    record = {"step": int(step), "time": time.time(), **fields,
              **{k: _to_json(v) for k, v in metrics.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    if self._tb is not None:
      for k, v in metrics.items():
        v = np.asarray(v)
        if v.ndim == 0:
          self._tb.add_scalar(k, float(v), int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
