"""The paper's MNIST distillation fed from the host through a grain pipeline.

  python -m examples.grain_mnist --out examples/results/grain_mnist_cpu.json

The 50k training images stream through ``grain.MapDataset``: a seeded
shuffle of the example indices (a new order each epoch), batching, and a
``random_map`` that gathers each batch and draws a ±2-pixel jitter per
example, vectorised over the batch. ``kdjax.fit`` checks each batch as
it arrives, prefetches it to the device on a thread and runs jitted blocks
of steps; the teacher (the shipped 1200-1200 MLP) runs online on the
jittered images. The run is killed once in the middle with SIGKILL (the
script runs itself as a child process and kills it after its first
mid-epoch checkpoint), then resumed from the checkpoint, which holds the
data position. Finally the same step is timed on device-resident data
(jitter on the device, ``kdjax.paper.augment``) for the throughput comparison.

About 5-8 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import grain
import jax
import numpy as np
import optax

import kdjax
from kdjax import checkpoint
from kdjax.paper import augment, data, models, provenance

ROOT = pathlib.Path(__file__).resolve().parents[1]


def jitter_batch(images: np.ndarray, rng: np.random.Generator,
                 max_shift: int = 2) -> np.ndarray:
  """Shifts each image of ``[B, 28, 28]`` by up to ``max_shift`` pixels.

  Zero-filled, one shift per image, vectorised: one padded copy and one
  gather for the whole batch, so the pipeline's cost is per batch, not per
  example.
  """
  b, h, w = images.shape
  padded = np.pad(images, ((0, 0), (max_shift, max_shift),
                           (max_shift, max_shift)))
  dy, dx = rng.integers(-max_shift, max_shift + 1, size=(2, b))
  rows = (max_shift - dy)[:, None] + np.arange(h)[None]
  cols = (max_shift - dx)[:, None] + np.arange(w)[None]
  return padded[np.arange(b)[:, None, None], rows[:, :, None],
                cols[:, None, :]]


def pipeline(images, labels, *, batch_size: int, seed: int):
  """Shuffled index batches -> (gathered, jittered) image batches.

  grain shuffles the example indices (a new order each epoch) and batches
  them; the map gathers a whole batch with one fancy index and jitters it
  in one vectorised call (grain seeds ``random_map`` per batch index, so
  a resumed run draws the same shifts).
  """

  def load(idx, rng):
    return {"image": jitter_batch(images[idx], rng), "label": labels[idx]}

  return (grain.MapDataset.range(len(labels)).seed(seed).shuffle()
          .batch(batch_size, drop_remainder=True).random_map(load))


def make_state(seed: int, total_steps: int):
  net = models.paper_student(800)
  student = kdjax.Student.from_linen(
      net, {"params": models.init_params(net, jax.random.key(seed),
                                         (1, 28, 28))})
  tx = optax.chain(optax.clip_by_global_norm(5.0), optax.sgd(
      optax.cosine_decay_schedule(0.1, total_steps), momentum=0.9,
      nesterov=True))
  return kdjax.TrainState.create(student, tx=tx, temperature=20.0,
                                 alpha=0.7)


def _splits(args):
  splits = data.load_mnist_splits(args.data_dir, as_float=False)
  if args.train_limit:
    splits = data.MnistSplits(
        splits.train_images[:args.train_limit],
        splits.train_labels[:args.train_limit], splits.val_images,
        splits.val_labels, splits.test_images, splits.test_labels)
  return splits


def train(args) -> dict:
  """The training run itself (the child process)."""
  splits = _splits(args)
  ds = pipeline(splits.train_images, splits.train_labels,
                batch_size=args.batch_size, seed=args.seed)
  state = make_state(args.seed, len(ds) * args.epochs)
  t0 = time.perf_counter()
  state, history = kdjax.fit(
      state, models.load_shipped_teacher(), ds, epochs=args.epochs,
      rng=jax.random.key(args.seed), checkpoint=kdjax.Checkpointing(
          args.workdir, every_steps=args.checkpoint_every_steps),
      progress=not args.quiet)
  logits = np.concatenate([np.asarray(state.predict(x)) for x in np.split(
      splits.test_images, 10)])
  val = np.concatenate([np.asarray(state.predict(x)) for x in np.split(
      splits.val_images, 10)])
  out = {"test_errors": int(np.sum(np.argmax(logits, -1)
                                   != splits.test_labels)),
         "val_errors": int(np.sum(np.argmax(val, -1) != splits.val_labels)),
         "params_sha256": provenance.params_sha256(state.params),
         "steps": int(state.step),
         "host_steps_per_s": [float(h["steps_per_s"]) for h in history],
         "seconds_this_process": round(time.perf_counter() - t0, 1)}
  print("RESULT " + json.dumps(out), flush=True)
  return out


def device_throughput(args) -> float:
  """Steps/s of the same step on device-resident data (one epoch)."""
  splits = _splits(args)
  train_data = {"image": splits.train_images, "label": splits.train_labels}
  state = make_state(args.seed, 1000)
  _, history = kdjax.fit(state, models.load_shipped_teacher(), train_data,
                         epochs=2, batch_size=args.batch_size,
                         rng=jax.random.key(args.seed),
                         spec=kdjax.StepSpec(augment=augment.make_jitter(2)),
                         progress=False)
  return float(history[-1]["steps_per_s"])  # The second: no compile.


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data-dir", default=None)
  p.add_argument("--out", default="examples/results/grain_mnist_cpu.json")
  p.add_argument("--workdir", default="runs/grain_mnist")
  p.add_argument("--epochs", type=int, default=3)
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--checkpoint-every-steps", type=int, default=100)
  p.add_argument("--train-limit", type=int, default=0,
                 help="train on the first N training images (tests)")
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--quiet", action="store_true")
  args = p.parse_args(argv)
  if args.child:
    return train(args)
  t_start = time.perf_counter()
  work = pathlib.Path(args.workdir)
  if work.exists():
    shutil.rmtree(work)
  child = [sys.executable, "-m", "examples.grain_mnist", "--child", "--quiet",
           "--workdir", str(work), "--epochs", str(args.epochs),
           "--batch-size", str(args.batch_size), "--seed", str(args.seed),
           "--checkpoint-every-steps", str(args.checkpoint_every_steps),
           "--train-limit", str(args.train_limit)]
  if args.data_dir:
    child += ["--data-dir", args.data_dir]
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  # 1. Start the run; SIGKILL it after a mid-epoch checkpoint in epoch 2.
  proc = subprocess.Popen(child, env=env, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
  ckdir = work / "checkpoints"
  steps_per_epoch = len(_splits(args).train_labels) // args.batch_size
  target = steps_per_epoch + args.checkpoint_every_steps

  def saved():
    return sorted(int(q.name) for q in ckdir.iterdir()
                  if q.name.isdigit()) if ckdir.exists() else []

  while proc.poll() is None and not any(s >= target for s in saved()):
    time.sleep(0.2)
  killed_after = saved()
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  print(f"killed the run; checkpoints at steps {killed_after}", flush=True)
  # 2. Resume it to the end.
  out = subprocess.run(child, env=env, cwd=ROOT, capture_output=True,
                       text=True, check=True)
  line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")][-1]
  result = json.loads(line[len("RESULT "):])
  # 3. The device path's throughput for the same step.
  device_sps = device_throughput(args)
  host_sps = float(result["host_steps_per_s"][-1])  # The last: no compile.
  env_info = provenance.environment()
  results = {
      "example": "paper MNIST distillation through a grain pipeline "
                 "(shuffle, per-example jitter, batch), resumed once after "
                 "a SIGKILL",
      "command": " ".join(["python -m examples.grain_mnist"] + (argv or
                                                                 sys.argv[1:])),
      "device": env_info["device"], "environment": env_info,
      "git_commit": provenance.git_commit(str(ROOT)),
      "teacher": "shipped 784-1200-1200-10 MLP (63 test errors), online",
      "student": "784-800-800-10, T=20, alpha=0.7, nesterov SGD 0.1 cosine,"
                 " clip 5",
      "epochs": args.epochs, "batch_size": args.batch_size,
      "steps_per_epoch": steps_per_epoch,
      "killed_with_checkpoints_at_steps": killed_after,
      "resumed_from_step": max(killed_after) if killed_after else 0,
      **{k: result[k] for k in ("test_errors", "val_errors", "steps",
                                "params_sha256")},
      "throughput": {
          "host_grain_steps_per_s": host_sps,
          "device_resident_steps_per_s": device_sps,
          "host_vs_device": host_sps / device_sps,
          "note": "host: the resumed process's last epoch (its first "
                  "includes compilation); device: the second of two epochs; "
                  "same step (online teacher, jitter), the same machine "
                  "shared as it was at the time."},
      "total_seconds": round(time.perf_counter() - t_start, 1),
  }
  checkpoint.write_atomic(pathlib.Path(args.out),
                          json.dumps(results, indent=2) + "\n")
  print(json.dumps({k: results[k] for k in ("test_errors", "val_errors",
                                            "throughput")}, indent=2))
  return results


if __name__ == "__main__":
  main()
