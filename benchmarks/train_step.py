"""Benchmark: the distillation train step, kdjax against hand-written baselines.

The paper's MNIST nets (Hinton, Vinyals & Dean, 2015): a ``784-1200-1200-10``
teacher run forward only, in inference mode, and a ``784-800-800-10`` student
trained with momentum SGD (``optax.sgd(0.01, momentum=0.9)``) on the ``"kd"``
objective (``T = 20``, ``alpha = 0.1``), batch 128 by default. One run times:

==============================  ==============================================
``kdjax_online``                :func:`kdjax.loop.make_epoch_fn` over
                                ``make_train_step("kd")``, the whole epoch in
                                one ``lax.scan``, jitted with
                                ``donate_argnums=0``; online teacher.
``kdjax_cached``                the same with the teacher-logit cache
                                (:func:`kdjax.cache.with_teacher_logits`,
                                ``teacher=None``).
``kdjax_student_only``          the same with ``objective="hard"``: no teacher.
``handwritten_scan``            the baseline: a whole-epoch ``lax.scan``
                                written here with plain ``flax`` apply and
                                ``optax`` (no kdjax), same on-device data, same
                                shuffling (permutation + gather), online
                                teacher.
``python_loop``                 a Python loop calling
                                :func:`kdjax.step.jit_train_step` with
                                batches sliced from host NumPy arrays.
``torch_eager``                 PyTorch eager (teacher ``nn.Sequential`` in
                                ``eval()`` under ``no_grad``, student trained,
                                SGD with momentum, KD loss with ``T^2``), data
                                on the device; only if ``import torch`` works,
                                else ``null``.
==============================  ==============================================

Goals:

* ``kdjax_online >= 1.0 x handwritten_scan`` (kdjax's abstractions are free);
* ``kdjax_cached >= 0.9 x kdjax_student_only`` (with the cache, distillation
  costs about as much as training the student alone);
* on a GPU, at batch 128: ``kdjax_online >= 10,000`` steps/s and
  ``>= 20 x torch_eager``.

The ``mesh`` section (``--mesh-steps``, :mod:`benchmarks._mesh`, run in a
subprocess with ``--mesh-devices`` virtual CPU devices) compiles and times
the same kd epoch on one device, data parallel over all devices and FSDP
over all devices: compile time and step time against one device. On a CPU
the virtual devices share the host's cores, so it measures the mesh's
**overhead**, not a speed-up.

Method: every implementation is compiled and warmed up first (one untimed
epoch, or a few steps for the Python loop). A timed round is one epoch
truncated to ``--epochs-steps`` steps (the epoch functions are built with
``num_examples = steps * batch_size``, so the epoch is exactly that many
steps), ended by ``block_until_ready``. Rounds are interleaved round-robin
across implementations (A B C ... A B C ...), ``--repeats`` times, so machine
noise (this may run on a shared machine) hits all of them equally; the
reported steps/s are medians over rounds, and the ratios are ratios of those
medians; ``paired_ratios`` are the medians of the per-round ratios (rounds of
two implementations are adjacent in time, so these resist slow drifts of the
load). ``cost_analysis_per_step`` holds XLA's deterministic flop and byte
counts, which do not depend on the load at all. The teacher's parameters are
a random initialisation: only the throughput matters here.

A sanity check compares the student's parameters after the warm-up epoch of
``kdjax_online`` and ``handwritten_scan``, which start from the same
parameters and see the same batch order: they must agree to float32
round-off, so the baseline computes the same thing.

The ``memory`` section holds the compiled memory analysis of one jitted kd
train step (``jax.jit(step).lower(...).compile().memory_analysis()``; may be
``None`` on some backends) and of each compiled epoch, and an analytic
breakdown in bytes (see :func:`analytic_memory` for the formulas).

Usage::

  python benchmarks/train_step.py --backend cpu|gpu --batch-size 128 \\
      --json benchmarks/results/train_step_cpu.json [--epochs-steps 390] \\
      [--repeats 3]

``--backend`` sets ``JAX_PLATFORMS`` (``cpu`` or ``cuda``) before JAX is
imported. Real MNIST is used when
:func:`kdjax.paper.data.load_mnist_splits` finds it (``KDJAX_DATA_DIR``);
otherwise random ``uint8`` images of the same shape (``[50000, 28, 28]``)
and random labels (``"data": "random"`` in the JSON).
Neither TensorFlow nor PyTorch is needed.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time
from typing import Any, Callable, Optional

_BACKENDS = {"cpu": "cpu", "gpu": "cuda"}


def _parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--backend", choices=sorted(_BACKENDS), default=None,
                      help="sets JAX_PLATFORMS before JAX is imported "
                      "(default: JAX's own choice)")
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--json", type=pathlib.Path, default=None,
                      help="write the results as JSON to this path")
  parser.add_argument("--epochs-steps", type=int, default=None,
                      help="steps per timed epoch (default: one full epoch, "
                      "num_train // batch_size, i.e. 390 at batch 128)")
  parser.add_argument("--repeats", type=int, default=3,
                      help="interleaved timed rounds per implementation")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--fit-steps", type=int, default=100,
                      help="steps per epoch of the fit-path section's MLP "
                      "runs (0: skip the section)")
  parser.add_argument("--fit-cnn-steps", type=int, default=20,
                      help="steps per epoch of its CNN runs")
  parser.add_argument("--mesh-steps", type=int, default=20,
                      help="steps per epoch of the mesh section (8 devices "
                      "vs 1, benchmarks/_mesh.py; 0: skip it)")
  parser.add_argument("--mesh-devices", type=int, default=8,
                      help="virtual CPU devices of the mesh section (on "
                      "GPU/TPU: the devices there are)")
  return parser.parse_args(argv)


if __name__ == "__main__":
  _ARGS = _parse_args()
  if _ARGS.backend is not None:
    os.environ["JAX_PLATFORMS"] = _BACKENDS[_ARGS.backend]

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from kdjax import cache
from kdjax import loop
from kdjax.paper import models
from kdjax.paper import provenance
from kdjax import step as step_lib
from _common import compiled_memory, write_results  # benchmarks/ is sys.path[0]
import _fit_paths  # benchmarks/ is sys.path[0]
from kdjax.teacher import Teacher
# pylint: enable=g-import-not-at-top,wrong-import-position

TEMPERATURE = 20.0
ALPHA = 0.1
LEARNING_RATE = 0.01
MOMENTUM = 0.9
TEACHER_HIDDEN = (1200, 1200)
STUDENT_HIDDEN = (800, 800)
NUM_CLASSES = 10
NUM_PIXELS = 28 * 28
NUM_TRAIN = 50_000
PYTHON_LOOP_WARMUP_STEPS = 5

GOALS = {
    "online_vs_handwritten_min": 1.0,
    "cached_vs_student_only_min": 0.9,
    "gpu_online_steps_per_s_min": 10_000,
    "gpu_online_vs_torch_min": 20.0,
}

IMPLS = ("kdjax_online", "kdjax_cached", "kdjax_student_only",
         "handwritten_scan", "python_loop", "torch_eager")


# ----------------------------------------------------------------------------
# Data and models.
# ----------------------------------------------------------------------------


def load_data(seed: int) -> tuple[np.ndarray, np.ndarray, str, Optional[str]]:
  """The 50k MNIST training images (uint8) and labels, or random stand-ins.

  Returns:
    ``(images [50000, 28, 28] uint8, labels [50000] int32, kind, note)`` with
    ``kind`` ``'mnist'`` or ``'random'`` and ``note`` saying why random data
    was used (None for MNIST).
  """
  try:
    from kdjax.paper import data as kdata  # pylint: disable=g-import-not-at-top
    splits = kdata.load_mnist_splits(as_float=False)
    images = np.asarray(splits.train_images, np.uint8)
    labels = np.asarray(splits.train_labels, np.int32)
    return images, labels, "mnist", None
  except Exception as e:  # pylint: disable=broad-except
    note = (f"MNIST not loaded ({type(e).__name__}: {e}); random uint8 "
            "images and labels of the same shape")
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (NUM_TRAIN, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, NUM_CLASSES, (NUM_TRAIN,), dtype=np.int32)
    return images, labels, "random", note


def copy_tree(tree):
  """A fresh device copy (the epoch functions donate their state)."""
  return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


# ----------------------------------------------------------------------------
# The hand-written baseline (no kdjax).
# ----------------------------------------------------------------------------


def make_handwritten_epoch(teacher_module, student_module, tx, *,
                           batch_size: int, num_examples: int) -> Callable:
  """A whole epoch as one ``lax.scan``, written with plain flax and optax.

  ``epoch((params, opt_state), teacher_params, data, rng, epoch_index) ->
  ((params, opt_state), mean_loss)``. The batch order is a permutation keyed
  like :func:`kdjax.loop.epoch_key`, so it matches kdjax's order exactly.
  """
  steps = num_examples // batch_size
  t = TEMPERATURE

  def loss_fn(params, t_logits, x, y):
    s_logits = student_module.apply({"params": params}, x)
    hard = optax.losses.softmax_cross_entropy_with_integer_labels(s_logits, y)
    soft = optax.losses.kl_divergence_with_log_targets(
        jax.nn.log_softmax(s_logits / t), jax.nn.log_softmax(t_logits / t))
    return jnp.mean(ALPHA * hard + (1.0 - ALPHA) * t**2 * soft)

  def epoch(carry, teacher_params, data, rng, epoch_index):
    key = jax.random.fold_in(jax.random.fold_in(rng, 0x5EED), epoch_index)
    perm = jax.random.permutation(key, num_examples)
    order = perm[:steps * batch_size].reshape(steps, batch_size)

    def body(carry, idx):
      params, opt_state = carry
      x = data["image"][idx].astype(jnp.float32) / 255.0
      y = data["label"][idx]
      t_logits = teacher_module.apply({"params": teacher_params}, x,
                                      train=False)
      loss, grads = jax.value_and_grad(loss_fn)(params, t_logits, x, y)
      updates, opt_state = tx.update(grads, opt_state, params)
      params = optax.apply_updates(params, updates)
      return (params, opt_state), loss

    carry, step_losses = jax.lax.scan(body, carry, order)
    return carry, jnp.mean(step_losses)

  return epoch


# ----------------------------------------------------------------------------
# PyTorch eager (optional).
# ----------------------------------------------------------------------------


def make_torch_runner(backend: Optional[str], images: np.ndarray,
                      labels: np.ndarray, teacher_params, student_params, *,
                      batch_size: int, steps: int,
                      seed: int) -> Optional[tuple[Callable[[], float], str]]:
  """``(run_epoch, device)`` for PyTorch eager, or None without torch.

  ``run_epoch()`` trains ``steps`` steps and returns the seconds taken. The
  nets start from the same parameters as the JAX ones (kernels transposed).
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from torch import nn  # pylint: disable=g-import-not-at-top
    # pylint: disable-next=g-import-not-at-top,invalid-name
    import torch.nn.functional as F
  except Exception:  # pylint: disable=broad-except
    return None
  torch.manual_seed(seed)
  use_cuda = backend == "gpu" and torch.cuda.is_available()
  dev = torch.device("cuda" if use_cuda else "cpu")

  def build(params, hidden):
    layers, names, fan_in = [nn.Flatten()], [], NUM_PIXELS
    for i, width in enumerate(hidden):
      layers += [nn.Linear(fan_in, width), nn.ReLU()]
      names.append(f"hidden_{i}")
      fan_in = width
    layers.append(nn.Linear(fan_in, NUM_CLASSES))
    names.append("logits")
    net = nn.Sequential(*layers)
    linears = [m for m in net if isinstance(m, nn.Linear)]
    with torch.no_grad():
      for lin, name in zip(linears, names):
        p = jax.device_get(params[name])
        lin.weight.copy_(torch.from_numpy(np.array(p["kernel"]).T))
        lin.bias.copy_(torch.from_numpy(np.array(p["bias"])))
    return net.to(dev)

  teacher = build(teacher_params, TEACHER_HIDDEN).eval()
  for p in teacher.parameters():
    p.requires_grad_(False)
  student = build(student_params, STUDENT_HIDDEN).train()
  opt = torch.optim.SGD(student.parameters(), lr=LEARNING_RATE,
                        momentum=MOMENTUM)
  x_all = torch.from_numpy(images).to(dev)
  y_all = torch.from_numpy(labels.astype(np.int64)).to(dev)
  n = steps * batch_size
  t = TEMPERATURE

  def sync():
    if use_cuda:
      torch.cuda.synchronize()

  def run_epoch() -> float:
    sync()
    t0 = time.perf_counter()
    order = torch.randperm(n, device=dev).view(steps, batch_size)
    for i in range(steps):
      idx = order[i]
      x = x_all[idx].float().div_(255.0)
      y = y_all[idx]
      with torch.no_grad():
        t_logits = teacher(x)
      s_logits = student(x)
      hard = F.cross_entropy(s_logits, y)
      soft = F.kl_div(F.log_softmax(s_logits / t, dim=-1),
                      F.log_softmax(t_logits / t, dim=-1),
                      reduction="batchmean", log_target=True)
      loss = ALPHA * hard + (1.0 - ALPHA) * t**2 * soft
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
    sync()
    return time.perf_counter() - t0

  return run_epoch, str(dev)


# ----------------------------------------------------------------------------
# Memory.
# ----------------------------------------------------------------------------


def compiled_cost(compiled) -> Optional[dict[str, Optional[float]]]:
  """``flops`` and ``bytes accessed`` from ``compiled.cost_analysis()``.

  Deterministic (unlike timings on a loaded machine). XLA counts a
  ``lax.scan`` body once, so for an epoch these are about one step's worth.
  """
  try:
    c = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(c, (list, tuple)):
    c = c[0] if c else None
  if not c:
    return None
  return {k: (float(c[k]) if c.get(k) is not None else None)
          for k in ("flops", "bytes accessed", "transcendentals")}


def analytic_memory(teacher_params, student_params, *, batch_size: int,
                    num_examples: int) -> dict[str, Any]:
  """An analytic breakdown (float32 everywhere) of a kd step's memory."""
  f32 = 4
  teacher_n = models.count_params(teacher_params)
  student_n = models.count_params(student_params)
  sum_t = NUM_PIXELS + sum(TEACHER_HIDDEN) + NUM_CLASSES
  sum_s = NUM_PIXELS + sum(STUDENT_HIDDEN) + NUM_CLASSES
  breakdown = {
      "teacher_params": teacher_n * f32,
      "student_params": student_n * f32,
      "optimizer_state": student_n * f32,  # The momentum trace.
      "gradients": student_n * f32,
      "activations_estimate": batch_size * f32 * (2 * sum_s + sum_t),
      "batch": batch_size * (NUM_PIXELS + 4),
  }
  breakdown["step_total_estimate"] = sum(breakdown.values())
  return {
      "bytes": breakdown,
      "teacher_param_count": teacher_n,
      "student_param_count": student_n,
      "dataset_on_device_bytes": {
          "images_uint8": num_examples * NUM_PIXELS,
          "labels_int32": num_examples * 4,
          "teacher_logits_float32_cache": num_examples * NUM_CLASSES * f32,
      },
      "formulas": {
          "params": "4 bytes x parameter count (float32)",
          "optimizer_state": "momentum SGD: one trace of the student's size",
          "gradients": "the student's size",
          "activations_estimate":
              f"batch x 4 bytes x (2 x sum(student widths) + 1 x "
              f"sum(teacher widths)) = {batch_size} x 4 x (2 x {sum_s} + "
              f"{sum_t}); student widths 784+800+800+10 counted twice "
              "(forward values kept for the backward pass, plus their "
              "gradients), teacher widths 784+1200+1200+10 once (forward "
              "only, nothing kept for a backward pass)",
          "batch": "batch x (784 uint8 pixels + 4-byte label)",
      },
  }


# ----------------------------------------------------------------------------
# Timing.
# ----------------------------------------------------------------------------


def _block(tree):
  jax.tree.map(lambda a: a.block_until_ready(), tree)
  return tree


class ScanRunner:
  """Runs a compiled whole-epoch function on a donated, carried state."""

  def __init__(self, compiled, state, static_args: tuple, rng):
    self.compiled = compiled
    self.state = state
    self.static_args = static_args  # (teacher, data) or (teacher_params, data)
    self.rng = rng
    self.epoch = 0

  def run(self) -> float:
    """One epoch; returns the seconds it took (dispatch to ready)."""
    epoch_index = jnp.asarray(self.epoch, jnp.int32)
    _block(epoch_index)
    t0 = time.perf_counter()
    self.state, metrics = self.compiled(self.state, *self.static_args,
                                        self.rng, epoch_index)
    _block((self.state, metrics))
    dt = time.perf_counter() - t0
    self.epoch += 1
    return dt


class FnRunner:
  """Wraps a ``run() -> seconds`` function (PyTorch eager)."""

  def __init__(self, fn: Callable[[], float]):
    self.run = fn


class PythonLoopRunner:
  """A Python loop over host-sliced batches calling a jitted kdjax step."""

  def __init__(self, step, state, teacher, images, labels, *, batch_size,
               steps, rng, seed):
    self.step, self.state, self.teacher = step, state, teacher
    self.images, self.labels = images, labels
    self.batch_size, self.steps, self.rng = batch_size, steps, rng
    self.np_rng = np.random.default_rng(seed)

  def run(self, steps: Optional[int] = None) -> float:
    steps = self.steps if steps is None else steps
    n = self.steps * self.batch_size
    t0 = time.perf_counter()
    order = self.np_rng.permutation(n)[:steps * self.batch_size]
    metrics = None
    for i in range(steps):
      idx = order[i * self.batch_size:(i + 1) * self.batch_size]
      batch = {"image": self.images[idx], "label": self.labels[idx]}
      self.state, metrics = self.step(self.state, self.teacher, batch,
                                      self.rng)
    _block((self.state, metrics))
    return time.perf_counter() - t0


def max_abs_diff(a, b) -> float:
  diffs = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), a, b)
  return max(jax.tree.leaves(diffs))


# ----------------------------------------------------------------------------
# Main.
# ----------------------------------------------------------------------------


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
  return None if a is None or b is None or b == 0 else a / b


def _paired(times: dict[str, list[float]], a: str,
            b: str) -> Optional[float]:
  """Median over rounds of speed(a) / speed(b) = time(b) / time(a)."""
  if a not in times or b not in times:
    return None
  return statistics.median(tb / ta for ta, tb in zip(times[a], times[b]))


def main(args: argparse.Namespace) -> int:
  bs = args.batch_size
  images, labels, data_kind, data_note = load_data(args.seed)
  max_steps = images.shape[0] // bs
  steps = max_steps if args.epochs_steps is None else args.epochs_steps
  if not 0 < steps <= max_steps:
    raise SystemExit(f"--epochs-steps must lie in [1, {max_steps}] at batch "
                     f"{bs} ({images.shape[0]} examples), got {steps}.")
  n = steps * bs
  images, labels = images[:n], labels[:n]
  print(f"backend {jax.default_backend()} ({provenance.device_description()})"
        f", data {data_kind}, batch {bs}, {steps} steps per timed epoch, "
        f"{args.repeats} interleaved repeats", flush=True)

  # Models, parameters and the device-resident transfer set.
  rng = jax.random.key(args.seed)
  k_teacher, k_student, k_run = jax.random.split(rng, 3)
  teacher_module = models.paper_teacher()
  student_module = models.paper_student(STUDENT_HIDDEN[0])
  teacher_params = models.init_params(teacher_module, k_teacher, (1, 28, 28))
  student_params = models.init_params(student_module, k_student, (1, 28, 28))
  teacher = Teacher.from_linen(teacher_module, {"params": teacher_params})
  tx = optax.sgd(LEARNING_RATE, momentum=MOMENTUM)
  student_apply = models.linen_student_apply(student_module)

  def new_state():
    return step_lib.TrainState.create(
        apply_fn=student_apply, params=copy_tree(student_params), tx=tx,
        temperature=TEMPERATURE, alpha=ALPHA)

  data = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
  data_cached = cache.with_teacher_logits(data, teacher)
  _block((data, data_cached))

  # Compile everything ahead of time (the memory analysis comes for free).
  memory: dict[str, Any] = {}
  runners: dict[str, Any] = {}
  compile_s: dict[str, float] = {}
  costs: dict[str, Any] = {}
  scan_specs = {
      "kdjax_online": ("kd", teacher, data),
      "kdjax_cached": ("kd", None, data_cached),
      "kdjax_student_only": ("hard", None, data),
  }
  for name, (objective, t_arg, d_arg) in scan_specs.items():
    t0 = time.perf_counter()
    epoch_fn = loop.make_epoch_fn(step_lib.make_train_step(objective),
                                   batch_size=bs, num_examples=n)
    state = new_state()
    compiled = jax.jit(epoch_fn, donate_argnums=0).lower(
        state, t_arg, d_arg, k_run, jnp.int32(0)).compile()
    compile_s[name] = time.perf_counter() - t0
    memory[name] = compiled_memory(compiled)
    costs[name] = compiled_cost(compiled)
    runners[name] = ScanRunner(compiled, state, (t_arg, d_arg), k_run)

  t0 = time.perf_counter()
  hw_epoch = make_handwritten_epoch(teacher_module, student_module, tx,
                                    batch_size=bs, num_examples=n)
  hw_params = copy_tree(student_params)
  hw_carry = (hw_params, tx.init(hw_params))
  hw_teacher_params = copy_tree(teacher_params)
  compiled = jax.jit(hw_epoch, donate_argnums=0).lower(
      hw_carry, hw_teacher_params, data, k_run, jnp.int32(0)).compile()
  compile_s["handwritten_scan"] = time.perf_counter() - t0
  memory["handwritten_scan"] = compiled_memory(compiled)
  costs["handwritten_scan"] = compiled_cost(compiled)
  runners["handwritten_scan"] = ScanRunner(compiled, hw_carry,
                                           (hw_teacher_params, data), k_run)

  # One compiled kd train step (online teacher) for the memory section.
  step_batch = {"image": data["image"][:bs], "label": data["label"][:bs]}
  step_compiled = jax.jit(step_lib.make_train_step("kd"),
                          donate_argnums=0).lower(
                              new_state(), teacher, step_batch,
                              k_run).compile()
  kd_step_memory = compiled_memory(step_compiled)
  costs["kd_train_step"] = compiled_cost(step_compiled)

  runners["python_loop"] = PythonLoopRunner(
      step_lib.jit_train_step("kd"), new_state(), teacher, images, labels,
      batch_size=bs, steps=steps, rng=k_run, seed=args.seed)

  torch_device = None
  torch_runner = make_torch_runner(
      args.backend, images, labels, teacher_params, student_params,
      batch_size=bs, steps=steps, seed=args.seed)
  if torch_runner is not None:
    torch_run, torch_device = torch_runner
    runners["torch_eager"] = FnRunner(torch_run)

  # Warm-up: one untimed epoch for the scan runners and torch, a few steps
  # (including the compile) for the Python loop.
  warmup_s: dict[str, float] = {}
  for name, runner in runners.items():
    if name == "python_loop":
      warmup_s[name] = runner.run(min(PYTHON_LOOP_WARMUP_STEPS, steps))
    else:
      warmup_s[name] = runner.run()
    print(f"  warm-up {name}: {warmup_s[name]:.2f} s", flush=True)

  # Sanity: kdjax and the hand-written scan computed the same epoch.
  sanity_diff = max_abs_diff(runners["kdjax_online"].state.params,
                             runners["handwritten_scan"].state[0])

  # Timed rounds, interleaved round-robin.
  times = {name: [] for name in runners}
  for r in range(args.repeats):
    for name, runner in runners.items():
      times[name].append(runner.run())
    print(f"  round {r + 1}/{args.repeats}: " + ", ".join(
        f"{k} {steps / v[-1]:.1f}" for k, v in times.items()) + " steps/s",
          flush=True)

  sps = {name: None for name in IMPLS}
  for name, ts in times.items():
    sps[name] = steps / statistics.median(ts)
  ratios = {
      "online_vs_handwritten": _ratio(sps["kdjax_online"],
                                      sps["handwritten_scan"]),
      "cached_vs_student_only": _ratio(sps["kdjax_cached"],
                                       sps["kdjax_student_only"]),
      "online_vs_torch": _ratio(sps["kdjax_online"], sps["torch_eager"]),
      "online_vs_python_loop": _ratio(sps["kdjax_online"],
                                      sps["python_loop"]),
  }
  # Medians of per-round ratios: the rounds of two implementations are
  # adjacent in time, so these are robust to slow drifts of the machine load.
  paired = {
      "online_vs_handwritten": _paired(times, "kdjax_online",
                                       "handwritten_scan"),
      "cached_vs_student_only": _paired(times, "kdjax_cached",
                                        "kdjax_student_only"),
      "online_vs_torch": _paired(times, "kdjax_online", "torch_eager"),
      "online_vs_python_loop": _paired(times, "kdjax_online", "python_loop"),
  }
  on_gpu = jax.default_backend() == "gpu"
  goals_met = {
      "online_vs_handwritten": ratios["online_vs_handwritten"]
                               >= GOALS["online_vs_handwritten_min"],
      "cached_vs_student_only": ratios["cached_vs_student_only"]
                                >= GOALS["cached_vs_student_only_min"],
      "gpu_online_steps_per_s": (sps["kdjax_online"]
                                 >= GOALS["gpu_online_steps_per_s_min"])
                                if on_gpu else None,
      "gpu_online_vs_torch": (None if not on_gpu
                              or ratios["online_vs_torch"] is None else
                              ratios["online_vs_torch"]
                              >= GOALS["gpu_online_vs_torch_min"]),
  }

  env = provenance.environment()
  results = {
      "benchmark": "kd train step: kdjax vs hand-written scan, Python loop "
                   "and PyTorch eager (paper MNIST MLPs)",
      "backend": args.backend or jax.default_backend(),
      "jax_backend": jax.default_backend(),
      "device": provenance.device_description(),
      "batch_size": bs,
      "steps_per_timed_epoch": steps,
      "repeats": args.repeats,
      "jax_version": jax.__version__,
      "flax_version": env["flax_version"],
      "optax_version": env["optax_version"],
      "python": env["python"],
      "git_commit": provenance.git_commit(
          str(pathlib.Path(__file__).resolve().parents[1])),
      "command": " ".join(sys.argv),
      "data": data_kind,
      "data_note": data_note,
      "num_examples": n,
      "teacher": "784-1200-1200-10, random init, eval mode, forward only",
      "student": "784-800-800-10, optax.sgd(0.01, momentum=0.9)",
      "objective": {"name": "kd", "temperature": TEMPERATURE, "alpha": ALPHA},
      "torch_device": torch_device,
      **{f"{name}_steps_per_s": sps[name] for name in IMPLS},
      **ratios,
      "paired_ratios": paired,
      "goals": GOALS,
      "goals_met": goals_met,
      "sanity_max_abs_param_diff_online_vs_handwritten": sanity_diff,
      "cost_analysis_per_step": costs,
      "round_seconds": times,
      "warmup_seconds": warmup_s,
      "compile_seconds": compile_s,
      "memory": {
          "compiled_kd_train_step": kd_step_memory,
          "compiled_epochs": memory,
          "analytic": analytic_memory(teacher_params, student_params,
                                      batch_size=bs, num_examples=n),
      },
  }

  # Human-readable summary.
  hw = sps["handwritten_scan"]
  print(f"\n{'implementation':<22} {'steps/s':>10} {'ms/step':>9} "
        f"{'vs handwritten':>15}")
  print("-" * 59)
  for name in IMPLS:
    v = sps[name]
    if v is None:
      print(f"{name:<22} {'n/a':>10} {'n/a':>9} {'n/a':>15}")
    else:
      print(f"{name:<22} {v:>10.1f} {1e3 / v:>9.2f} {v / hw:>14.3f}x")
  for k in ("online_vs_handwritten", "cached_vs_student_only",
            "online_vs_torch"):
    v, pv = ratios[k], paired[k]
    print(f"{k}: {'n/a' if v is None else f'{v:.3f}'} (median of per-round "
          f"ratios: {'n/a' if pv is None else f'{pv:.3f}'})")
  mem = kd_step_memory or {}
  peak = mem.get("peak_memory_in_bytes")
  bound = mem.get("argument_plus_output_plus_temp_minus_alias")
  mib = lambda b: "n/a" if b is None else f"{b / 2**20:.2f} MiB"
  analytic = results["memory"]["analytic"]["bytes"]["step_total_estimate"]
  print(f"compiled kd step memory: peak {mib(peak)}, argument + output + "
        f"temp - alias {mib(bound)}; analytic estimate {mib(analytic)}")
  print(f"sanity: max |params_kdjax - params_handwritten| after one epoch = "
        f"{sanity_diff:.2e}")

  if args.fit_steps:
    print("fit paths (host vs device; the CNN's chosen form) ...", flush=True)
    results["fit_paths"] = _fit_paths.run(
        images, labels, teacher=teacher, batch_size=bs,
        steps=min(args.fit_steps, steps), cnn_steps=args.fit_cnn_steps,
        repeats=args.repeats)
    fp = results["fit_paths"]
    print(f"fit: host/device {fp['host_vs_device']:.3f} (goal 0.95), CNN "
          f"auto ({fp['cnn_auto_chose']}) / best {fp['cnn_auto_vs_best']:.3f}"
          f" (goal 0.9), CNN steps/scan {fp['cnn_steps_vs_scan']:.2f}",
          flush=True)
  if args.mesh_steps:
    print("mesh (8 devices vs 1; on a CPU: overhead, not speed-up) ...",
          flush=True)
    results["mesh"] = run_mesh_section(args)
    m = results["mesh"]
    print(f"mesh: {m['devices']} devices, step time vs one device "
          f"{m['step_time_vs_one_device']}, compile time vs one device "
          f"{m['compile_time_vs_one_device']}", flush=True)
  write_results(args.json, results)
  return 0


def run_mesh_section(args: argparse.Namespace) -> dict:
  """benchmarks/_mesh.py in a subprocess (its own device count)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  script = pathlib.Path(__file__).with_name("_mesh.py")
  with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(tmp) / "mesh.json"
    argv = [sys.executable, str(script), "--devices", str(args.mesh_devices),
            "--steps", str(args.mesh_steps), "--repeats", str(args.repeats),
            "--batch-size", str(args.batch_size), "--json", str(out)]
    if args.backend is not None:
      argv += ["--backend", _BACKENDS[args.backend]]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


if __name__ == "__main__":
  sys.exit(main(_ARGS))
