"""fit(): resuming after a real kill, determinism, workdir and checkpoints."""
import gc
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import warnings

import jax
import numpy as np
import pytest

import kdjax
from kdjax import checkpoint as ckpt_lib
from kdjax import trainer as fit_lib

SCRIPT = pathlib.Path(__file__).with_name("fit_script.py")
ROOT = SCRIPT.parents[1]
EPOCHS = 6


def _run(workdir, epochs=EPOCHS, pause=0.0, timeout=300):
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": ""}
  return subprocess.run(
      [sys.executable, str(SCRIPT), str(workdir), str(epochs), str(pause)],
      capture_output=True, text=True, env=env, timeout=timeout, check=True)


def _done(out):
  line = [l for l in out.stdout.splitlines() if l.startswith("DONE")][-1]
  _, sha, step = line.split()
  return sha, int(step)


def _metrics(workdir):
  return [json.loads(l) for l in
          (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def fit_script_module():
  sys.path.insert(0, str(SCRIPT.parent))
  try:
    import fit_script  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  return fit_script


def _tiny_run():
  """A fresh (state, teacher, data) of fit_script's run, in this process."""
  return fit_script_module().make_run()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run's final parameter hash."""
  return _done(_run(tmp_path_factory.mktemp("ref")))


@pytest.mark.integration
def test_same_seed_is_bit_identical(reference, tmp_path):
  assert _done(_run(tmp_path)) == reference


@pytest.mark.integration
def test_killed_run_resumes_bit_identical(reference, tmp_path):
  """SIGKILL a real subprocess at several points; the restarted run matches."""
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": ""}
  kills = 0
  ckdir = tmp_path / "checkpoints"

  def saved():
    if not ckdir.exists():
      return []
    return sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit())

  # Kill after a new checkpoint appears plus a varying delay, so the kills
  # land at different points: mid-epoch, mid-eval, around a save.
  for extra in (0.0, 0.25, 0.55):
    before = saved()
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), str(tmp_path), str(EPOCHS), "0.4"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while (saved() == before and proc.poll() is None
           and time.time() - t0 < 240):
      time.sleep(0.02)
    time.sleep(extra)
    if proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
      kills += 1
    proc.communicate()
  assert kills >= 2, "the run finished before it could be killed"
  assert saved() and saved()[-1] < EPOCHS
  assert _done(_run(tmp_path)) == reference
  # The epochs run again after each resume are logged once, not twice.
  assert [r["epoch"] for r in _metrics(tmp_path)] == list(range(1, EPOCHS + 1))


@pytest.mark.integration
def test_corrupt_latest_checkpoint_falls_back(reference, tmp_path):
  _run(tmp_path, epochs=4)
  ckdir = tmp_path / "checkpoints"
  latest = max(int(p.name) for p in ckdir.iterdir() if p.name.isdigit())
  # Truncate every array file of the latest checkpoint.
  hit = 0
  for f in (ckdir / str(latest) / "state").rglob("*"):
    if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
      hit += 1
  assert hit
  out = _run(tmp_path)  # resumes from latest-1 with a warning, finishes
  assert "could not be restored" in out.stderr
  assert _done(out) == reference


def test_workdir_of_a_different_config_is_refused(tmp_path):
  fit_lib.check_run_config(tmp_path, {"lr": 0.1, "T": 20})
  fit_lib.check_run_config(tmp_path, {"T": 20, "lr": 0.1})  # same: fine
  with pytest.raises(ValueError, match=r"different configuration.*\['lr'\]"):
    fit_lib.check_run_config(tmp_path, {"lr": 0.2, "T": 20})


def test_checkpointer_restore_and_all_corrupt(tmp_path):
  import jax.numpy as jnp
  like = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.int32(3)}
  c = ckpt_lib.Checkpointer(tmp_path)
  assert c.restore_latest(like) is None
  c.save(1, like, jax.random.key(7))
  state, meta = c.restore_latest(like)
  assert meta["epoch"] == 1
  np.testing.assert_array_equal(state["w"], like["w"])
  c.close()
  for f in (tmp_path / "1" / "state").rglob("*"):
    if f.is_file():
      f.write_bytes(b"garbage")
  c = ckpt_lib.Checkpointer(tmp_path)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    with pytest.raises(ckpt_lib.CheckpointCorruptError,
                       match="Delete the directory"):
      c.restore_latest(like)


def test_failed_save_deletes_nothing(tmp_path, monkeypatch):
  """A save that dies midway leaves every earlier checkpoint restorable."""
  import jax.numpy as jnp
  import orbax.checkpoint as ocp
  like = {"w": jnp.arange(6.0).reshape(2, 3)}
  c = ckpt_lib.Checkpointer(tmp_path, max_to_keep=2)
  c.save(1, like, jax.random.key(0))
  c.save(2, {"w": like["w"] + 1}, jax.random.key(0))

  def boom(*args, **kwargs):
    raise OSError("disk full (simulated)")

  # Fail inside orbax's array writer, after the save has started.
  monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "async_save", boom,
                      raising=False)
  monkeypatch.setattr(ocp.StandardCheckpointHandler, "async_save", boom,
                      raising=False)
  with pytest.raises(Exception, match="disk full") as failure:
    c.save(3, {"w": like["w"] + 2}, jax.random.key(0))
  # The injected failure stops orbax's composite save after it has created
  # the JSON handler's coroutine, before awaiting it: collect that coroutine
  # here, where its "never awaited" warning is expected, rather than in some
  # later test.
  del failure
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "coroutine .* was never awaited",
                            RuntimeWarning)
    gc.collect()
  monkeypatch.undo()
  c.close()
  c = ckpt_lib.Checkpointer(tmp_path, max_to_keep=2)
  assert c.all_epochs() == [1, 2]
  state, meta = c.restore_latest(like)
  assert meta["epoch"] == 2
  np.testing.assert_array_equal(state["w"], like["w"] + 1)


def test_write_atomic_replaces_whole_files(tmp_path):
  path = tmp_path / "new" / "dir" / "f.json"
  ckpt_lib.write_atomic(path, "old")
  assert path.read_text() == "old"
  ckpt_lib.write_atomic(path, b"\x89PNG")
  assert path.read_bytes() == b"\x89PNG"
  assert [p.name for p in path.parent.iterdir()] == ["f.json"]  # no .tmp


def _fit(state, teacher, data, workdir, **kw):
  kw = {"epochs": 1, "batch_size": 32, "rng": jax.random.key(0),
        "progress": False, **kw}
  return fit_lib.fit(state, teacher, data, workdir=workdir, **kw)


@pytest.mark.integration
def test_resuming_with_other_settings_is_refused(tmp_path):
  """Regression: without run_config, fit used to resume any workdir silently,
  keeping the checkpoint's T and alpha and mixing batch sizes and objectives."""
  import jax.numpy as jnp
  _fit(*_tiny_run(), tmp_path)
  state, teacher, data = _tiny_run()
  other = state.replace(hparams={"temperature": jnp.float32(2.0),
                                 "alpha": jnp.float32(0.9)})
  with pytest.raises(ValueError, match=(
      r"fit.json: keys differing: \['batch_size', 'hparams', "
      r"'objective'\]")):
    _fit(other, teacher, data, tmp_path, epochs=2, batch_size=16,
         objective="soft")
  # A student of another width is refused the same way, before any restore.
  net = fit_script_module().Net(24)
  params = net.init(jax.random.key(2), jnp.zeros((1, 8, 8)))["params"]
  wider = state.replace(
      params=params, opt_state=state.tx.init(params),
      apply_fn=kdjax.Student.from_logits_fn(
          lambda p, x, train, rng: net.apply({"params": p}, x),
          params).apply_fn)
  with pytest.raises(ValueError,
                     match=r"fit.json: keys differing: \['state'\]"):
    _fit(wider, teacher, data, tmp_path, epochs=2)
  assert not (tmp_path / "checkpoints.corrupt").exists()
  # Only epochs may change: the run is extended by one epoch.
  _, history = _fit(*_tiny_run(), tmp_path, epochs=2)
  assert len(history) == 1
  assert [r["epoch"] for r in _metrics(tmp_path)] == [1, 2]


@pytest.mark.integration
def test_resume_drops_the_metrics_of_epochs_run_again(tmp_path):
  """Regression: metrics.jsonl held epoch 3 twice after a resume from 2."""
  import shutil
  _fit(*_tiny_run(), tmp_path, epochs=3, checkpoint_every=2)
  assert [r["epoch"] for r in _metrics(tmp_path)] == [1, 2, 3]
  shutil.rmtree(tmp_path / "checkpoints" / "3")  # as if killed after logging 3
  first = _metrics(tmp_path)
  _, history = _fit(*_tiny_run(), tmp_path, epochs=3, checkpoint_every=2)
  assert len(history) == 1
  again = _metrics(tmp_path)
  assert [r["epoch"] for r in again] == [1, 2, 3]
  assert again[:2] == first[:2]  # the kept records are untouched
  assert again[2]["loss"] == first[2]["loss"]  # epoch 3 replayed identically


def test_metric_writer_drops_a_torn_last_line(tmp_path):
  from kdjax.progress import MetricWriter
  w = MetricWriter(tmp_path, tensorboard=False)
  w.write(10, {"loss": 1.0}, epoch=1)
  w.write(20, {"loss": 0.5}, epoch=2)
  with open(w.path, "a") as f:
    f.write('{"step": 30, "lo')  # killed mid-write
  w.drop_after(20)
  assert [r["step"] for r in _metrics(tmp_path)] == [10, 20]
  w.drop_after(10)
  assert [r["step"] for r in _metrics(tmp_path)] == [10]
  w.drop_after(0)
  assert w.path.read_text() == ""


def test_checkpoint_of_another_structure_is_a_mismatch_not_corruption(tmp_path):
  """Regression: a readable checkpoint of another shape was reported corrupt,
  moved aside, and the error said to delete the directory."""
  import jax.numpy as jnp
  c = ckpt_lib.Checkpointer(tmp_path / "ck")
  c.save(1, {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)}, jax.random.key(0))
  c.save(2, {"w": jnp.ones((3, 4)), "b": jnp.zeros(4)}, jax.random.key(0))
  c.close()
  c = ckpt_lib.Checkpointer(tmp_path / "ck")  # as a resumed process would
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no fallback warning either
    with pytest.raises(ckpt_lib.CheckpointMismatchError,
                       match=r"epoch 2 .*w: saved \(3, 4\) float32, expected "
                             r"\(3, 5\) float32.*use a new workdir"):
      c.restore_latest({"w": jnp.ones((3, 5)), "b": jnp.zeros(4)})
    with pytest.raises(ckpt_lib.CheckpointMismatchError,
                       match=r"c: saved nothing, expected \(4,\) float32"):
      c.restore(1, {"w": jnp.ones((3, 4)), "c": jnp.zeros(4)})
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="int32"):
      c.restore(1, {"w": jnp.ones((3, 4)), "b": jnp.zeros(4, jnp.int32)})
  assert c.all_epochs() == [1, 2]
  assert not (tmp_path / "ck.corrupt").exists()
  state, meta = c.restore_latest({"w": jnp.ones((3, 4)), "b": jnp.zeros(4)})
  assert meta["epoch"] == 2
