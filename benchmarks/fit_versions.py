"""Benchmark: ``kdjax.fit`` at this tree against ``fit`` at an older commit.

Issue #19's speed goal for the engine rewrite: ``fit`` on a one-device mesh
trains at least 0.98x as many steps per second as the ``fit`` before it
(commit 302af1a, the last tree before the engine). One run times both:

* each version runs in its own long-lived worker process (``python -c``
  with ``PYTHONPATH`` set to that version's source tree; the baseline is
  checked out with ``git worktree add --detach`` into a temporary folder and
  removed afterwards), so both are compiled once and warmed up by one epoch;
* a round is one more epoch of each version's own run (``fit`` continues a
  run from its state), the two interleaved A B A B ..., ``--repeats`` times,
  so machine noise hits both alike;
* the figure per epoch is ``fit``'s own ``steps_per_s`` (compilation
  excluded); the ratio reported is the median of the per-round ratios
  ``new / old`` (rounds of the two versions are adjacent in time), beside
  the ratio of the medians.

The workload is the demo's: the shipped ``784-1200-1200-10`` teacher online
(in inference mode), the ``784-800-800-10`` student, the ``"kd"`` objective
(``T = 20``, ``alpha = 0.1``), momentum SGD, batch 128, device-resident
MNIST (random ``uint8`` images when ``KDJAX_DATA_DIR`` has none), one
device (no ``XLA_FLAGS`` device count), ``loop="scan"``.

Usage::

  python benchmarks/fit_versions.py --baseline 302af1a \\
      --json benchmarks/results/fit_versions_cpu.json [--steps 200] \\
      [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]

# The worker: the same code for both versions (only names both have).
_WORKER = r"""
import sys, jax, numpy as np, optax
import kdjax
try:
  from kdjax.paper import models, data as kd_data
except ImportError:
  from kdjax import models, data as kd_data
steps = int(sys.argv[1])
n = steps * 128
try:
  s = kd_data.load_mnist_splits(as_float=False)
  images, labels = s.train_images[:n], s.train_labels[:n]
except Exception:
  r = np.random.default_rng(0)
  images = r.integers(0, 256, (n, 28, 28), dtype=np.uint8)
  labels = r.integers(0, 10, (n,), dtype=np.int32)
train = {"image": images, "label": labels}
teacher = models.load_shipped_teacher()
net = models.paper_student(width=800)
student = kdjax.Student.from_linen(
    net, {"params": models.init_params(net, jax.random.key(1), (1, 28, 28))})
state = kdjax.TrainState.create(student, tx=optax.sgd(0.01, momentum=0.9),
                                temperature=20.0, alpha=0.1)
epochs = 0
print("ready", kdjax.__file__, flush=True)
for line in sys.stdin:
  epochs += 1
  state, hist = kdjax.fit(state, teacher, train, epochs=epochs,
                          batch_size=128, rng=jax.random.key(0),
                          progress=False, loop="scan")
  print(float(hist[-1]["steps_per_s"]), flush=True)
"""


class _Worker:
  """One version's process: ``epoch()`` trains one more epoch."""

  def __init__(self, src: pathlib.Path, steps: int):
    env = dict(os.environ, PYTHONPATH=str(src))
    env.pop("XLA_FLAGS", None)
    self.p = subprocess.Popen(
        [sys.executable, "-W", "ignore", "-c", _WORKER, str(steps)],
        cwd=src, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True)
    line = self.p.stdout.readline()
    if not line.startswith("ready"):
      raise RuntimeError(f"worker in {src} failed to start: {line!r}")
    self.module = line.split(maxsplit=1)[1].strip()

  def epoch(self) -> float:
    self.p.stdin.write("go\n")
    self.p.stdin.flush()
    return float(self.p.stdout.readline())

  def close(self):
    self.p.stdin.close()
    self.p.wait(timeout=60)


def _git(*args, cwd=ROOT) -> str:
  return subprocess.run(["git", *args], cwd=cwd, check=True, text=True,
                        capture_output=True).stdout.strip()


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--baseline", default="302af1a")
  ap.add_argument("--steps", type=int, default=200)
  ap.add_argument("--repeats", type=int, default=7)
  ap.add_argument("--json", required=True)
  args = ap.parse_args(argv)
  sys.path.insert(0, str(ROOT))
  from kdjax import provenance  # noqa: PLC0415  (this tree's record)
  tmp = pathlib.Path(tempfile.mkdtemp()) / "baseline"
  _git("worktree", "add", "--detach", str(tmp), args.baseline)
  try:
    old, new = _Worker(tmp, args.steps), _Worker(ROOT, args.steps)
    old.epoch(), new.epoch()  # Warm-up: compiles.
    rounds = {"old": [], "new": []}
    for _ in range(args.repeats):
      rounds["old"].append(old.epoch())
      rounds["new"].append(new.epoch())
    old.close(), new.close()
  finally:
    _git("worktree", "remove", "--force", str(tmp))
  paired = statistics.median(n / o for n, o in zip(rounds["new"],
                                                   rounds["old"]))
  med = {k: statistics.median(v) for k, v in rounds.items()}
  out = {
      "benchmark": "fit_versions", "baseline_commit": _git(
          "rev-parse", args.baseline),
      "git_commit": _git("rev-parse", "HEAD"),
      "command": " ".join([os.path.relpath(sys.argv[0], ROOT),
                           *(argv or sys.argv[1:])]),
      "workload": "demo kd step: shipped teacher online, 800-800 student, "
                  "batch 128, one device, loop='scan'",
      "steps_per_epoch": args.steps, "repeats": args.repeats,
      "rounds_steps_per_s": rounds, "median_steps_per_s": med,
      "new_vs_old_paired": paired, "new_vs_old": med["new"] / med["old"],
      "goal_min": 0.98, "goal_met": paired >= 0.98,
      "environment": provenance.environment(),
      "load_average": os.getloadavg(),
  }
  pathlib.Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
  print(json.dumps({k: out[k] for k in ("median_steps_per_s",
                                        "new_vs_old_paired", "new_vs_old",
                                        "goal_met")}, indent=1))


if __name__ == "__main__":
  main()
