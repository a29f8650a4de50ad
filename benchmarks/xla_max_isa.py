"""Does ``--xla_cpu_max_isa`` change the demo's bits, and what does it cost?

XLA:CPU compiles for the CPU it runs on, so its float rounding depends on
the CPU's vector extensions. The XLA flag ``--xla_cpu_max_isa=X`` (values
SSE4_2, AVX, AVX2, AVX512, ...) caps the instructions the LLVM backend may
emit. This script trains the demo's student (784-800-800-10, momentum SGD,
``"kd"`` at T = 20, alpha = 0.7, batch 128) from the shipped teacher on the
first ``--steps`` x 128 real MNIST training images, once per setting, each
in a fresh process (XLA_FLAGS is read when jax starts), and records the
parameter hash after the run and the steps/s of the last (compiled) epoch.

  PYTHONPATH=. python benchmarks/xla_max_isa.py \
      --json benchmarks/results/xla_max_isa_cpu.json

Equal hashes for "" (no cap) and a cap mean the cap changes nothing on this
machine; a cap below the machine's own extensions shows what the cap does
to the bits and the time. Whether a cap makes another machine kind's bits
equal to this one's can only be seen by running it there.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(steps: int, epochs: int) -> dict:
  """One training run in this process; the flags are already set."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import kdjax  # pylint: disable=g-import-not-at-top
  from kdjax.paper import data, models, provenance  # pylint: disable=g-import-not-at-top
  x, y = data.load_mnist("train")
  n = steps * 128
  train = {"image": x[:n], "label": y[:n].astype("int32")}
  net = models.paper_student(800)
  state = kdjax.TrainState.create(
      apply_fn=models.linen_student_apply(net),
      params=models.init_params(net, jax.random.key(0), (1, 28, 28)),
      tx=optax.sgd(0.1, momentum=0.9), temperature=20.0, alpha=0.7)
  t0 = time.process_time()
  state, history = kdjax.fit(state, models.load_shipped_teacher(), train,
                             epochs=epochs, batch_size=128,
                             rng=jax.random.key(1), progress=False)
  return {"params_sha256": provenance.params_sha256(state.params),
          "steps_per_s_last_epoch": float(history[-1]["steps_per_s"]),
          "cpu_seconds_total": round(time.process_time() - t0, 2)}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--isa", nargs="+", default=["", "AVX2", "AVX", "SSE4_2"],
                 help="--xla_cpu_max_isa values; '' for no cap")
  p.add_argument("--steps", type=int, default=50, help="steps per epoch")
  p.add_argument("--epochs", type=int, default=3)
  p.add_argument("--json", type=pathlib.Path, default=None)
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    print("RESULT " + json.dumps(child(args.steps, args.epochs)), flush=True)
    return {}
  from kdjax.paper import provenance  # pylint: disable=g-import-not-at-top
  from _common import write_results  # pylint: disable=g-import-not-at-top
  runs = []
  for isa in args.isa:
    flags = f"--xla_cpu_max_isa={isa}" if isa else ""
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, __file__, "--child", "--steps", str(args.steps),
         "--epochs", str(args.epochs)], env=env, capture_output=True,
        text=True, check=True)
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")][-1]
    runs.append({"xla_flags": flags, **json.loads(line[len("RESULT "):])})
    print(runs[-1], flush=True)
  base = runs[0]["params_sha256"]
  for r in runs:
    r["same_bits_as_first"] = r["params_sha256"] == base
  results = {
      "benchmark": "--xla_cpu_max_isa: the demo student's bits and speed",
      "command": " ".join(["python benchmarks/xla_max_isa.py"] +
                          (argv if argv is not None else sys.argv[1:])),
      "git_commit": provenance.git_commit(str(ROOT)),
      "environment": provenance.environment(),
      "steps_per_epoch": args.steps, "epochs": args.epochs,
      "batch_size": 128, "runs": runs}
  write_results(args.json, results)
  return results


if __name__ == "__main__":
  main()
