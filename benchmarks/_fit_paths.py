"""The fit-path section of ``benchmarks/train_step.py`` (issue #12's goals).

Two comparisons, each measured inside one run with interleaved rounds (the
median of per-round ratios is reported, as in the rest of the benchmark):

* **host vs device** (the paper's MLP step at batch 128, kd, cached teacher
  logits): ``kdjax.fit`` on device-resident arrays (one ``lax.scan`` per
  epoch) against ``kdjax.fit`` on a ``grain.MapDataset`` of the same batches
  streamed from the host (prefetch thread, jitted blocks of 16 steps).
  Goal: host >= 0.95 x device.
* **the chosen form** (``kdjax.paper.models.CNN`` at batch 128, hard labels):
  ``fit(loop="scan")``, ``fit(loop="steps")`` and ``fit(loop="auto")``.
  Goal: auto >= 0.9 x the best of the two.

A round of one implementation is one more epoch of its own run (``fit``
continues a run from its state, without recompiling); the steps/s are
``fit``'s own per-epoch figures, compilation excluded (a warm-up epoch
first).
"""

from __future__ import annotations

import statistics
import time

import grain
import jax
import numpy as np
import optax

import kdjax
from kdjax.paper import models


class _Batches:
  """A random-access source of whole batches (grain.MapDataset.source)."""

  def __init__(self, data, batch_size):
    self.data, self.b = data, batch_size

  def __len__(self):
    return len(self.data["label"]) // self.b

  def __getitem__(self, i):
    s = slice(i * self.b, (i + 1) * self.b)
    return {k: v[s] for k, v in self.data.items()}


def _round_robin(runs: dict, repeats: int) -> dict:
  """``{name: [steps/s per round]}``; ``runs[name]()`` trains one epoch."""
  for fn in runs.values():
    fn()  # Warm-up (compiles).
  out = {name: [] for name in runs}
  for _ in range(repeats):
    for name, fn in runs.items():
      out[name].append(fn())
  return out


def _chained(state, teacher, data, **kw):
  """A closure training one more epoch per call; returns its steps/s."""
  box = {"state": state, "epochs": 0}

  def one():
    box["epochs"] += 1
    box["state"], history = kdjax.fit(box["state"], teacher, data,
                                      epochs=box["epochs"], progress=False,
                                      **kw)
    return float(history[-1]["steps_per_s"])

  return one


def _paired(times, a, b):
  return statistics.median(x / y for x, y in zip(times[a], times[b]))


def run(images, labels, *, teacher, batch_size: int, steps: int,
        cnn_steps: int, repeats: int) -> dict:
  """The section's results (see the module docstring)."""
  n = steps * batch_size
  data = {"image": images[:n], "label": labels[:n]}
  cached = kdjax.cache.with_teacher_logits(data, teacher)
  host_cached = {k: np.asarray(v) for k, v in cached.items()}
  student_net = models.paper_student(800)

  def mlp_state():
    return kdjax.TrainState.create(
        kdjax.Student.from_linen(student_net, {"params": models.init_params(
            student_net, jax.random.key(1), (1, 28, 28))}),
        tx=optax.sgd(0.01, momentum=0.9), temperature=20.0, alpha=0.1)

  ds = grain.MapDataset.source(_Batches(host_cached, batch_size))
  rng = jax.random.key(0)
  mlp = _round_robin({
      "device_scan": _chained(mlp_state(), None, cached,
                              batch_size=batch_size, rng=rng, loop="scan"),
      "host_grain": _chained(mlp_state(), None, ds, rng=rng,
                             loop=kdjax.Loop(block_steps=16)),
  }, repeats)

  m = cnn_steps * batch_size
  cnn_data = {"image": images[:m], "label": labels[:m]}
  cnn = models.CNN()

  def cnn_state():
    return kdjax.TrainState.create(
        apply_fn=models.linen_student_apply(cnn),
        params=models.init_params(cnn, jax.random.key(2), (1, 28, 28)),
        tx=optax.sgd(0.01, momentum=0.9))

  chosen = kdjax.fitting.choose_loop(cnn_state(), cnn_data)
  kw = dict(batch_size=batch_size, rng=rng, spec="hard")
  cnn_times = _round_robin({
      form: _chained(cnn_state(), None, cnn_data, loop=form, **kw)
      for form in ("scan", "steps", "auto")}, repeats)
  med = {k: statistics.median(v) for k, v in {**mlp, **cnn_times}.items()}
  best = max(med["scan"], med["steps"])
  return {
      "mlp_kd_cached_batch": batch_size, "mlp_steps_per_epoch": steps,
      "cnn_steps_per_epoch": cnn_steps, "repeats": repeats,
      "steps_per_s": {"mlp_device_scan": med["device_scan"],
                      "mlp_host_grain": med["host_grain"],
                      "cnn_scan": med["scan"], "cnn_steps": med["steps"],
                      "cnn_fit_auto": med["auto"]},
      "rounds_steps_per_s": {"mlp": mlp, "cnn": cnn_times},
      "cnn_auto_chose": chosen,
      "host_vs_device": med["host_grain"] / med["device_scan"],
      "host_vs_device_paired": _paired(mlp, "host_grain", "device_scan"),
      "cnn_auto_vs_best": med["auto"] / best,
      "cnn_steps_vs_scan": med["steps"] / med["scan"],
      "goals": {"host_vs_device_min": 0.95, "cnn_auto_vs_best_min": 0.9},
      "goals_met": {"host_vs_device": med["host_grain"] / med["device_scan"]
                                      >= 0.95,
                    "cnn_auto_vs_best": med["auto"] / best >= 0.9},
      "timestamp": time.time(),
  }
