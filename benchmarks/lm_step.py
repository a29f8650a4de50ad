"""Benchmark: a whole LM train step (``make_train_step``), fused vs logits.

One language-model distillation step as ``kdjax.fit`` compiles it
(:func:`kdjax.make_train_step`: student forward and backward, teacher
forward, Adam update, metrics, the non-finite guard), in two forms:

============  ==============================================================
``logits``    objective ``"kd"``: the student and teacher return ``[B, L,
              V]`` logits, which the loss and its gradient then hold.
``chunked``   objective ``kdjax.objectives.chunked(hard_labels=True,
              chunk_size=C)`` (``"chunked_kd"`` at another chunk size): the
              same models built with ``head="head"`` return their hidden
              states and output projection, and the fused chunked loss
              never holds more than ``[C, V]`` logits.
============  ==============================================================

Both compute the same loss (``alpha CE + (1 - alpha) T^2 KL``, ``alpha =
0.5``, ``T = 2``) over ``B * L`` tokens with 1/8 of them padding (weight 0),
and the same update (checked: the losses and the updated params agree).

The model is the part of an LM that the vocabulary size makes expensive:
``tokens -> Embed(V, D) -> Dense(D) GELU -> LayerNorm -> Dense(V, name=
"head")``, student ``D = --hidden``, teacher ``2 D``. Measured:

* compiled memory: ``jit(step).lower(...).compile().memory_analysis()``
  (``temp``: XLA's temporaries; ``total``: argument + output + temp -
  alias, the state, teacher and batch included);
* process peak RSS: each form runs in a fresh subprocess (``--child``),
  before this process allocates anything (children inherit ``ru_maxrss``);
* time: both steps compiled and warmed up, then ``--repeats`` rounds, one
  call each, interleaved A B B A so a shared machine's load hits both;
  medians and the median of per-round ratios;
* the largest batch that fits 24 GB, per form: the compiled ``total`` at
  ``B`` and ``2 B`` sequences (compiled only, not run) is linear in ``B``;
  the line is extrapolated to 24 GB (stated as an extrapolation in the
  JSON).

Goal (issue 22): chunked memory at most 1/8 of the logits form's, at no
more than 1.05x its time.

Usage (a few minutes of CPU at the defaults)::

  nice -n 5 python benchmarks/lm_step.py --json \\
      benchmarks/results/lm_step_cpu.json [--vocab-sizes 32000 128000] \\
      [--batch 8] [--length 256] [--hidden 128] [--chunk-size 256] \\
      [--repeats 3] [--note "..."]

``--memory-batches 32 64`` only compiles the two forms at those batch
sizes (nothing runs, a few minutes) and records their compiled memory: the
ratio at batches larger than the timed one, where the logits form's
``[tokens, V]`` arrays grow and the chunked form's ``[C, V]`` ones do not.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import kdjax  # noqa: E402
from kdjax import objectives  # noqa: E402
from kdjax.paper import provenance  # noqa: E402
from kdjax import step as train  # noqa: E402
from _common import compiled_memory, write_results  # noqa: E402

GOALS = {"memory_ratio_max": 1.0 / 8.0, "time_ratio_max": 1.05}
BUDGET_BYTES = 24 * 2**30
PAD_FRACTION = 0.125


def _parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", type=pathlib.Path, default=None)
  parser.add_argument("--vocab-sizes", type=int, nargs="+",
                      default=[32_000, 128_000])
  parser.add_argument("--batch", type=int, default=8, help="sequences B")
  parser.add_argument("--length", type=int, default=256, help="tokens L")
  parser.add_argument("--hidden", type=int, default=128)
  parser.add_argument("--chunk-size", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--no-subprocess", action="store_true")
  parser.add_argument("--note", default=None)
  parser.add_argument("--memory-batches", type=int, nargs="+", default=None,
                      help="only compile (never run) both forms at these "
                      "batch sizes and record their compiled memory")
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  return parser.parse_args(argv)


FIELDS = kdjax.Fields(inputs="tokens", labels="targets", weights="mask")


class TinyLM(nn.Module):
  """``tokens [B, L] -> logits [B, L, V]``; the head is named ``"head"``."""
  vocab: int
  hidden: int

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    del train
    x = nn.Embed(self.vocab, self.hidden)(tokens)
    x = nn.gelu(nn.Dense(self.hidden)(x))
    return nn.Dense(self.vocab, name="head")(nn.LayerNorm()(x))


def _setup(form: str, vocab: int, hidden: int, chunk: int):
  """``(step, state, teacher)`` of one form (params drawn from seed 0/1)."""
  head = "head" if form == "chunked" else None
  s_net, t_net = TinyLM(vocab, hidden), TinyLM(vocab, 2 * hidden)
  x = jnp.zeros((1, 4), jnp.int32)
  student = kdjax.Student.from_linen(
      s_net, s_net.init(jax.random.key(0), x), head=head)
  teacher = kdjax.Teacher.from_linen(
      t_net, t_net.init(jax.random.key(1), x), head=head)
  objective = ("kd" if form == "logits" else
               objectives.chunked(hard_labels=True, chunk_size=chunk))
  state = train.TrainState.create(student, tx=optax.adam(1e-3),
                                  temperature=2.0, alpha=0.5)
  step = jax.jit(train.make_train_step(objective, fields=FIELDS),
                 donate_argnums=(0,))
  return step, state, teacher


def _batch(batch: int, length: int, vocab: int) -> dict:
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab, (batch, length + 1), dtype=np.int32)
  mask = np.ones((batch, length), np.float32)
  mask[:, int(length * (1 - PAD_FRACTION)):] = 0  # Right padding.
  return {"tokens": jnp.asarray(tokens[:, :-1]),
          "targets": jnp.asarray(tokens[:, 1:]), "mask": jnp.asarray(mask)}


def _compile(form, vocab, args, batch=None):
  step, state, teacher = _setup(form, vocab, args.hidden, args.chunk_size)
  data = _batch(batch or args.batch, args.length, vocab)
  compiled = step.lower(state, teacher, data, jax.random.key(0)).compile()
  return compiled, state, teacher, data


def _maxrss_bytes() -> int:
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return rss if platform.system() == "Darwin" else rss * 1024


def run_child(spec: str, args) -> None:
  """``--child form:V``: one compiled step, prints the peak RSS as JSON."""
  form, vocab = spec.split(":")
  compiled, state, teacher, data = _compile(form, int(vocab), args)
  before = _maxrss_bytes()
  t0 = time.perf_counter()
  jax.block_until_ready(compiled(state, teacher, data, jax.random.key(0)))
  print(json.dumps({"form": form, "ru_maxrss_bytes": _maxrss_bytes(),
                    "ru_maxrss_before_call_bytes": before,
                    "first_call_seconds": time.perf_counter() - t0}))


def _child_rss(form: str, vocab: int, argv: list[str]) -> dict[str, Any]:
  cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), *argv,
         "--child", f"{form}:{vocab}"]
  out = subprocess.run(cmd, check=True, capture_output=True, text=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def _largest_batch(form: str, vocab: int, args) -> dict[str, Any]:
  """The compiled total at B and 2B, extrapolated linearly to 24 GiB."""
  key = "argument_plus_output_plus_temp_minus_alias"
  totals = {}
  for b in (args.batch, 2 * args.batch):
    totals[b] = compiled_memory(_compile(form, vocab, args, b)[0])[key]
  per_seq = (totals[2 * args.batch] - totals[args.batch]) / args.batch
  fixed = totals[args.batch] - per_seq * args.batch
  largest = int((BUDGET_BYTES - fixed) // per_seq) if per_seq > 0 else None
  return {"compiled_total_bytes_by_batch": totals,
          "bytes_per_sequence": per_seq, "fixed_bytes": fixed,
          "largest_batch_in_24_GiB": largest,
          "method": "extrapolated: compiled total at B and 2B (not run), "
                    "linear in B, solved for 24 GiB"}


def _timed(compiled, args) -> tuple[dict, dict]:
  """Interleaved A B B A rounds; the step's outputs of the warm-up."""
  names = list(compiled)
  outs, times = {}, {k: [] for k in names}
  for name in names:  # Warm-up; a fresh state each call (donated).
    c, state, teacher, data = compiled[name]
    outs[name] = jax.device_get(c(state, teacher, data, jax.random.key(0)))
  for r in range(args.repeats):
    for name in (names if r % 2 == 0 else names[::-1]):
      c, state, teacher, data = compiled[name]
      state = jax.tree.map(jnp.copy, outs[name][0])
      t0 = time.perf_counter()
      jax.block_until_ready(c(state, teacher, data, jax.random.key(1)))
      times[name].append(time.perf_counter() - t0)
    print(f"  round {r + 1}: " + ", ".join(
        f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
  return times, outs


def bench_vocab(vocab: int, args, rss: dict) -> dict[str, Any]:
  compiled, memory = {}, {}
  for form in ("logits", "chunked"):
    t0 = time.perf_counter()
    compiled[form] = _compile(form, vocab, args)
    memory[form] = compiled_memory(compiled[form][0])
    print(f"  V={vocab} {form}: compiled in {time.perf_counter() - t0:.1f} s",
          flush=True)
  times, outs = _timed(compiled, args)
  (s_l, m_l), (s_c, m_c) = outs["logits"], outs["chunked"]
  param_diff = max(float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) or 1))
                   for a, b in zip(jax.tree.leaves(s_c.params),
                                   jax.tree.leaves(s_l.params)))
  del compiled, outs
  med = {k: statistics.median(v) for k, v in times.items()}
  mem_ratio = lambda f: (memory["chunked"][f] / memory["logits"][f])
  ratios = {
      "time_median": med["chunked"] / med["logits"],
      "time_median_paired": statistics.median(
          c / lo for c, lo in zip(times["chunked"], times["logits"])),
      "compiled_temp": mem_ratio("temp_size_in_bytes"),
      "compiled_total": mem_ratio(
          "argument_plus_output_plus_temp_minus_alias"),
  }
  if rss:
    ratios["process_ru_maxrss"] = (rss["chunked"]["ru_maxrss_bytes"] /
                                   rss["logits"]["ru_maxrss_bytes"])
  return {
      "vocab": vocab, "tokens": args.batch * args.length,
      "sanity": {"loss_logits": float(m_l["loss"]),
                 "loss_chunked": float(m_c["loss"]),
                 "params_after_one_step_rel_max_diff": param_diff},
      "seconds": {"median": med, "all": times},
      "compiled_memory": memory, "process_rss": rss,
      "ratios_chunked_over_logits": ratios,
      "goals_met": {
          "time_<=_1.05x": ratios["time_median"] <= GOALS["time_ratio_max"],
          "compiled_temp_<=_1/8": ratios["compiled_temp"] <= (
              GOALS["memory_ratio_max"]),
          "compiled_total_<=_1/8": ratios["compiled_total"] <= (
              GOALS["memory_ratio_max"])},
      "largest_batch_24_GiB": {
          form: _largest_batch(form, vocab, args)
          for form in ("logits", "chunked")},
  }


def memory_only(args) -> dict[str, Any]:
  """Compiled memory of both forms at ``--memory-batches`` (not run)."""
  rows = []
  for vocab in args.vocab_sizes:
    for b in args.memory_batches:
      mem = {f: compiled_memory(_compile(f, vocab, args, b)[0])
             for f in ("logits", "chunked")}
      ratio = lambda k, mem=mem: mem["chunked"][k] / mem["logits"][k]
      rows.append({
          "vocab": vocab, "batch": b, "tokens": b * args.length,
          "compiled_memory": mem,
          "ratios_chunked_over_logits": {
              "compiled_temp": ratio("temp_size_in_bytes"),
              "compiled_total": ratio(
                  "argument_plus_output_plus_temp_minus_alias")}})
      print(f"V={vocab} B={b}: {rows[-1]['ratios_chunked_over_logits']}",
            flush=True)
  return {"memory_batches": rows}


def main(args) -> int:
  argv = ["--batch", str(args.batch), "--length", str(args.length),
          "--hidden", str(args.hidden), "--chunk-size", str(args.chunk_size)]
  if args.child is not None:
    run_child(args.child, args)
    return 0
  t_start = time.perf_counter()
  results = {
      "benchmark": "whole LM train step (make_train_step), chunked_kd vs kd",
      "command": " ".join([pathlib.Path(sys.executable).name] + sys.argv),
      "git_commit": provenance.git_commit(
          str(pathlib.Path(__file__).resolve().parents[1])),
      "machine": provenance.device_description(),
      "environment": provenance.environment(),
      "note": args.note,
      "config": {"batch": args.batch, "length": args.length,
                 "hidden": args.hidden, "teacher_hidden": 2 * args.hidden,
                 "chunk_size": args.chunk_size, "repeats": args.repeats,
                 "pad_fraction": PAD_FRACTION, "optimizer": "adam",
                 "temperature": 2.0, "alpha": 0.5, "dtype": "float32"},
      "goals": {"memory_ratio_max": "1/8", "time_ratio_max": 1.05},
      "results": [],
  }
  if args.memory_batches:
    results.update(memory_only(args))
    results["wall_seconds"] = time.perf_counter() - t_start
    write_results(args.json, results)
    return 0
  rss = {}
  if not args.no_subprocess:  # First, while this process is small.
    for vocab in args.vocab_sizes:
      rss[vocab] = {f: _child_rss(f, vocab, argv)
                    for f in ("logits", "chunked")}
      print(f"V = {vocab}: fresh-process RSS {rss[vocab]}", flush=True)
  for vocab in args.vocab_sizes:
    print(f"V = {vocab}", flush=True)
    results["results"].append(bench_vocab(vocab, args, rss.get(vocab, {})))
    write_results(args.json, results)
  results["wall_seconds"] = time.perf_counter() - t_start
  for r in results["results"]:
    print(f"V={r['vocab']}: {r['ratios_chunked_over_logits']}; "
          f"{r['goals_met']}; largest batch: " + ", ".join(
              f"{f} {v['largest_batch_in_24_GiB']}"
              for f, v in r["largest_batch_24_GiB"].items()))
  write_results(args.json, results)
  return 0


if __name__ == "__main__":
  sys.exit(main(_parse_args()))
