"""experiments/mnist/gpu_session.sh, rehearsed on the CPU at a tiny budget.

The script is what a session with a lent GPU runs in its one call, so its
plumbing is checked here: the data check, the files collected into $OUT, the
exit status, and that results left in $WORK by an earlier run never pass
for this run's. (That an interrupted run keeps its finished rows in
results.partial.json is tested in test_pipeline_rows.py.)
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
          "KDJAX_DATA_DIR": str(mnist_dir), "RUNS": "paper",
          "PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}",
          "SPECIALISTS_S": "0", **env}
  full.pop("XLA_FLAGS", None)
  return subprocess.run(["bash", str(SCRIPT), *overrides], cwd=ROOT, env=full,
                        capture_output=True, text=True, timeout=600)


@pytest.mark.integration
def test_rehearsal_collects_results_into_out(tmp_path, mnist_dir):
  proc = _run(tmp_path, mnist_dir, "--config.seeds=(0,)",
              "--config.rows=('student_alone',)", "--config.teacher.epochs=1",
              "--config.teacher.eval_every=1",
              "--config.student.alone.epochs=1", BENCH_S="1", MESH_S="1")
  assert proc.returncode == 0, proc.stderr
  out = tmp_path / "out"
  assert "benchmark exit status 124" in proc.stdout  # BENCH_S=1 cut it short
  assert "mesh benchmark exit status 124" in proc.stdout  # MESH_S=1 too
  assert (out / "mesh.log").exists()
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


@pytest.mark.integration
def test_missing_data_is_named_before_anything_runs(tmp_path):
  proc = _run(tmp_path, tmp_path / "nowhere")
  assert proc.returncode == 3
  assert "no MNIST IDX files in" in proc.stderr
  assert "make gpu-carry" in proc.stderr
  assert not (tmp_path / "out" / "paper.log").exists()


@pytest.mark.integration
def test_an_unknown_run_is_named_before_anything_runs(tmp_path, mnist_dir):
  proc = _run(tmp_path, mnist_dir, RUNS="paper ensembel")
  assert proc.returncode == 3
  assert "unknown run 'ensembel'" in proc.stderr
  assert not (tmp_path / "out").exists()


# The ensemble run's overrides: configs/ensemble_gpu.py cut to a few
# examples (tests/test_ensemble.py's smoke settings).
_ENSEMBLE_TINY = " ".join([
    "--config.batch_size=100", "--config.ensemble.num_members=2",
    "--config.ensemble.width=8", "--config.ensemble.epochs=1",
    "--config.ensemble.num_train=200", "--config.ensemble.num_eval=100",
    "--config.ensemble.regimes=((2,0.0,0.0),)",
    "--config.ensemble.grid_temperatures=(4.0,)",
    "--config.ensemble.grid_alphas=(0.1,)",
    "--config.ensemble.seeds=(0,1)", "--config.ensemble.coverage.part=120",
    "--config.ensemble.bootstrap_samples=10"])


@pytest.mark.integration
def test_rehearsal_of_the_ensemble_run(tmp_path, mnist_dir):
  proc = _run(tmp_path, mnist_dir, RUNS="ensemble", BENCH_S="1", MESH_S="1",
              ENSEMBLE_ARGS=_ENSEMBLE_TINY)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "ensemble config exit status 0" in proc.stdout
  out = tmp_path / "out"
  results = json.loads((out / "ensemble_gpu.json").read_text())
  assert results["config"]["ensemble"]["width"] == 8
  assert "coverage_distilled" in results["analysis"]
  for f in ("ensemble_gpu.md", "ensemble_gpu.png", "ensemble.log"):
    assert (out / f).exists(), f
  assert not (out / "paper.log").exists()


@pytest.mark.integration
def test_an_earlier_runs_results_are_not_passed_off_as_this_runs(tmp_path,
                                                                  mnist_dir):
  work = tmp_path / "work"
  work.mkdir()
  (work / "results.json").write_text('{"stale": true}')
  (work / "table.png").write_text("stale")
  # A different config in the same WORK: the paper run refuses to start.
  (work / "run_config.json").write_text('{"seeds": [9]}')
  proc = _run(tmp_path, mnist_dir, BENCH_S="1", MESH_S="1",
              SPECIALISTS_S="1")
  # A user error (kdjax.paper.cli): one line in paper.log and exit status 2.
  assert proc.returncode == 2, proc.stdout + proc.stderr
  assert "paper config exit status 2" in proc.stdout
  # The specialists run is tried all the same (and cut short here); the
  # exit status stays the paper run's.
  assert "specialists exit status 124: SPECIALISTS_S ran out" in proc.stdout
  assert (tmp_path / "out" / "specialists.log").exists()
  assert "holds a run with a different configuration" in (
      tmp_path / "out" / "paper.log").read_text()
  assert not (tmp_path / "out" / "paper_gpu.json").exists()
  assert not (tmp_path / "out" / "paper_gpu_table.png").exists()
  assert not (work / "results.json").exists()


@pytest.mark.integration
def test_terminating_the_script_keeps_the_finished_rows(tmp_path, mnist_dir):
  """A TERM to the script's process group (what a time-limited remote call
  sends) stops the run and still collects the rows finished so far."""
  import signal  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  env = {**os.environ, "OUT": str(tmp_path / "out"),
         "WORK": str(tmp_path / "work"), "BACKEND": "cpu", "BENCH_S": "1",
         "MESH_S": "1",
         "KDJAX_DATA_DIR": str(mnist_dir), "RUNS": "paper",
         "PATH": f"{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}"}
  env.pop("XLA_FLAGS", None)
  proc = subprocess.Popen(
      ["bash", str(SCRIPT), "--config.seeds=(0,)",
       "--config.rows=('student_alone', 'distilled_T20')",
       "--config.teacher.epochs=1", "--config.student.alone.epochs=1",
       "--config.student.distill.epochs=10000"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True, start_new_session=True)
  partial = tmp_path / "work" / "results.partial.json"
  deadline = time.monotonic() + 500  # a safety net, not a measurement
  while time.monotonic() < deadline and proc.poll() is None:
    if partial.exists() and "student_alone" in [
        r["name"] for r in json.loads(partial.read_text())["rows"]]:
      break
    time.sleep(1)
  assert proc.poll() is None, proc.communicate()
  os.killpg(proc.pid, signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, out + err
  assert "terminated: stopping the run" in err
  rows = json.loads((tmp_path / "out" / "paper_gpu.partial.json").read_text())
  assert [r["name"] for r in rows["rows"]] == ["teacher", "student_alone"]
  assert not (tmp_path / "out" / "paper_gpu.json").exists()
  assert subprocess.run(["pgrep", "-f", str(tmp_path / "work")],
                        capture_output=True).returncode == 1  # nothing left
