"""Benchmark: chunked against unchunked distillation loss at large vocabularies.

Times and measures the peak memory of the jitted ``value_and_grad`` (w.r.t.
the student's hidden states ``h_s [N, D]`` and output projection
``W_s [D, V]``) of :func:`kdjax.losses.chunked.chunked_distillation_loss`, the
``T^2 KL`` distillation loss from hidden states, with the teacher given as
its own hidden states and projection (``h_t [N, D]``, ``W_t [D, V]``):

==============  ============================================================
``unchunked``   ``chunk_size=None``: the ``[N, V]`` student and teacher
                logits are materialised and differentiated by autodiff.
``chunked_C``   ``chunk_size=C`` for each ``C`` in ``--chunk-sizes``: a
                ``lax.scan`` over chunks of positions with a custom VJP that
                forms each chunk's logits' cotangent and consumes it at once.
==============  ============================================================

at ``V`` in ``--vocab-sizes`` (default 32,000 and 128,000), with ``N`` in
``--tokens`` positions (one value for every ``V``, or one per ``V``; default
16,384 at 32,000 and 4,096 at 128,000: as many as the 24 GB CPU machine
allows, since the unchunked value-and-grad then needs about 12 GB and the
next doubling would not fit), hidden width ``D = --hidden`` (default
1,024), float32, ``T = 2``.

Goals (from issue #14): the chunked peak memory at most 1/8 of the unchunked
one, and its time at most 1.2x. The loss's own memory is XLA's temporaries
(``temp``): the unchunked value-and-grad holds about five ``[N, V]`` float32
arrays; the chunked one, measured, about four ``[C, V]`` ones, or for small
``C`` one ``[D, V]`` update of the gradient plus one or two ``[C, V]`` (the
larger of the two), so the ratio is about ``max(4 C, D + 2 C) / 5 N``: it
falls as ``N`` grows, which is why ``N`` is as large as the machine allows.
The chunk size trades memory for time: each chunk updates the whole ``[D,
V]`` gradient once (a rank-``C`` update, ``N / C`` of them), which is less
efficient for small ``C``; hence three sizes by default. The *total*
footprint need not reach 1/8: ``W_s``, ``W_t`` and ``dW_s`` (``3 x 4 D V``
bytes) are arguments and outputs of both variants (at 16,384 tokens and V =
32,000 it does reach it; at 4,096 tokens and V = 128,000 those three arrays
alone are 0.13 of the unchunked total), so it is reported beside the
temporaries, not as the goal.

Memory is measured two ways:

* from the compiled programs, ``jax.jit(f).lower(...).compile()
  .memory_analysis()`` (see ``_common.compiled_memory``): ``temp`` (XLA's
  temporaries, i.e. everything but the arguments and outputs) and the
  ``argument + output + temp - alias`` total, which includes ``W_s``,
  ``W_t`` and the gradient ``dW_s`` (``4 D V`` bytes each), memory that no
  chunking can remove;
* from the process: each variant runs once in a **fresh subprocess**
  (``--child``, all of them before this process allocates anything, since
  a Linux child inherits its parent's ``ru_maxrss``) and reports
  ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (which also holds the
  compiler's and the input generation's peaks) and, sampled every 2 ms
  from ``/proc/self/statm`` during the call, the call's
  own peak RSS and its increase over the RSS just before the call (after
  the inputs exist and the program is compiled).

Method for time: both programs are compiled ahead of time and warmed up
once; then ``--repeats`` rounds of one call each run interleaved in an
A B B A pattern, so the load of a shared machine hits both alike; reported
are medians, the ratio of medians, and the median of per-round ratios
(adjacent calls). The two variants' values and gradients are compared as a
sanity check.

Usage::

  python benchmarks/chunked_loss.py \\
      --json benchmarks/results/chunked_loss_cpu.json \\
      [--vocab-sizes 32000 128000] [--tokens N [N ...]] [--hidden 1024] \\
      [--chunk-sizes 256 512 1024] [--repeats 3] [--backend cpu|gpu]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from typing import Any, Optional

_BACKENDS = {"cpu": "cpu", "gpu": "cuda"}
TEMPERATURE = 2.0
GOALS = {"peak_memory_ratio_max": 1.0 / 8.0, "time_ratio_max": 1.2}
# The most tokens at which the unchunked value-and-grad fits the 24 GB CPU
# machine (about 12 GB); the next doubling would not.
DEFAULT_TOKENS = {32_000: 16_384, 128_000: 4_096}


def _parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--backend", choices=sorted(_BACKENDS), default=None,
                      help="sets JAX_PLATFORMS before JAX is imported")
  parser.add_argument("--json", type=pathlib.Path, default=None,
                      help="write the results as JSON to this path")
  parser.add_argument("--vocab-sizes", type=int, nargs="+",
                      default=[32_000, 128_000])
  parser.add_argument("--tokens", type=int, nargs="+", default=None,
                      help="positions N: one for every vocab size, or one "
                      "per vocab size (default: DEFAULT_TOKENS for the "
                      "vocab sizes it has)")
  parser.add_argument("--hidden", type=int, default=1024)
  parser.add_argument("--chunk-sizes", type=int, nargs="+",
                      default=[256, 512, 1024],
                      help="one chunked variant per size")
  parser.add_argument("--repeats", type=int, default=3,
                      help="interleaved timed rounds per variant and size")
  parser.add_argument("--no-subprocess", action="store_true",
                      help="skip the fresh-process RSS measurements")
  parser.add_argument("--note", default=None,
                      help="free text stored in the JSON (e.g. the load)")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  return parser.parse_args(argv)


if __name__ == "__main__":
  _ARGS = _parse_args()
  if _ARGS.backend is not None:
    os.environ["JAX_PLATFORMS"] = _BACKENDS[_ARGS.backend]

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from kdjax.losses import chunked
from kdjax.paper import provenance
from _common import compiled_memory, write_results  # benchmarks/ is sys.path[0]
# pylint: enable=g-import-not-at-top,wrong-import-position

_ONE = np.float32(1.0)


def _inputs(tokens: int, hidden: int, vocab: int):
  """``(h_s, W_s, h_t, W_t)``, drawn with NumPy in float32.

  NumPy (not ``jax.random``, whose transients are several times the array)
  keeps the process's RSS before the call close to the inputs' own size, so
  that ``ru_maxrss`` reflects the call's peak.
  """
  rng = np.random.default_rng(0)
  scale = np.float32(1.0 / np.sqrt(hidden))

  def normal(shape, s=_ONE):
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32) * s)

  h_s = normal((tokens, hidden))
  w_s = normal((hidden, vocab), scale)
  h_t = normal((tokens, hidden))
  w_t = normal((hidden, vocab), 2 * scale)
  return jax.block_until_ready((h_s, w_s, h_t, w_t))


def _compile(chunk_size: Optional[int], args):
  def loss(h_s, w_s, h_t, w_t):
    return chunked.chunked_distillation_loss(
        h_s, w_s, temperature=TEMPERATURE, teacher=(h_t, w_t),
        chunk_size=chunk_size)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(
      *args).compile()


def _maxrss_bytes() -> int:
  # Linux reports kilobytes, macOS bytes.
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return rss if platform.system() == "Darwin" else rss * 1024


def _current_rss_bytes() -> Optional[int]:
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except OSError:
    return None


def run_child(spec: str) -> None:
  """``--child variant:V:N:D``: one call, prints the RSS as JSON."""
  variant, vocab, tokens, hidden = spec.split(":")
  args = _inputs(int(tokens), int(hidden), int(vocab))
  chunk = None if variant == "unchunked" else int(variant.split("_")[1])
  compiled = _compile(chunk, args)
  before_max, before_now = _maxrss_bytes(), _current_rss_bytes()
  # ru_maxrss also holds the compiler's and the input generation's peaks:
  # sample the current RSS during the call to isolate the call's own peak.
  sampled, done = [before_now or 0], threading.Event()

  def sample():
    while not done.is_set():
      sampled.append(_current_rss_bytes() or 0)
      time.sleep(0.002)

  sampler = threading.Thread(target=sample, daemon=True)
  sampler.start()
  t0 = time.perf_counter()
  jax.block_until_ready(compiled(*args))
  seconds = time.perf_counter() - t0
  done.set()
  sampler.join()
  peak = _maxrss_bytes()
  call_peak = max(sampled + [_current_rss_bytes() or 0])
  print(json.dumps({
      "variant": variant, "ru_maxrss_bytes": peak,
      "ru_maxrss_before_call_bytes": before_max,
      "rss_before_call_bytes": before_now,
      "sampled_peak_rss_during_call_bytes": call_peak,
      "increase_over_rss_before_call_bytes":
          None if before_now is None else call_peak - before_now,
      "first_call_seconds": seconds}))


def _tokens(vocab: int, args) -> int:
  """``N`` for this vocabulary size (``--tokens``: one value, or one per V)."""
  if args.tokens is None:
    return DEFAULT_TOKENS[vocab]
  if len(args.tokens) == 1:
    return args.tokens[0]
  return dict(zip(args.vocab_sizes, args.tokens))[vocab]


def _check_sizes(args) -> None:
  """One clear error for ``--vocab-sizes`` / ``--tokens`` that do not pair."""
  if len(set(args.vocab_sizes)) != len(args.vocab_sizes):
    raise SystemExit(f"--vocab-sizes has a repeated size: {args.vocab_sizes}.")
  if args.tokens is None:
    missing = [v for v in args.vocab_sizes if v not in DEFAULT_TOKENS]
    if missing:
      raise SystemExit(
          f"no default token count for vocab sizes {missing} (defaults: "
          f"{DEFAULT_TOKENS}): give --tokens, one value or one per size.")
  elif len(args.tokens) not in (1, len(args.vocab_sizes)):
    raise SystemExit(
        f"--tokens takes one value or one per vocab size "
        f"({len(args.vocab_sizes)}), got {len(args.tokens)}: {args.tokens}.")


def _child_rss(variant: str, vocab: int, args) -> dict[str, Any]:
  cmd = [sys.executable, str(pathlib.Path(__file__).resolve()),
         "--child", f"{variant}:{vocab}:{_tokens(vocab, args)}:{args.hidden}"]
  if args.backend is not None:
    cmd += ["--backend", args.backend]
  out = subprocess.run(cmd, check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def bench_vocab(vocab: int, args, rss: dict[str, Any]) -> dict[str, Any]:
  tokens = _tokens(vocab, args)
  inputs = _inputs(tokens, args.hidden, vocab)
  variants = {"unchunked": None}
  variants.update({f"chunked_{c}": c for c in args.chunk_sizes})
  chunked_names = [k for k in variants if k != "unchunked"]
  compiled, memory, sanity = {}, {}, {}
  reference = None
  for name, chunk_size in variants.items():
    t0 = time.perf_counter()
    compiled[name] = _compile(chunk_size, inputs)
    memory[name] = compiled_memory(compiled[name])
    out = jax.block_until_ready(compiled[name](*inputs))  # Warm-up.
    if reference is None:
      reference = out
    else:
      (v_u, (gh_u, gw_u)), (v_c, (gh_c, gw_c)) = reference, out
      rel = lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))
      sanity[name] = {"value_rel_diff": float(abs(v_c - v_u) / abs(v_u)),
                      "grad_h_rel_max_diff": rel(gh_c, gh_u),
                      "grad_w_rel_max_diff": rel(gw_c, gw_u)}
    del out
    print(f"  V={vocab} {name}: compiled and warmed up in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
  del reference

  times: dict[str, list[float]] = {k: [] for k in variants}
  names = list(variants)
  for r in range(args.repeats):
    for name in (names if r % 2 == 0 else names[::-1]):
      t0 = time.perf_counter()
      jax.block_until_ready(compiled[name](*inputs))
      times[name].append(time.perf_counter() - t0)
    print(f"  V={vocab} round {r + 1}/{args.repeats}: " + ", ".join(
        f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
  med = {k: statistics.median(v) for k, v in times.items()}
  del compiled, inputs

  def ratio(name, field):
    a, b = memory[name], memory["unchunked"]
    if a is None or b is None or a.get(field) is None or not b.get(field):
      return None
    return a[field] / b[field]

  result: dict[str, Any] = {
      "vocab": vocab,
      "tokens": tokens,
      "sanity_vs_unchunked": sanity,
      "seconds": {"median": med, "all": times},
      "compiled_memory": memory,
      "analytic_bytes": {
          "one_[N,V]_float32_array": 4 * tokens * vocab,
          "one_[D,V]_float32_array (W_s, W_t, dW_s each)":
              4 * args.hidden * vocab,
          **{f"one_[{c},V]_float32_array": 4 * c * vocab
             for c in args.chunk_sizes},
      },
      "ratios_chunked_over_unchunked": {},
      "goals_met": {},
  }
  if rss:
    result["process_rss"] = rss
  goal_mem, goal_time = GOALS["peak_memory_ratio_max"], GOALS["time_ratio_max"]
  for name in chunked_names:
    r = {
        "time_median": med[name] / med["unchunked"],
        "time_median_paired": statistics.median(
            c / u for c, u in zip(times[name], times["unchunked"])),
        "compiled_temp": ratio(name, "temp_size_in_bytes"),
        "compiled_total": ratio(name,
                                "argument_plus_output_plus_temp_minus_alias"),
    }
    if rss:
      r["process_ru_maxrss"] = (rss[name]["ru_maxrss_bytes"] /
                                rss["unchunked"]["ru_maxrss_bytes"])
      r["process_rss_increase_during_call"] = (
          rss[name]["increase_over_rss_before_call_bytes"] /
          rss["unchunked"]["increase_over_rss_before_call_bytes"])
    result["ratios_chunked_over_unchunked"][name] = r
    result["goals_met"][name] = {
        "time_<=_1.2x": r["time_median"] <= goal_time,
        **{f"{k}_memory_<=_1/8": (None if r.get(k) is None else
                                   r[k] <= goal_mem)
           for k in ("compiled_temp", "compiled_total", "process_ru_maxrss",
                     "process_rss_increase_during_call")},
    }
  return result


def main(args) -> int:
  if args.child is not None:
    run_child(args.child)
    return 0
  _check_sizes(args)
  t_start = time.perf_counter()
  results = {
      "benchmark": "chunked vs unchunked distillation loss value_and_grad",
      "command": " ".join([pathlib.Path(sys.executable).name] + sys.argv),
      "git_commit": provenance.git_commit(
          str(pathlib.Path(__file__).resolve().parents[1])),
      "machine": provenance.device_description(),
      "environment": provenance.environment(),
      "note": args.note,
      "tokens": {str(v): _tokens(v, args) for v in args.vocab_sizes},
      "hidden": args.hidden,
      "chunk_sizes": args.chunk_sizes, "repeats": args.repeats,
      "temperature": TEMPERATURE, "dtype": "float32",
      "goals": {"peak_memory_ratio_max": "1/8", "time_ratio_max": 1.2},
      "results": [],
  }
  # The fresh-process measurements come first, while this process is still
  # small: Linux children inherit the parent's ru_maxrss across fork + exec.
  rss_by_vocab = {}
  for vocab in args.vocab_sizes:
    if not args.no_subprocess:
      names = ["unchunked"] + [f"chunked_{c}" for c in args.chunk_sizes]
      rss_by_vocab[vocab] = {name: _child_rss(name, vocab, args)
                             for name in names}
      print(f"V = {vocab}: fresh-process RSS measured", flush=True)
  results["parent_ru_maxrss_when_children_ran_bytes"] = _maxrss_bytes()
  for vocab in args.vocab_sizes:
    print(f"V = {vocab}", flush=True)
    results["results"].append(bench_vocab(vocab, args,
                                          rss_by_vocab.get(vocab, {})))
    write_results(args.json, results)  # Partial results survive a kill.
  results["wall_seconds"] = time.perf_counter() - t_start
  for r in results["results"]:
    for name, ratios in r["ratios_chunked_over_unchunked"].items():
      print(f"V={r['vocab']} {name}: " + ", ".join(
          f"{k} {v:.3f}" for k, v in ratios.items() if v is not None) +
            f"; goals met: {r['goals_met'][name]}")
  write_results(args.json, results)
  return 0


if __name__ == "__main__":
  sys.exit(main(_ARGS))
