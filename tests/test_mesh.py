"""kdjax.fit on a mesh (kdjax.mesh): data parallel, FSDP, one process.

These run in the pytest process, which has 8 virtual CPU devices (the root
conftest.py). A test marked ``all_devices`` sees fit's real default mesh
(all 8 devices); the others get a one-device default, as the rest of the
suite does. The several-process tests are in test_mesh_multihost.py.
"""

import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import kdjax
from kdjax import mesh as mesh_lib
from kdjax import fitting, step as train
from kdjax.paper import models

NUM_CLASSES = 10
N = 256
BATCH = 64


@pytest.fixture(autouse=True)
def _eight_devices():
  if jax.device_count() != 8:
    pytest.fail(f"these tests need the 8 virtual CPU devices of the root "
                f"conftest.py; jax sees {jax.device_count()}.")


def _one_device():
  return mesh_lib.make_mesh(devices=jax.devices()[:1])


class BNCNN(nn.Module):
  """conv -> BatchNorm -> relu -> pool -> dense: a BatchNorm CNN."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x[..., None].astype(jnp.float32) / 255.0
    x = nn.Conv(8, (3, 3), padding="SAME")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
    x = nn.avg_pool(nn.relu(x), (2, 2), (2, 2))
    return nn.Dense(NUM_CLASSES, name="logits")(x.reshape(x.shape[0], -1))


def _data(shape=(8, 8), n=N, seed=0):
  rs = np.random.RandomState(seed)
  return {"image": rs.randint(0, 256, (n, *shape)).astype(np.uint8),
          "label": rs.randint(0, NUM_CLASSES, (n,)).astype(np.int32)}


def _mlp_run(width=64, teacher_width=128):
  """The paper's MLP student (784-w-w-10, no dropout) and an MLP teacher."""
  net, tnet = models.paper_student(width), models.MLP((teacher_width,))
  tvars = tnet.init(jax.random.key(1), jnp.zeros((1, 28, 28)))
  teacher = kdjax.Teacher.from_linen(tnet, tvars)
  student = kdjax.Student.from_linen(
      net, net.init(jax.random.key(2), jnp.zeros((1, 28, 28))))

  def state():
    # SGD: Adam's first steps divide by |g| and so magnify the rounding of
    # gradients near 0 (the all-reduce adds in another order) far past it.
    return train.TrainState.create(student, tx=optax.sgd(0.05, momentum=0.9),
                                   temperature=2.0, alpha=0.5)
  return state, teacher, _data((28, 28))


def _bn_run():
  net, tnet = BNCNN(), BNCNN()
  teacher = kdjax.Teacher.from_linen(
      tnet, tnet.init(jax.random.key(1), jnp.zeros((1, 8, 8))))
  student = kdjax.Student.from_linen(
      net, net.init(jax.random.key(2), jnp.zeros((1, 8, 8))))

  def state():
    return train.TrainState.create(student, tx=optax.sgd(0.1, momentum=0.9),
                                   temperature=3.0, alpha=0.3)
  return state, teacher, _data()


def _fit(run, mesh, **kw):
  state, teacher, data = run
  kw.setdefault("epochs", 2)
  kw.setdefault("batch_size", BATCH)
  return kdjax.fit(state(), teacher, data, rng=jax.random.key(0), mesh=mesh,
                   progress=False, **kw)


def _assert_close(a, b, atol=2e-6, rtol=2e-5):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                               atol=atol)


def _spans_all_devices(tree):
  for x in jax.tree.leaves(tree):
    assert len(x.sharding.device_set) == 8, x.sharding


# ----------------------------------------------------------------------------
# Meshes and plans.
# ----------------------------------------------------------------------------


@pytest.mark.all_devices
def test_default_mesh_is_every_device_on_the_data_axis():
  plan = mesh_lib.plan()
  assert plan.describe() == {"data": 8, "fsdp": 1}
  assert plan.batch_axes == ("data", "fsdp") and plan.data_size == 8
  assert not plan.trivial
  assert list(plan.mesh.devices.ravel()) == jax.devices()


def test_suite_default_is_one_device_and_fit_does_nothing_there():
  plan = mesh_lib.plan()
  assert plan.trivial and plan.data_size == 1
  tree = {"w": jnp.ones(3)}
  assert plan.place_state(tree) is tree
  assert plan.constrain_batch(tree) is tree


@pytest.mark.integration
def test_one_device_fit_places_nothing_on_a_mesh():
  """On one device fit runs as before: single-device arrays, no mesh."""
  net = models.MLP((8,))
  student = kdjax.Student.from_linen(
      net, net.init(jax.random.key(0), jnp.zeros((1, 8, 8))))
  state = train.TrainState.create(student, tx=optax.sgd(0.1))
  out, _ = kdjax.fit(state, None, _data(n=16), epochs=1, batch_size=8,
                     objective="hard", rng=jax.random.key(0), progress=False)
  for x in jax.tree.leaves(out):
    assert isinstance(x.sharding, jax.sharding.SingleDeviceSharding), x


def test_make_mesh_sizes_and_errors():
  assert mesh_lib.make_mesh(fsdp=-1).shape == {"data": 1, "fsdp": 8}
  assert mesh_lib.make_mesh(data=2, fsdp=4).shape == {"data": 2, "fsdp": 4}
  assert mesh_lib.make_mesh(fsdp=2).shape == {"data": 4, "fsdp": 2}
  with pytest.raises(ValueError, match="data=3 x fsdp=2"):
    mesh_lib.make_mesh(data=3, fsdp=2)
  with pytest.raises(ValueError, match="cannot be split"):
    mesh_lib.make_mesh(fsdp=3)
  with pytest.raises(TypeError, match="jax.sharding.Mesh"):
    mesh_lib.plan("data")
  other = jax.sharding.Mesh(np.asarray(jax.devices()), ("model",))
  with pytest.raises(ValueError, match="'data' axis"):
    mesh_lib.plan(other)


def test_fsdp_rule_largest_divisible_dimension_small_leaves_replicated():
  plan = mesh_lib.plan(mesh_lib.make_mesh(fsdp=8))
  assert plan.leaf_spec((784, 800)) == P(None, "fsdp")  # 800 > 784
  assert plan.leaf_spec((800, 10)) == P("fsdp")
  assert plan.leaf_spec((1200,)) == P("fsdp")
  assert plan.leaf_spec((10,)) == P()  # small: replicated
  assert plan.leaf_spec((801, 803)) == P()  # nothing divides
  assert plan.leaf_spec((4, 800, 10), lead=1) == P(None, "fsdp")
  assert plan.leaf_spec((800, 10), lead=1) == P()  # 10 per member: small
  data_only = mesh_lib.plan(mesh_lib.make_mesh())
  assert data_only.leaf_spec((784, 800)) == P()


@pytest.mark.integration
@pytest.mark.all_devices
def test_batch_size_the_data_axis_does_not_divide_is_refused_before_compiling(
    monkeypatch):
  def no_compile(*args, **kwargs):
    raise AssertionError("compiled before checking the batch size")
  monkeypatch.setattr(fitting, "_cached", no_compile)  # builds every runner
  run = _mlp_run()
  with pytest.raises(ValueError, match=r"batch_size=60 is the global batch.*"
                     r"data=8 x fsdp=1 = 8 devices.*56 or 64"):
    _fit(run, None, batch_size=60)
  with pytest.raises(ValueError, match=r"batch_size=12 .*data=2 x fsdp=4"):
    _fit(run, mesh_lib.make_mesh(data=2, fsdp=4), batch_size=12)
  host = lambda epoch: [{k: v[:12] for k, v in run[2].items()}]
  with pytest.raises(ValueError, match="batch_size=12"):
    kdjax.fit(run[0](), run[1], host, epochs=1, rng=jax.random.key(0),
              progress=False)


# ----------------------------------------------------------------------------
# Data parallel: equal to one device.
# ----------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.all_devices
@pytest.mark.parametrize("make_run,loop", [(_mlp_run, "scan"),
                                           (_bn_run, "steps")])
def test_data_parallel_fit_equals_one_device(make_run, loop):
  """Default mesh (8 devices, no mesh built) vs one device: same run."""
  run = make_run()
  one, h1 = _fit(run, _one_device(), loop=loop)
  dp, h8 = _fit(run, None, loop=loop)
  _spans_all_devices(dp.params)
  _assert_close(dp.params, one.params)
  _assert_close(dp.model_state, one.model_state)
  if make_run is _bn_run:  # The statistics moved (and are global).
    assert jax.tree.leaves(dp.model_state)
    assert not np.allclose(jax.tree.leaves(dp.model_state)[0],
                           jax.tree.leaves(run[0]().model_state)[0])
  for k in ("loss", "accuracy", "agreement", "soft_loss", "hard_loss"):
    np.testing.assert_allclose(h8[-1][k], h1[-1][k], rtol=1e-5, atol=1e-6)


def _hlo_of_epoch(run, plan, loop="scan"):
  state, teacher, data = run
  runner, _ = fitting._device_runner(  # pylint: disable=protected-access
      kdjax.StepSpec("kd"), loop, BATCH, N, False, plan)
  args = (plan.place_state(state()), plan.place_teacher(teacher),
          plan.place_data(data), plan.place_rng(jax.random.key(0)), 0)
  return runner.lower(*args).compile().as_text()


@pytest.mark.integration
def test_compiled_epoch_computes_per_device_batch_shards():
  """The student's first layer runs on BATCH / 8 rows per device."""
  run = _mlp_run(width=48)  # No param is [64, 48].
  plan = mesh_lib.plan(mesh_lib.make_mesh())
  hlo = _hlo_of_epoch(run, plan)
  per_device, full = f"f32[{BATCH // 8},48]", f"f32[{BATCH},48]"
  assert per_device in hlo
  assert full not in hlo
  # Replicated data: each device gathers its rows, no data all-reduce.
  assert "u8[" not in "".join(l for l in hlo.splitlines()
                              if "all-reduce(" in l or "all-gather(" in l)
  # Without the constraint the gathered batch is computed whole everywhere.
  unconstrained = _hlo_of_epoch(run, dataclasses_replace(plan))
  assert full in unconstrained


def dataclasses_replace(plan):
  """A plan whose constrain_batch does nothing (what fit did before)."""
  class NoConstraint(type(plan)):
    def constrain_batch(self, batch, lead=0):
      return batch
  return NoConstraint(plan.mesh, plan.batch_axes, plan.fsdp_min_size)


@pytest.mark.integration
@pytest.mark.all_devices
def test_host_batches_go_straight_into_their_shards(monkeypatch):
  run = _mlp_run()
  data = run[2]
  batches = [{k: v[i:i + BATCH] for k, v in data.items()}
             for i in range(0, N, BATCH)]
  placed = []
  original = mesh_lib.Plan.place_batch

  def spy(self, batch, lead=0):
    out = original(self, batch, lead)
    placed.append(jax.tree.leaves(out)[0].sharding)
    return out
  monkeypatch.setattr(mesh_lib.Plan, "place_batch", spy)
  kw = dict(epochs=2, rng=jax.random.key(0), progress=False, block_steps=2)
  one, _ = kdjax.fit(run[0](), run[1], lambda e: batches,
                     mesh=_one_device(), **kw)
  assert not placed  # One device: the Prefetcher as before.
  dp, _ = kdjax.fit(run[0](), run[1], lambda e: batches, **kw)
  assert placed and placed[0] == NamedSharding(
      mesh_lib.plan().mesh, P(None, ("data", "fsdp")))
  _assert_close(dp.params, one.params)


# ----------------------------------------------------------------------------
# FSDP.
# ----------------------------------------------------------------------------


def _bytes_per_device(tree):
  """``{device: bytes of tree's shards on it}`` from the addressable shards."""
  out = {}
  for x in jax.tree.leaves(tree):
    for shard in x.addressable_shards:
      out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
  return out


def _assert_about_an_eighth(tree, what, slack=1.15):
  total = sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))
  per = _bytes_per_device(tree)
  assert len(per) == 8, what
  for device, nbytes in per.items():
    assert total / 8 <= nbytes <= slack * total / 8, (
        what, device, nbytes, total)


@pytest.mark.integration
def test_fsdp_shards_student_optimizer_and_teacher_and_matches(monkeypatch):
  run = _mlp_run(width=64, teacher_width=256)
  placed_teachers = []
  original = mesh_lib.Plan.place_teacher

  def spy(self, teacher):
    placed_teachers.append(original(self, teacher))
    return placed_teachers[-1]
  monkeypatch.setattr(mesh_lib.Plan, "place_teacher", spy)
  one, h1 = _fit(run, _one_device())
  fsdp, h8 = _fit(run, mesh_lib.make_mesh(fsdp=8))
  # The returned state kept the FSDP layout through the compiled epochs.
  assert fsdp.params["hidden_0"]["kernel"].sharding.spec == P("fsdp")
  _assert_about_an_eighth(fsdp.params, "student params")
  _assert_about_an_eighth(fsdp.opt_state, "optimizer state")
  teacher = placed_teachers[-1]
  _assert_about_an_eighth(teacher.params, "teacher params")
  # The teacher stays frozen: fit never changes it, nor optimises it.
  _assert_close(teacher.params, run[1].params, atol=0, rtol=0)
  assert jax.tree.structure(fsdp.opt_state) == jax.tree.structure(
      one.opt_state)
  _assert_close(fsdp.params, one.params)
  np.testing.assert_allclose(h8[-1]["loss"], h1[-1]["loss"], rtol=1e-5)
  # Data and fsdp axes together: the batch split 8 ways, params 4 ways.
  both, _ = _fit(run, mesh_lib.make_mesh(data=2, fsdp=4))
  assert both.params["hidden_0"]["kernel"].sharding.spec == P("fsdp")
  assert len(both.params["hidden_0"]["kernel"].addressable_shards[0]
             .data) == 784 // 4
  _assert_close(both.params, one.params)


@pytest.mark.integration
@pytest.mark.all_devices
def test_a_run_resumes_on_another_mesh(tmp_path):
  """A checkpoint written on one device resumes data parallel and FSDP.

  Orbax restores onto the new mesh's shardings; the resumed run equals the
  uninterrupted one-device run to float32 rounding.
  """
  run = _mlp_run()
  full, _ = _fit(run, _one_device())
  first = tmp_path / "one_device"
  _fit(run, _one_device(), epochs=1, checkpoint=kdjax.Checkpointing(first))
  for name, mesh in (("fsdp", mesh_lib.make_mesh(fsdp=8)), ("data", None)):
    workdir = tmp_path / name
    shutil.copytree(first, workdir)
    resumed, history = _fit(run, mesh, checkpoint=kdjax.Checkpointing(
        workdir))
    assert len(history) == 1, (name, history)  # Only epoch 2 ran.
    _spans_all_devices(resumed.params)
    _assert_close(resumed.params, full.params)


@pytest.mark.integration
def test_vmapped_sweep_on_a_mesh_equals_one_device():
  """A sweep of 2 students: data parallel and FSDP (member axis kept)."""
  _, teacher, data = _mlp_run(width=64, teacher_width=128)
  net = models.paper_student(64)

  def init(rng, temperature, alpha):
    params = net.init(rng, jnp.zeros((1, 28, 28)))["params"]
    return train.TrainState.create(
        apply_fn=models.linen_student_apply(net), params=params,
        tx=optax.sgd(0.05, momentum=0.9), temperature=temperature,
        alpha=alpha)

  def sweep_fit(mesh):
    states = kdjax.sweep.create_sweep(init, seeds=[0, 1],
                                      temperatures=[2.0, 4.0],
                                      alphas=[0.5, 0.1])
    return kdjax.fit(states, teacher, data, epochs=1, batch_size=BATCH,
                     rng=jax.random.split(jax.random.key(0), 2),
                     vmapped=True, mesh=mesh, progress=False)[0]

  one = sweep_fit(_one_device())
  for mesh in (mesh_lib.make_mesh(), mesh_lib.make_mesh(fsdp=8)):
    got = sweep_fit(mesh)
    _assert_close(got.params, one.params)
  # FSDP split the per-member kernel [2, 784, 64] on 784, not the members.
  assert got.params["hidden_0"]["kernel"].sharding.spec == P(None, "fsdp")


@pytest.mark.integration
def test_mesh_benchmark_section_runs_one_step():
  """benchmarks/_mesh.py (train_step.py's mesh section), one tiny round."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "_mesh.py"
  spec = importlib.util.spec_from_file_location("_mesh_bench", path)
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  out = bench.run(batch_size=8, steps=1, repeats=1)
  assert out["devices"] == 8
  assert set(out["step_ms"]) == {"one_device", "data_parallel", "fsdp"}
  assert out["step_time_vs_one_device"]["one_device"] == 1.0
  assert "overhead" in out["note"]
