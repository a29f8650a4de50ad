"""The mesh section of ``benchmarks/train_step.py``: 8 devices against 1.

The paper's kd step (teacher 784-1200-1200-10 forward, student
784-800-800-10, momentum SGD, T = 20, alpha = 0.1, online teacher), one
whole-epoch ``lax.scan`` as :func:`kdjax.fit` compiles it
(:func:`kdjax.loop.make_epoch_fn` with a :class:`kdjax.mesh.Plan`), on

* ``one_device``: a one-device mesh (what ``fit`` does on one device);
* ``data_parallel``: every device on the ``"data"`` axis (``fit``'s default);
* ``fsdp``: every device on the ``"fsdp"`` axis (params, momentum and the
  teacher sharded).

For each: the compile time (``lower().compile()``, seconds), the steady
step time (median over ``repeats`` interleaved epochs of ``steps`` steps,
after a warm-up epoch), and XLA's cost analysis per device.

**What this measures on a CPU.** With ``--backend cpu`` the devices are
``--xla_force_host_platform_device_count=8`` virtual devices that share the
machine's cores (2 on the machine of the committed run): 8 devices do the
same arithmetic as 1, split 8 ways, plus the all-reduces, so the ratios
measure the **overhead** of the mesh (partitioned program, collectives,
more dispatch), not a speed-up. A speed-up needs devices with their own
compute (GPUs, TPUs, or many CPU cores: see
``experiments/mnist/gpu_session.sh``).

Run by ``train_step.py --mesh-steps N`` in a subprocess (the device count
is fixed when JAX starts, and the other sections keep one device), or
alone::

  python benchmarks/_mesh.py --devices 8 --steps 50 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import sys
import time


def _parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--devices", type=int, default=8,
                 help="virtual CPU devices (CPU backend only)")
  p.add_argument("--backend", default=None,
                 help="JAX_PLATFORMS (cpu, cuda); default JAX's choice")
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--json", type=pathlib.Path, default=None)
  return p.parse_args(argv)


if __name__ == "__main__":
  _ARGS = _parse_args()
  if _ARGS.backend:
    os.environ["JAX_PLATFORMS"] = _ARGS.backend
  if (_ARGS.backend or "cpu") == "cpu":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count="
                               f"{_ARGS.devices}").strip()

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from kdjax import loop  # noqa: E402
from kdjax.paper import models, provenance  # noqa: E402
from kdjax import step as step_lib  # noqa: E402
from kdjax import mesh as mesh_lib  # noqa: E402
from kdjax.teacher import Teacher  # noqa: E402
# pylint: enable=g-import-not-at-top,wrong-import-position


def _cost(compiled):
  try:
    c = compiled.cost_analysis()
    c = c[0] if isinstance(c, (list, tuple)) else c
    return {"flops": c.get("flops"), "bytes_accessed": c.get(
        "bytes accessed")}
  except Exception:  # pylint: disable=broad-except
    return None


def _setup(batch_size: int, steps: int):
  n = batch_size * steps
  rs = np.random.RandomState(0)
  data = {"image": rs.randint(0, 256, (n, 28, 28)).astype(np.uint8),
          "label": rs.randint(0, 10, (n,)).astype(np.int32)}
  tnet, snet = models.paper_teacher(), models.paper_student(800)
  teacher = Teacher.from_linen(tnet, {"params": models.init_params(
      tnet, jax.random.key(1), (1, 28, 28))})
  params = models.init_params(snet, jax.random.key(2), (1, 28, 28))

  def state():
    return step_lib.TrainState.create(
        apply_fn=models.linen_student_apply(snet), params=params,
        tx=optax.sgd(0.01, momentum=0.9), temperature=20.0, alpha=0.1)
  return data, teacher, state


def run(*, batch_size: int, steps: int, repeats: int) -> dict:
  """The section's results (see the module docstring)."""
  data, teacher, state = _setup(batch_size, steps)
  devices = jax.devices()
  meshes = {"one_device": mesh_lib.make_mesh(devices=devices[:1]),
            "data_parallel": mesh_lib.make_mesh(),
            "fsdp": mesh_lib.make_mesh(fsdp=-1)}
  step = step_lib.make_train_step("kd")
  compile_s, costs, runs = {}, {}, {}
  for name, mesh in meshes.items():
    plan = mesh_lib.plan(mesh)
    fn = loop.make_epoch_fn(step, batch_size=batch_size,
                             num_examples=batch_size * steps,
                             plan=None if plan.trivial else plan)
    args = [plan.place_state(state()) if not plan.trivial else state(),
            plan.place_teacher(teacher), plan.place_data(data),
            plan.place_rng(jax.random.key(0))]
    t0 = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=0).lower(*args, 0).compile()
    compile_s[name] = time.perf_counter() - t0
    costs[name] = _cost(compiled)
    runs[name] = [compiled, args]
  times = {name: [] for name in runs}
  for r in range(repeats + 1):  # Round 0 is the warm-up.
    for name, (compiled, args) in runs.items():
      t0 = time.perf_counter()
      args[0], metrics = compiled(*args, r)
      jax.block_until_ready(args[0])
      if r:
        times[name].append((time.perf_counter() - t0) / steps)
  ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
  return {
      "devices": len(devices), "device": provenance.device_description(),
      "backend": jax.default_backend(), "batch_size": batch_size,
      "steps_per_epoch": steps, "repeats": repeats,
      "note": ("virtual CPU devices share the host's cores: the ratios "
               "measure the mesh's overhead, not a speed-up")
              if jax.default_backend() == "cpu" else None,
      "compile_seconds": compile_s,
      "step_ms": ms,
      "step_ms_rounds": {k: [1e3 * t for t in v] for k, v in times.items()},
      "step_time_vs_one_device": {k: ms[k] / ms["one_device"] for k in ms},
      "compile_time_vs_one_device": {
          k: compile_s[k] / compile_s["one_device"] for k in compile_s},
      "cost_analysis_per_step_epoch": costs,
  }


if __name__ == "__main__":
  out = run(batch_size=_ARGS.batch_size, steps=_ARGS.steps,
            repeats=_ARGS.repeats)
  out["command"] = "python " + " ".join(sys.argv)
  out["git_commit"] = provenance.git_commit(
      str(pathlib.Path(__file__).resolve().parents[1]))
  out["environment"] = provenance.environment()
  out["machine_note"] = os.environ.get("KDJAX_BENCH_NOTE")
  text = json.dumps(out, indent=2)
  if _ARGS.json:
    _ARGS.json.parent.mkdir(parents=True, exist_ok=True)
    _ARGS.json.write_text(text + "\n")
  print(text, flush=True)
