"""Micro-benchmark: ``kdjax.losses.kd_objective`` against plain optax.

Times the jitted batch-mean of :func:`kdjax.losses.kd_objective` and its
``value_and_grad`` w.r.t. the student logits, against the same objective
written directly with optax primitives::

  alpha * optax.losses.softmax_cross_entropy_with_integer_labels(s, y)
  + (1 - alpha) * T**2 * optax.losses.kl_divergence_with_log_targets(
      jax.nn.log_softmax(s / T), jax.nn.log_softmax(t / T))

(batch mean), on float32 logits of shape ``[4096, 10]`` (MNIST-like) and
``[256, 32000]`` (LM-vocabulary-like), with ``T = 4`` and ``alpha = 0.1``.

Goal: kdjax takes at most 1.05x the optax version's time (forward and
value_and_grad) and needs no extra peak memory, i.e. the NaN-safety of the
masked/-inf paths and the accurate large-T formulation are (nearly) free.

Method: both functions are compiled ahead of time (``jit(...).lower().
compile()``); each timing round runs a calibrated number of back-to-back
calls and blocks on the last result. Rounds of the two implementations are
interleaved in an A B B A pattern so that machine noise (this may run on a
shared machine) hits both equally; the reported numbers are medians over
rounds, in microseconds per call. Memory figures come from the compiled
executables' ``memory_analysis()`` (``None`` where the backend has none).

Usage::

  python benchmarks/losses.py [--json PATH] [--repeats N]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import statistics
import sys
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from kdjax import losses  # pylint: disable=g-import-not-at-top
from kdjax.paper import provenance
from _common import compiled_memory, write_results  # benchmarks/ is sys.path[0]

TEMPERATURE = 4.0
ALPHA = 0.1
SHAPES = ((4096, 10), (256, 32000))
GOAL_RATIO = 1.05


def kdjax_objective(s, t, y):
  return jnp.mean(
      losses.kd_objective(s, t, y, temperature=TEMPERATURE, alpha=ALPHA))


def optax_objective(s, t, y):
  hard = optax.losses.softmax_cross_entropy_with_integer_labels(s, y)
  soft = optax.losses.kl_divergence_with_log_targets(
      jax.nn.log_softmax(s / TEMPERATURE), jax.nn.log_softmax(t / TEMPERATURE))
  return jnp.mean(ALPHA * hard + (1.0 - ALPHA) * TEMPERATURE**2 * soft)


IMPLS = {"kdjax": kdjax_objective, "optax": optax_objective}


def _block(x):
  jax.tree_util.tree_map(lambda a: a.block_until_ready(), x)
  return x


def _calibrate(fn: Callable[[], Any], target_s: float) -> int:
  """Number of back-to-back calls that take about ``target_s`` seconds."""
  _block(fn())
  n = 1
  while True:
    t0 = time.perf_counter()
    for _ in range(n):
      out = fn()
    _block(out)
    dt = time.perf_counter() - t0
    if dt >= target_s or n >= 1 << 16:
      return max(1, int(round(n * target_s / max(dt, 1e-9))))
    n *= 2


def _round(fn: Callable[[], Any], n: int) -> float:
  """Seconds per call over ``n`` back-to-back calls."""
  t0 = time.perf_counter()
  for _ in range(n):
    out = fn()
  _block(out)
  return (time.perf_counter() - t0) / n


def _interleaved(fns: dict[str, Callable[[], Any]], repeats: int,
                 target_s: float) -> dict[str, list[float]]:
  """Times ``fns`` in interleaved A B B A ... rounds; seconds per call."""
  names = list(fns)
  calls = {k: _calibrate(f, target_s) for k, f in fns.items()}
  n = min(calls.values())  # Same number of calls per round for both.
  for k in names:  # Warm-up rounds, discarded.
    _round(fns[k], n)
  times = {k: [] for k in names}
  for r in range(repeats):
    order = names if r % 2 == 0 else names[::-1]
    for k in order:
      times[k].append(_round(fns[k], n))
  return times


def bench_shape(shape: tuple[int, int], repeats: int,
                target_s: float) -> dict[str, Any]:
  """Benchmarks both implementations on one logits shape."""
  batch, num_classes = shape
  ks, kt, ky = jax.random.split(jax.random.key(0), 3)
  s = 2.0 * jax.random.normal(ks, shape, jnp.float32)
  t = 2.0 * jax.random.normal(kt, shape, jnp.float32)
  y = jax.random.randint(ky, (batch,), 0, num_classes)
  args = (s, t, y)

  compiled, values = {}, {}
  for name, obj in IMPLS.items():
    fwd = jax.jit(obj).lower(*args).compile()
    vg = jax.jit(jax.value_and_grad(obj)).lower(*args).compile()
    compiled[name] = {"forward": fwd, "value_and_grad": vg}
    values[name] = _block(vg(*args))

  # Sanity: both compute the same objective and gradient.
  (vk, gk), (vo, go) = values["kdjax"], values["optax"]
  value_rel_diff = float(abs(vk - vo) / abs(vo))
  grad_max_abs_diff = float(jnp.max(jnp.abs(gk - go)))

  result: dict[str, Any] = {
      "shape": list(shape),
      "value_rel_diff": value_rel_diff,
      "grad_max_abs_diff": grad_max_abs_diff,
  }
  for mode in ("forward", "value_and_grad"):
    fns = {name: (lambda c=compiled[name][mode]: c(*args)) for name in IMPLS}
    times = _interleaved(fns, repeats, target_s)
    med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
    q = {k: np.percentile(np.asarray(v) * 1e6, [25, 75]).tolist()
         for k, v in times.items()}
    result[mode] = {
        "median_us": med,
        "iqr_us": q,
        "ratio_kdjax_over_optax": med["kdjax"] / med["optax"],
        # Per-round ratios of adjacent (interleaved) rounds: robust to drift.
        "median_paired_ratio": statistics.median(
            a / b for a, b in zip(times["kdjax"], times["optax"])),
        "memory": {k: compiled_memory(compiled[k][mode]) for k in IMPLS},
    }
  return result


def _peak(mem: Optional[dict[str, Optional[int]]]) -> Optional[int]:
  """The backend's peak, else the argument+output+temp-alias bound."""
  if mem is None:
    return None
  peak = mem.get("peak_memory_in_bytes")
  if peak is None:
    return mem.get("argument_plus_output_plus_temp_minus_alias")
  return peak


def _fmt_bytes(b: Optional[int]) -> str:
  return "n/a" if b is None else f"{b / 2**20:.2f} MiB"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", type=pathlib.Path, default=None,
                      help="write the results as JSON to this path")
  parser.add_argument("--repeats", type=int, default=41,
                      help="interleaved timing rounds per implementation")
  parser.add_argument("--round-seconds", type=float, default=0.02,
                      help="target duration of one timing round")
  args = parser.parse_args(argv)

  dev = jax.devices()[0]
  results = {
      "benchmark": "kd_objective: kdjax vs optax",
      "jax_version": jax.__version__,
      "jaxlib_version": getattr(jax.lib, "__version__", None) or
                        __import__("jaxlib").__version__,
      "optax_version": optax.__version__,
      "python": platform.python_version(),
      "backend": jax.default_backend(),
      "device_kind": dev.device_kind,
      "device_count": jax.device_count(),
      "cpu_count": os.cpu_count(),
      "cpu": provenance.cpu_record(),
      "dtype": "float32",
      "temperature": TEMPERATURE,
      "alpha": ALPHA,
      "repeats": args.repeats,
      "goal_max_ratio": GOAL_RATIO,
      "shapes": [list(s) for s in SHAPES],
      "results": [],
  }
  for shape in SHAPES:
    results["results"].append(
        bench_shape(shape, args.repeats, args.round_seconds))

  print(f"jax {results['jax_version']}, backend {results['backend']} "
        f"({results['device_kind']}), T={TEMPERATURE}, alpha={ALPHA}, "
        f"{args.repeats} interleaved rounds, medians in microseconds")
  header = (f"{'shape':>12} {'mode':>15} {'kdjax_us':>10} {'optax_us':>10} "
            f"{'ratio':>6} {'paired':>6} {'kdjax_peak':>12} {'optax_peak':>12}")
  print(header)
  print("-" * len(header))
  for r in results["results"]:
    shape = "x".join(map(str, r["shape"]))
    for mode in ("forward", "value_and_grad"):
      m = r[mode]
      print(f"{shape:>12} {mode:>15} {m['median_us']['kdjax']:>10.1f} "
            f"{m['median_us']['optax']:>10.1f} "
            f"{m['ratio_kdjax_over_optax']:>6.3f} "
            f"{m['median_paired_ratio']:>6.3f} "
            f"{_fmt_bytes(_peak(m['memory']['kdjax'])):>12} "
            f"{_fmt_bytes(_peak(m['memory']['optax'])):>12}")
  worst = max(r[m]["ratio_kdjax_over_optax"] for r in results["results"]
              for m in ("forward", "value_and_grad"))
  results["worst_ratio"] = worst
  results["meets_goal"] = worst <= GOAL_RATIO
  print(f"worst ratio {worst:.3f} (goal <= {GOAL_RATIO})")

  write_results(args.json, results)
  return 0


if __name__ == "__main__":
  sys.exit(main())
