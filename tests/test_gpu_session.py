"""experiments/mnist/gpu_session.sh, rehearsed on the CPU at a tiny budget.

The script is what a session with a lent GPU runs in its one call, so its
plumbing is checked here: data and dependency checks, the time limit that
leaves the finished rows in paper_gpu.partial.json, and the files collected
into $OUT.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "mnist" / "gpu_session.sh"


def _run(tmp_path, mnist_dir, *overrides, **env):
  full = {**os.environ, "OUT": str(tmp_path / "out"),
          "WORK": str(tmp_path / "work"), "BACKEND": "cpu",
          "KDJAX_DATA_DIR": str(mnist_dir),
          "PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}",
          **env}
  full.pop("XLA_FLAGS", None)
  return subprocess.run(["bash", str(SCRIPT), *overrides], cwd=ROOT, env=full,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_rehearsal_collects_results_into_out(tmp_path, mnist_dir):
  proc = _run(tmp_path, mnist_dir, "--config.seeds=(0,)",
              "--config.rows=('student_alone',)", "--config.teacher.epochs=1",
              "--config.teacher.eval_every=1",
              "--config.student.alone.epochs=1", BENCH_S="1")
  assert proc.returncode == 0, proc.stderr
  out = tmp_path / "out"
  assert "benchmark exit status 124" in proc.stdout  # BENCH_S=1 cut it short
  assert "paper config exit status 0" in proc.stdout
  results = json.loads((out / "paper_gpu.json").read_text())
  assert [r["name"] for r in results["rows"]] == ["teacher", "student_alone"]
  teacher = json.loads((out / "teacher_gpu.json").read_text())
  assert teacher["params_sha256"] == results["params_sha256"]["teacher"]
  for f in ("paper_gpu.md", "paper_gpu_table.png", "teacher_gpu.msgpack",
            "devices.txt", "paper.log"):
    assert (out / f).exists(), f
  assert not (out / "paper_gpu.partial.json").exists()
  assert not list(out.glob("**/checkpoints"))  # they stay in $WORK


def test_missing_data_is_named_before_anything_runs(tmp_path):
  proc = _run(tmp_path, tmp_path / "nowhere")
  assert proc.returncode == 3
  assert "no MNIST IDX files in" in proc.stderr and "make gpu-carry" in proc.stderr
  assert not (tmp_path / "out" / "paper.log").exists()
