"""fit over batches that stream from the host (issue #12).

Sources (grain datasets, functions of the epoch), device prefetch, checks of
every batch, bit-identical resume after a SIGKILL mid-epoch, the epoch form
chosen per model, repeated fit calls continuing a run, and the shipped
teacher found from any working directory.
"""

import os
import pathlib
import signal
import subprocess
import sys
import time

import grain
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import optax
import pytest

import kdjax
from kdjax import hostdata, loops, train
from kdjax.paper import models
from kdjax.fields import BatchError

SCRIPT = pathlib.Path(__file__).with_name("host_fit_script.py")
ROOT = SCRIPT.parents[1]
BATCH, NUM = 32, 256


def _data(seed=0, n=NUM):
  rs = np.random.RandomState(seed)
  return {"image": rs.randint(0, 256, (n, 8, 8)).astype(np.uint8),
          "label": rs.randint(0, 10, (n,)).astype(np.int32)}


TX = optax.adam(1e-2)  # Static in the state: shared, so jit can reuse.


def _state(width=16, dropout=0.0, seed=2):
  net = models.MLP((width,), hidden_dropout=dropout)
  student = kdjax.Student.from_linen(net, {
      "params": models.init_params(net, jax.random.key(seed), (1, 8, 8))})
  return kdjax.TrainState.create(student, tx=TX, temperature=4.0, alpha=0.1)


def _teacher():
  net = models.MLP((48,))
  return kdjax.Teacher.from_linen(net, {
      "params": models.init_params(net, jax.random.key(1), (1, 8, 8))})


def _device_order_batches(data, rng, epoch, batch=BATCH):
  """The batches the device path trains on in ``epoch``, in order."""
  n = len(data["label"])
  perm = np.asarray(jax.random.permutation(loops.epoch_key(rng, epoch), n))
  order = perm[:(n // batch) * batch].reshape(-1, batch)
  return [{k: v[idx] for k, v in data.items()} for idx in order]


@pytest.mark.integration
@pytest.mark.parametrize("loop, block", [("steps", 1), ("scan", 4),
                                         ("scan", 3)])
def test_host_path_equals_device_path(loop, block):
  data, rng, teacher = _data(), jax.random.key(0), _teacher()
  kw = dict(epochs=2, rng=rng, progress=False)
  device, _ = kdjax.fit(_state(dropout=0.2), teacher, data, batch_size=BATCH,
                        loop="scan", **kw)
  host, history = kdjax.fit(
      _state(dropout=0.2), teacher,
      lambda e: _device_order_batches(data, rng, e), loop=loop,
      block_steps=block, **kw)
  assert int(host.step) == int(device.step) == 2 * (NUM // BATCH)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5,
                                                       atol=2e-6),
               host.params, device.params)
  assert set(history[0]) >= {"loss", "accuracy", "first_nonfinite_step",
                             "skipped", "steps_per_s"}


@pytest.mark.integration
def test_grain_map_dataset_reshuffles_each_epoch():
  class Src:
    def __len__(self):
      return NUM

    def __getitem__(self, i):
      return {k: v[i] for k, v in _data().items()}

  ds = grain.MapDataset.source(Src()).seed(0).shuffle().batch(
      BATCH, drop_remainder=True)
  src = hostdata.as_host_source(ds)
  e0 = [b["label"] for b, _ in src.batches(0, 0, None)]
  e1 = [b["label"] for b, _ in src.batches(1, 0, None)]
  assert len(e0) == NUM // BATCH
  assert not all(np.array_equal(a, b) for a, b in zip(e0, e1))
  np.testing.assert_array_equal(np.sort(np.concatenate(e0)),
                                np.sort(np.concatenate(e1)))
  state, history = kdjax.fit(_state(), _teacher(), ds, epochs=2,
                             rng=jax.random.key(0), progress=False)
  assert int(state.step) == 2 * (NUM // BATCH) and len(history) == 2


@pytest.mark.integration
def test_an_iterator_is_refused_unread():
  batches = _device_order_batches(_data(), jax.random.key(0), 0)
  read = []

  def gen():
    for b in batches:
      read.append(1)
      yield b

  g = gen()
  with pytest.raises(hostdata.SourceError, match="iterator.*nothing was read"):
    kdjax.fit(_state(), _teacher(), g, epochs=1, rng=jax.random.key(0),
              progress=False)
  assert not read
  assert len(list(g)) == len(batches)  # Still whole.
  with pytest.raises(hostdata.SourceError, match="not a dict"):
    kdjax.fit(_state(), _teacher(), lambda e: [np.zeros((4, 8, 8))],
              epochs=1, rng=jax.random.key(0), progress=False)


@pytest.mark.integration
def test_a_batch_size_that_is_not_the_host_batches_is_an_error(tmp_path):
  batches = _device_order_batches(_data(), jax.random.key(0), 0)
  state = _state()
  with pytest.raises(ValueError, match=rf"batch_size=7.*hold {BATCH} "):
    kdjax.fit(state, _teacher(), lambda e: batches, epochs=1, batch_size=7,
              rng=jax.random.key(0), progress=False,
              workdir=tmp_path / "refused")
  assert not (tmp_path / "refused").exists()  # refused before the run began
  # The batches' own size is accepted, as is none.
  for given in (BATCH, None):
    out, _ = kdjax.fit(state, _teacher(), lambda e: batches[:2], epochs=1,
                       batch_size=given, rng=jax.random.key(0),
                       progress=False)
    assert int(out.step) == 2


@pytest.mark.integration
@pytest.mark.parametrize("bad", ["shape", "label"])
def test_a_bad_batch_names_its_epoch_and_index(bad):
  batches = _device_order_batches(_data(), jax.random.key(0), 0)
  broken = [dict(b) for b in batches]
  if bad == "shape":
    broken[5] = {k: v[:16] for k, v in broken[5].items()}
    pattern = r"batch 6 of epoch 1 has fields/shapes"
  else:
    broken[5]["label"] = broken[5]["label"].copy()
    broken[5]["label"][3] = 10
    pattern = r"batch 6 of epoch 1: label 10 .*out of range"
  with pytest.raises((BatchError, ValueError), match=pattern):
    kdjax.fit(_state(), _teacher(), lambda e: broken, epochs=1,
              rng=jax.random.key(0), progress=False, block_steps=2)


def test_prefetch_lands_batches_with_the_steps_sharding():
  mesh = train.data_mesh()
  batches = [({"image": np.full((16, 4), i, np.float32)}, {"i": i})
             for i in range(5)]
  sharding = NamedSharding(mesh, P("data"))
  block = NamedSharding(mesh, P(None, "data"))
  got = list(hostdata.Prefetcher(iter(batches), block=2, size=2,
                                 sharding=sharding, block_sharding=block,
                                 total=5))
  assert [c for _, c, _ in got] == [2, 2, 1]
  assert [s for _, _, s in got] == [{"i": 1}, {"i": 3}, {"i": 4}]
  assert got[0][0]["image"].sharding == block
  assert got[2][0]["image"].sharding == sharding
  np.testing.assert_array_equal(np.asarray(got[1][0]["image"])[:, 0, 0],
                                [2, 3])


@pytest.mark.integration
def test_repeated_fit_calls_continue_the_run_without_recompiling():
  data, rng, teacher = _data(), jax.random.key(0), _teacher()
  traces = []

  def kd(s, t, batch, *, temperature, alpha):
    traces.append(1)  # Runs only while tracing.
    return kdjax.objectives.get("kd")(s, t, batch, temperature=temperature,
                                      alpha=alpha)

  objective = kdjax.objectives.Objective(kd, "counted_kd", needs_labels=True)
  kw = dict(batch_size=BATCH, rng=rng, objective=objective, progress=False)
  whole, _ = kdjax.fit(_state(), teacher, data, epochs=3, **kw)
  state = _state(seed=2)  # Another student of the same model and shapes.
  for epoch in range(3):  # A per-epoch loop of fit calls.
    state, history = kdjax.fit(state, teacher, data, epochs=epoch + 1, **kw)
    assert len(history) == 1
  assert len(traces) == 1  # One compilation for all four calls.
  jax.tree.map(np.testing.assert_array_equal, state.params, whole.params)
  with pytest.raises(ValueError, match=r"already trained 3 epoch.*epochs=4"):
    kdjax.fit(state, teacher, data, epochs=3, **kw)


@pytest.mark.integration
def test_loop_is_chosen_per_model():
  cnn = models.CNN()
  cnn_state = kdjax.TrainState.create(
      apply_fn=models.linen_student_apply(cnn),
      params=models.init_params(cnn, jax.random.key(0), (1, 28, 28)),
      tx=optax.sgd(0.1))
  images = {"image": np.zeros((8, 28, 28), np.uint8),
            "label": np.zeros(8, np.int32)}
  assert jax.default_backend() == "cpu"
  assert kdjax.trainer.choose_loop(cnn_state, images) == "steps"
  assert kdjax.trainer.choose_loop(_state(), _data()) == "scan"


def _env():
  return {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": ""}


def _run(workdir, kind, sleep=0.0):
  out = subprocess.run([sys.executable, str(SCRIPT), str(workdir), kind, "3",
                        str(sleep)], capture_output=True, text=True,
                       env=_env(), timeout=300, check=True)
  line = [l for l in out.stdout.splitlines() if l.startswith("DONE")][-1]
  return line.split()[1:]


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["iter", "fn"])
def test_host_run_killed_mid_epoch_resumes_bit_identical(kind, tmp_path):
  reference = _run(tmp_path / "ref", kind)
  work = tmp_path / "killed"
  ckdir = work / "checkpoints"

  def saved():
    if not ckdir.exists():
      return []
    return sorted(int(p.name) for p in ckdir.iterdir() if p.name.isdigit())

  proc = subprocess.Popen(
      [sys.executable, str(SCRIPT), str(work), kind, "3", "0.01"],
      env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  t0 = time.time()
  # Kill once a mid-epoch checkpoint (step 12 = epoch 2, step 4) exists.
  while 12 not in saved() and proc.poll() is None and time.time() - t0 < 240:
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  assert saved() and saved()[-1] < 24 and saved()[-1] % 8, saved()
  assert _run(work, kind) == reference


@pytest.mark.integration
def test_shipped_teacher_loads_from_any_directory(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  teacher = models.load_shipped_teacher()
  assert teacher(jnp.zeros((2, 28, 28), jnp.uint8)).shape == (2, 10)
  with pytest.raises(FileNotFoundError, match="looked in"):
    models.load_shipped_teacher(name="no_such_teacher")


@pytest.mark.integration
def test_vmapped_sweep_on_host_batches_equals_members_alone():
  net = models.MLP((16,))
  apply = models.linen_student_apply(net)

  def init(rng, t, a):
    return kdjax.TrainState.create(
        apply_fn=apply, params=models.init_params(net, rng, (1, 8, 8)),
        tx=TX, temperature=t, alpha=a)

  batches = _device_order_batches(_data(), jax.random.key(0), 0)[:6]
  kw = dict(epochs=2, progress=False, block_steps=4)
  states = kdjax.sweep.create_sweep(init, seeds=[0, 1],
                                    temperatures=[2.0, 4.0],
                                    alphas=[0.5, 0.2])
  swept, _ = kdjax.fit(states, _teacher(), lambda e: batches,
                       rng=kdjax.sweep.sweep_keys([0, 1]), vmapped=True, **kw)
  for i, (seed, t, a) in enumerate([(0, 2.0, 0.5), (1, 4.0, 0.2)]):
    alone, _ = kdjax.fit(init(jax.random.key(seed), t, a), _teacher(),
                         lambda e: batches, rng=jax.random.key(seed), **kw)
    jax.tree.map(lambda x, y, i=i: np.testing.assert_allclose(
        x[i], y, rtol=1e-5, atol=1e-6), swept.params, alone.params)


@pytest.mark.integration  # five short fits, one resumed from a workdir
def test_a_generator_function_is_called_again_each_epoch(tmp_path):
  """Issue #19 part 7: ``def batches(epoch): ... yield`` is a host source."""
  data, rng, teacher = _data(), jax.random.key(0), _teacher()
  calls = []

  def batches(epoch):
    calls.append(epoch)
    yield from _device_order_batches(data, rng, epoch)

  kw = dict(rng=rng, progress=False, spec=kdjax.StepSpec("kd"))
  listed, _ = kdjax.fit(_state(), teacher,
                        lambda e: _device_order_batches(data, rng, e),
                        epochs=2, **kw)
  got, history = kdjax.fit(_state(), teacher, batches, epochs=2, **kw)
  assert len(history) == 2 and set(calls) == {0, 1}
  jax.tree.map(np.testing.assert_array_equal, got.params, listed.params)
  # Resumed from a workdir: the function is called again for the epoch.
  ckpt = kdjax.Checkpointing(tmp_path)
  kdjax.fit(_state(), teacher, batches, epochs=1, checkpoint=ckpt, **kw)
  calls.clear()
  resumed, _ = kdjax.fit(_state(), teacher, batches, epochs=2,
                         checkpoint=ckpt, **kw)
  assert 1 in calls
  jax.tree.map(np.testing.assert_array_equal, resumed.params, listed.params)


def test_a_function_returning_one_iterator_twice_is_refused():
  batches = iter(_device_order_batches(_data(), jax.random.key(0), 0))
  with pytest.raises(hostdata.SourceError, match="fresh one"):
    kdjax.fit(_state(), _teacher(), lambda e: batches, epochs=1,
              rng=jax.random.key(0), progress=False,
              loop=kdjax.Loop(steps_per_epoch=NUM // BATCH))
