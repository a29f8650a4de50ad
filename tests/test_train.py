"""Tests for the train step (kdjax.train), the loops, the cache and sweeps.

Everything runs on 8 virtual CPU devices (root conftest.py) with tiny MLPs
on 8x8 inputs. Students are deterministic (no dropout) wherever two code
paths are compared, except in the sweep test, where each member's dropout
keys must match the same run done alone.

Compilation dominates the runtime on CPU, so the static parts of the states
and steps are shared module-level objects (jit caches by their identity)
and parameters are drawn with NumPy rather than a compiled ``init``.
"""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized
from jax.sharding import NamedSharding, PartitionSpec as P

from kdjax import cache, loops, losses, sweep, train
from kdjax.teacher import Teacher

from _helpers import PixelMLP as MLP
from _helpers import assert_trees_equal as _assert_trees_equal
from _helpers import np_init
from _helpers import trees_differ as _trees_differ

NUM_CLASSES = 10
NUM_EXAMPLES = 70  # Not a multiple of BATCH: the epoch drops the last 6.
BATCH = 16
LR = 0.1
TEMPERATURE = 3.0
ALPHA = 0.3


# Static parts of the state (apply_fn, tx) and the steps are hashed by
# identity by jit: sharing them across tests shares the compilations.
STUDENT = MLP(16)
TEACHER_NET = MLP(64)
SGD = optax.sgd(LR)
MOMENTUM = optax.sgd(LR, momentum=0.9)
ADAM = optax.adam(1e-2)


def _student_apply(params, x, training, rng):
  del rng  # Deterministic.
  return STUDENT.apply({"params": params}, x, train=training)


@functools.cache
def _student_params(seed=2):
  return np_init(STUDENT, seed)["params"]


def _state(tx=SGD, temperature=TEMPERATURE, alpha=ALPHA, seed=2):
  """A fresh student state (fresh buffers: the jitted steps donate them)."""
  return train.TrainState.create(
      apply_fn=_student_apply,
      params=jax.tree.map(jnp.copy, _student_params(seed)), tx=tx,
      temperature=temperature, alpha=alpha)


@functools.cache
def _teacher():
  variables = np_init(TEACHER_NET, 1)
  return Teacher.from_linen(TEACHER_NET, variables)


@functools.cache
def _data(n=NUM_EXAMPLES, seed=0):
  """Host data: uint8 images (scaled inside the step) and int32 labels."""
  rng = np.random.RandomState(seed)
  return {"image": rng.randint(0, 256, (n, 8, 8)).astype(np.uint8),
          "label": rng.randint(0, NUM_CLASSES, (n,)).astype(np.int32)}


def _device_data(n=NUM_EXAMPLES):
  return jax.tree.map(jnp.asarray, _data(n))


def _float_batch(seed, n=BATCH):
  rng = np.random.RandomState(seed)
  return {"image": rng.rand(n, 8, 8).astype(np.float32),
          "label": rng.randint(0, NUM_CLASSES, (n,)).astype(np.int32)}


@functools.cache
def _jit_step(objective, **kwargs):
  return train.jit_train_step(objective, **kwargs)


# Python-side trace counter of the shared epoch function's train step.
_EPOCH_STEP_TRACES = []


@functools.cache
def _epoch_fn():
  """The jitted 'kd' epoch over NUM_EXAMPLES examples in batches of BATCH."""
  raw_step = train.make_train_step("kd")

  def counting_step(*args):
    _EPOCH_STEP_TRACES.append(1)  # Runs only while tracing.
    return raw_step(*args)

  return jax.jit(loops.make_epoch_fn(counting_step, batch_size=BATCH,
                                     num_examples=NUM_EXAMPLES))


# ----------------------------------------------------------------------------
# TrainState and input validation.
# ----------------------------------------------------------------------------


def test_train_state_create():
  state = _state()
  assert int(state.step) == 0 and int(state.skipped) == 0
  assert state.temperature.dtype == jnp.float32
  np.testing.assert_allclose(state.temperature, TEMPERATURE)
  np.testing.assert_allclose(state.alpha, ALPHA)
  chex.assert_trees_all_equal_structs(state.opt_state,
                                      SGD.init(state.params))


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan")])
def test_train_state_rejects_bad_temperature(temperature):
  with pytest.raises(ValueError, match="temperature"):
    _state(temperature=temperature)


@pytest.mark.parametrize("alpha", [-0.1, 1.5])
def test_train_state_rejects_bad_alpha(alpha):
  with pytest.raises(ValueError, match="alpha"):
    _state(alpha=alpha)


def test_bad_objective_name():
  with pytest.raises(ValueError, match="objective"):
    train.make_train_step("distill")


@pytest.mark.parametrize("objective", ["kd", "soft", "logit_matching"])
def test_teacher_objectives_need_teacher_or_cache(objective):
  step = jax.jit(train.make_train_step(objective))  # Fails while tracing.
  with pytest.raises(ValueError, match="needs a teacher"):
    step(_state(), None, _float_batch(0), jax.random.key(0))


def test_cached_logits_with_augmentation_are_stale():

  def augment(rng, x):
    return x + 0.01 * jax.random.normal(rng, x.shape)

  step = jax.jit(train.make_train_step("kd", augment_fn=augment))
  batch = {**_float_batch(0),
           "teacher_logits": np.zeros((BATCH, NUM_CLASSES), np.float32)}
  with pytest.raises(ValueError, match="stale"):
    step(_state(), _teacher(), batch, jax.random.key(0))


def test_batch_needs_image_and_label():
  with pytest.raises(ValueError, match="image"):
    jax.jit(train.make_train_step("hard"))(
        _state(), None, {"x": np.zeros((4, 8, 8), np.float32)},
        jax.random.key(0))


def test_shard_batch_indivisible_raises():
  n = jax.device_count()
  assert n == 8  # Set by the root conftest.py.
  batch = _float_batch(0, n=12)
  with pytest.raises(ValueError, match=r"12.*8"):
    train.shard_batch(batch)
  with pytest.raises(ValueError, match=r"12.*8"):
    train.shard_batch(batch, train.data_mesh())
  assert train.shard_batch(_float_batch(0, n=16))["image"].shape == (8, 2, 8, 8)


# ----------------------------------------------------------------------------
# Objectives: each equals a hand-written step.
# ----------------------------------------------------------------------------


def _manual_loss(objective, params, x, y, t_logits, temperature, alpha):
  logits = _student_apply(params, x, True, None)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  if objective == "hard":
    return jnp.mean(ce)
  if objective == "logit_matching":
    return jnp.mean(losses.logit_matching_loss(logits, t_logits))
  soft = losses.distillation_loss(logits, t_logits, temperature)
  if objective == "soft":
    return jnp.mean(soft)
  return jnp.mean(alpha * ce + (1.0 - alpha) * soft)


@functools.partial(jax.jit, static_argnums=0)
def _manual_sgd_step(objective, params, batch, teacher):
  x = batch["image"]
  if x.dtype == jnp.uint8:
    x = x.astype(jnp.float32) / 255.0
  t_logits = teacher(x) if teacher is not None else None
  loss, grads = jax.value_and_grad(_manual_loss, argnums=1)(
      objective, params, x, batch["label"], t_logits, TEMPERATURE, ALPHA)
  new_params = jax.tree.map(lambda p, g: p - LR * g, params, grads)
  return loss, grads, new_params, t_logits


class ObjectiveTest(chex.TestCase):
  """Each objective, jitted and not, against a hand-written SGD step."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("hard", "hard"), ("kd", "kd"), ("soft", "soft"),
      ("logit_matching", "logit_matching"))
  def test_matches_manual_step(self, objective):
    batch = _data(BATCH)  # uint8 images, scaled by the model.
    teacher = None if objective == "hard" else _teacher()
    params = _student_params()
    loss, grads, expected, t_logits = _manual_sgd_step(objective, params,
                                                       batch, teacher)
    step = self.variant(train.make_train_step(objective))
    state, metrics = step(_state(), teacher, batch, jax.random.key(0))

    chex.assert_trees_all_close(state.params, expected, rtol=1e-6, atol=1e-6)
    chex.assert_trees_all_equal_structs(state.opt_state, SGD.init(params))
    assert int(state.step) == 1 and int(state.skipped) == 0
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(grads),
                               rtol=1e-5)
    assert float(metrics["finite"]) == 1.0

    keys = {"loss", "hard_loss", "accuracy", "grad_norm", "finite",
            "temperature", "alpha"}
    if objective != "hard":
      keys |= {"soft_loss", "agreement"}
    assert set(metrics) == keys
    logits = _student_apply(params, batch["image"] / np.float32(255.0),
                            True, None)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits,
                                                         batch["label"])
    np.testing.assert_allclose(metrics["hard_loss"], jnp.mean(ce), rtol=1e-5)
    np.testing.assert_allclose(
        metrics["accuracy"],
        np.mean(np.argmax(logits, -1) == batch["label"]), atol=1e-6)
    assert 0.0 <= float(metrics["accuracy"]) <= 1.0
    if objective != "hard":
      agreement = float(metrics["agreement"])
      assert 0.0 <= agreement <= 1.0
      np.testing.assert_allclose(
          agreement,
          np.mean(np.argmax(logits, -1) == np.argmax(t_logits, -1)),
          atol=1e-6)
    if objective == "kd":
      np.testing.assert_allclose(
          metrics["loss"],
          ALPHA * metrics["hard_loss"] + (1 - ALPHA) * metrics["soft_loss"],
          rtol=1e-5)
    if objective in ("soft", "logit_matching"):
      np.testing.assert_allclose(metrics["loss"], metrics["soft_loss"],
                                 rtol=1e-6)


@pytest.mark.integration
def test_global_norm_matches_float64_reference():
  rng = np.random.default_rng(0)
  tree = {"scalar": np.float32(3.0), "bias": rng.normal(size=7),
          "w": rng.normal(size=(5, 4)), "conv": rng.normal(size=(3, 3, 2, 4)),
          "empty": np.zeros((0, 3)), "big": 1e3 * rng.normal(size=(64, 33))}
  expected = np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                         for x in tree.values()))
  as32 = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)
  got = jax.jit(train.global_norm)(as32)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(float(got), expected, rtol=2e-6)
  np.testing.assert_allclose(float(got), float(optax.tree.norm(as32)),
                             rtol=2e-6)
  # bf16 gradients are squared and summed in float32, not bf16.
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), as32)
  ref16 = np.sqrt(sum(np.sum(np.square(np.asarray(x, np.float64)))
                      for x in jax.tree.leaves(bf16)))
  got16 = train.global_norm(bf16)
  assert got16.dtype == jnp.float32
  np.testing.assert_allclose(float(got16), ref16, rtol=2e-6)
  assert float(train.global_norm({})) == 0.0
  assert float(train.global_norm({"e": jnp.zeros((0,))})) == 0.0


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_global_norm_is_non_finite_when_a_leaf_is(bad):
  g = {"w": np.ones((4, 3), np.float32), "b": np.ones(3, np.float32)}
  g["w"][2, 1] = bad
  assert not np.isfinite(float(jax.jit(train.global_norm)(g)))


@pytest.mark.integration
def test_kd_alpha_one_is_hard_and_alpha_zero_is_soft():
  batch, rng, teacher = _float_batch(1), jax.random.key(0), _teacher()
  hard, _ = _jit_step("hard")(_state(alpha=1.0), None, batch, rng)
  kd1, _ = _jit_step("kd")(_state(alpha=1.0), teacher, batch, rng)
  chex.assert_trees_all_close(kd1.params, hard.params, rtol=1e-6, atol=1e-7)
  soft, _ = _jit_step("soft")(_state(alpha=0.0), teacher, batch, rng)
  kd0, _ = _jit_step("kd")(_state(alpha=0.0), teacher, batch, rng)
  chex.assert_trees_all_close(kd0.params, soft.params, rtol=1e-6, atol=1e-7)
  # 'soft' ignores alpha; and the objectives really are different.
  soft_a, _ = _jit_step("soft")(_state(alpha=0.7), teacher, batch, rng)
  chex.assert_trees_all_close(soft_a.params, soft.params, rtol=1e-6, atol=1e-7)
  assert not np.allclose(hard.params["Dense_1"]["bias"],
                         soft.params["Dense_1"]["bias"], atol=1e-5)


# ----------------------------------------------------------------------------
# Non-finite steps.
# ----------------------------------------------------------------------------


def _nan_batch():
  batch = _float_batch(3)
  image = batch["image"].copy()
  image[5, 3, 4] = np.nan
  return {**batch, "image": image}


@pytest.mark.integration
@pytest.mark.parametrize("skip_impl", ["cond", "select"])
def test_skip_nonfinite_keeps_params_and_opt_state(skip_impl):
  step = _jit_step("kd", skip_impl=skip_impl)
  rng = jax.random.key(0)
  # One good step first, so Adam's moments are non-trivial.
  state, _ = step(_state(ADAM), _teacher(), _float_batch(4), rng)
  before = jax.device_get((state.params, state.opt_state))
  state, metrics = step(state, _teacher(), _nan_batch(), rng)
  _assert_trees_equal((state.params, state.opt_state), before)
  assert int(state.skipped) == 1
  assert int(state.step) == 2
  assert float(metrics["finite"]) == 0.0
  assert not np.isfinite(float(metrics["loss"]))
  # Training goes on normally afterwards.
  state, metrics = step(state, _teacher(), _float_batch(5), rng)
  assert float(metrics["finite"]) == 1.0
  assert int(state.skipped) == 1 and int(state.step) == 3
  assert _trees_differ(state.params, before[0])


@pytest.mark.integration
def test_skip_implementations_agree_on_finite_steps():
  states = []
  for impl in ("cond", "select"):
    step = _jit_step("kd", skip_impl=impl)
    state = _state(ADAM)
    for i in range(3):
      state, _ = step(state, _teacher(), _float_batch(10 + i),
                      jax.random.key(1))
    states.append(jax.device_get((state.params, state.opt_state)))
  _assert_trees_equal(states[0], states[1])
  with pytest.raises(ValueError, match="skip_impl"):
    train.make_train_step("kd", skip_impl="maybe")


def test_without_skip_nonfinite_params_become_nan():
  step = _jit_step("kd", skip_nonfinite=False)
  state, metrics = step(_state(), _teacher(), _nan_batch(), jax.random.key(0))
  assert float(metrics["finite"]) == 0.0
  assert int(state.step) == 1
  # The NaN example's logit gradient reaches every output unit.
  assert np.isnan(state.params["Dense_1"]["bias"]).all()
  assert np.isnan(state.params["Dense_0"]["kernel"]).any()


# ----------------------------------------------------------------------------
# jit == pmap == sharded jit.
# ----------------------------------------------------------------------------


@pytest.mark.integration
def test_jit_pmap_and_sharded_jit_agree():
  assert jax.device_count() == 8
  objective, rng, teacher = "kd", jax.random.key(0), _teacher()
  batches = [_float_batch(10 + i, n=32) for i in range(3)]

  jit_step = _jit_step(objective)
  pmap_step = train.pmap_train_step(objective)
  mesh = train.data_mesh()
  sharded_step = train.sharded_train_step(mesh, objective)

  s_jit = _state(MOMENTUM)
  s_pmap = train.replicate(_state(MOMENTUM))
  replicated_sharding = s_pmap.step.sharding
  # Placed as the step's outputs are, so that step 2 reuses step 1's program.
  s_mesh = jax.device_put(_state(MOMENTUM), NamedSharding(mesh, P()))
  for batch in batches:
    s_jit, m_jit = jit_step(s_jit, teacher, batch, rng)
    s_pmap, m_pmap = pmap_step(s_pmap, teacher, train.shard_batch(batch), rng)
    s_mesh, m_mesh = sharded_step(s_mesh, teacher,
                                  train.shard_batch(batch, mesh), rng)
  # One compilation each: replicate() places the state exactly as the pmapped
  # step returns it (same mesh axis name), so later steps do not retrace.
  assert s_pmap.step.sharding == replicated_sharding
  assert sharded_step._cache_size() == 1  # pylint: disable=protected-access
  assert s_pmap.step.shape == (8,)
  # Every replica holds the same parameters.
  for leaf in jax.tree.leaves(s_pmap.params):
    np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[0], leaf.shape))
  s_pmap = train.unreplicate(s_pmap)
  m_pmap = train.unreplicate(m_pmap)
  for other, m_other in ((s_pmap, m_pmap), (s_mesh, m_mesh)):
    chex.assert_trees_all_close(other.params, s_jit.params, rtol=1e-6,
                                atol=1e-6)
    chex.assert_trees_all_close(other.opt_state, s_jit.opt_state, rtol=1e-6,
                                atol=1e-6)
    assert int(other.step) == 3
    chex.assert_trees_all_close(m_other, m_jit, rtol=1e-5, atol=1e-6)


class DropoutMLP(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Dense(16)(x.reshape(x.shape[0], -1)))
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.Dense(NUM_CLASSES)(x)


DROPOUT_STUDENT = DropoutMLP()


def _linen_dropout_apply(params, x, training, rng):
  return DROPOUT_STUDENT.apply({"params": params}, x, train=training,
                               rngs={"dropout": rng})


@pytest.mark.integration
def test_sharded_jit_equals_jit_with_dropout_and_pmap_does_not():
  """What the module docstring claims for a stochastic student."""
  objective, rng, teacher = "kd", jax.random.key(0), _teacher()
  batch = _float_batch(10, n=32)
  params = np_init(DROPOUT_STUDENT, 3)["params"]

  def fresh():
    return train.TrainState.create(
        apply_fn=_linen_dropout_apply, params=jax.tree.map(jnp.copy, params),
        tx=MOMENTUM, temperature=TEMPERATURE, alpha=ALPHA)

  mesh = train.data_mesh()
  s_jit, _ = train.jit_train_step(objective)(fresh(), teacher, batch, rng)
  s_mesh, _ = train.sharded_train_step(mesh, objective)(
      jax.device_put(fresh(), NamedSharding(mesh, P())), teacher,
      train.shard_batch(batch, mesh), rng)
  s_pmap, _ = train.pmap_train_step(objective)(
      train.replicate(fresh()), teacher, train.shard_batch(batch), rng)
  chex.assert_trees_all_close(s_mesh.params, s_jit.params, rtol=1e-6,
                              atol=1e-6)
  # pmap: each device its own masks, so a different (equally valid) update.
  diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(train.unreplicate(s_pmap).params),
      jax.tree.leaves(s_jit.params)))
  assert diff > 1e-4


# ----------------------------------------------------------------------------
# The teacher-logit cache.
# ----------------------------------------------------------------------------


def test_compute_teacher_logits_ragged():
  teacher = _teacher()
  data = _data(50)  # 50 = 3 * 16 + 2: the last batch is padded.
  logits = cache.compute_teacher_logits(teacher, data["image"], batch_size=16)
  assert logits.shape == (50, NUM_CLASSES) and logits.dtype == jnp.float32
  expected = teacher(data["image"].astype(np.float32) / 255.0)
  np.testing.assert_allclose(logits, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.integration
def test_cached_teacher_equals_online_teacher_over_an_epoch():
  data, rng, teacher = _device_data(), jax.random.key(0), _teacher()
  epoch = _epoch_fn()
  online, m_online = epoch(_state(), teacher, data, rng, 0)
  cached_data = cache.with_teacher_logits(data, teacher)
  assert set(cached_data) == {"image", "label", "teacher_logits"}
  cached, m_cached = epoch(_state(), None, cached_data, rng, 0)
  # Bit-identical on jax 0.10; XLA may round the teacher's forward pass
  # differently inside the step and in the cache's own program (jax 0.8: one
  # float32 ulp on some logits), so compare to float32 rounding. A cache
  # that misaligned or mis-scaled the logits would be off by far more.
  for x, y in zip(jax.tree.leaves((cached.params, m_cached)),
                  jax.tree.leaves((online.params, m_online))):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5,
                               atol=1e-8)
  assert _trees_differ(cached.params, _state().params)  # it trained


# ----------------------------------------------------------------------------
# The on-device epoch and the host loop.
# ----------------------------------------------------------------------------


def test_epoch_is_deterministic_and_order_depends_on_epoch():
  data, rng, teacher = _device_data(), jax.random.key(0), _teacher()
  epoch = _epoch_fn()
  a, m_a = epoch(_state(), teacher, data, rng, 0)
  b, m_b = epoch(_state(), teacher, data, rng, 0)
  _assert_trees_equal(a.params, b.params)
  _assert_trees_equal(m_a, m_b)
  assert int(a.step) == NUM_EXAMPLES // BATCH
  c, _ = epoch(_state(), teacher, data, rng, 1)
  assert _trees_differ(a.params, c.params)
  d, _ = epoch(_state(), teacher, data, jax.random.key(1), 0)
  assert _trees_differ(a.params, d.params)
  perm0 = jax.random.permutation(loops.epoch_key(rng, 0), NUM_EXAMPLES)
  perm1 = jax.random.permutation(loops.epoch_key(rng, 1), NUM_EXAMPLES)
  assert not np.array_equal(perm0, perm1)


def _batches_in_epoch_order(data, rng, epoch_index, batch_size=BATCH):
  n = len(data["label"])
  perm = np.asarray(jax.random.permutation(loops.epoch_key(rng, epoch_index),
                                           n))
  return [{k: np.asarray(v)[perm[i:i + batch_size]] for k, v in data.items()}
          for i in range(0, n - batch_size + 1, batch_size)]


@pytest.mark.integration
def test_epoch_equals_manual_steps():
  # NUM_EXAMPLES = 70 in batches of 16: 4 steps, the last 6 examples of the
  # epoch's order are dropped.
  data, rng, teacher = _device_data(), jax.random.key(3), _teacher()
  state, metrics = _epoch_fn()(_state(), teacher, data, rng, 2)
  assert loops.make_epoch_fn(train.make_train_step("kd"), batch_size=BATCH,
                             num_examples=NUM_EXAMPLES).steps_per_epoch == 4
  assert int(state.step) == 4

  manual = _state()
  history = []
  batches = _batches_in_epoch_order(_data(), rng, 2)
  assert len(batches) == 4
  for batch in batches:
    manual, m = _jit_step("kd")(manual, teacher, batch, rng)
    history.append(m)
  chex.assert_trees_all_close(state.params, manual.params, rtol=1e-5,
                              atol=1e-6)
  chex.assert_trees_all_close(
      metrics, jax.tree.map(lambda *m: jnp.mean(jnp.stack(m)), *history),
      rtol=1e-5, atol=1e-6)


def test_epoch_does_not_retrace():
  epoch = _epoch_fn()
  data, rng, teacher = _device_data(), jax.random.key(0), _teacher()
  state, _ = epoch(_state(), teacher, data, rng, 0)
  traces = len(_EPOCH_STEP_TRACES)
  assert traces >= 1
  # New epoch indices, keys and the state returned by the previous call all
  # reuse the compiled epoch.
  state, _ = epoch(state, teacher, data, rng, 1)
  state, _ = epoch(state, teacher, data, jax.random.key(5), 2)
  assert len(_EPOCH_STEP_TRACES) == traces
  assert int(state.step) == 3 * (NUM_EXAMPLES // BATCH)


def test_make_epoch_fn_validates():
  with pytest.raises(ValueError, match="batch_size"):
    loops.make_epoch_fn(train.make_train_step("kd"), batch_size=0,
                        num_examples=10)
  with pytest.raises(ValueError, match="batch_size"):
    loops.make_epoch_fn(train.make_train_step("kd"), batch_size=20,
                        num_examples=10)
  epoch = loops.make_epoch_fn(train.make_train_step("kd"), batch_size=BATCH,
                              num_examples=NUM_EXAMPLES)
  data = {**_device_data(), "label": jnp.zeros((10,), jnp.int32)}
  with pytest.raises(ValueError, match="label"):
    epoch(_state(), _teacher(), data, jax.random.key(0), 0)


# ----------------------------------------------------------------------------
# Vectorised sweeps.
# ----------------------------------------------------------------------------


def _dropout_apply(params, x, training, rng):
  """A plain-function student with dropout: its key must match per member."""
  h = jax.nn.relu(x.reshape(x.shape[0], -1) @ params["w1"] + params["b1"])
  if training:
    h = jnp.where(jax.random.bernoulli(rng, 0.8, h.shape), h / 0.8, 0.0)
  return h @ params["w2"]


def _sweep_init(rng, temperature, alpha):
  # One normal draw, sliced: XLA:CPU compiles this much faster than one
  # jax.random.normal per differently-shaped weight.
  z = 0.1 * jax.random.normal(rng, (64 * 16 + 16 * NUM_CLASSES,))
  params = {"w1": z[:64 * 16].reshape(64, 16), "b1": jnp.zeros((16,)),
            "w2": z[64 * 16:].reshape(16, NUM_CLASSES)}
  return train.TrainState.create(apply_fn=_dropout_apply, params=params,
                                 tx=MOMENTUM, temperature=temperature,
                                 alpha=alpha)


@pytest.mark.integration
def test_sweep_members_equal_runs_alone():
  seeds, temps, alphas = [0, 1, 2], [1.0, 4.0, 20.0], [0.0, 0.1, 0.5]
  states = sweep.create_sweep(_sweep_init, seeds=seeds, temperatures=temps,
                              alphas=alphas)
  assert sweep.num_members(states) == 3
  np.testing.assert_array_equal(states.temperature,
                                np.asarray(temps, np.float32))
  np.testing.assert_array_equal(states.alpha, np.asarray(alphas, np.float32))

  raw_epoch = loops.make_epoch_fn(train.make_train_step("kd"),
                                  batch_size=BATCH, num_examples=NUM_EXAMPLES)
  data, teacher, keys = _device_data(), _teacher(), sweep.sweep_keys(seeds)
  swept, metrics = jax.jit(sweep.vmap_epoch(raw_epoch))(states, teacher, data,
                                                       keys, 0)
  assert metrics["loss"].shape == (3,)
  alone_init, alone_epoch = jax.jit(_sweep_init), jax.jit(raw_epoch)
  for i, (seed, t, a) in enumerate(zip(seeds, temps, alphas)):
    alone = alone_init(jax.random.key(seed), t, a)
    chex.assert_trees_all_close(sweep.member(states, i).params, alone.params,
                                rtol=1e-6, atol=1e-7)
    alone, m_alone = alone_epoch(alone, teacher, data, jax.random.key(seed), 0)
    member = sweep.member(swept, i)
    chex.assert_trees_all_close(member.params, alone.params, rtol=1e-5,
                                atol=1e-6)
    np.testing.assert_allclose(member.temperature, t)
    np.testing.assert_allclose(member.alpha, a)
    assert int(member.step) == NUM_EXAMPLES // BATCH
    np.testing.assert_allclose(metrics["loss"][i], m_alone["loss"], rtol=1e-5,
                               atol=1e-6)


def test_create_sweep_validates():
  with pytest.raises(ValueError, match="temperature"):
    sweep.create_sweep(_sweep_init, seeds=[0, 1], temperatures=[1.0, 0.0],
                       alphas=[0.1, 0.1])
  with pytest.raises(ValueError, match="temperature"):
    sweep.create_sweep(_sweep_init, seeds=[0], temperatures=[-2.0],
                       alphas=[0.1])
  with pytest.raises(ValueError, match="alpha"):
    sweep.create_sweep(_sweep_init, seeds=[0], temperatures=[2.0],
                       alphas=[1.5])
  with pytest.raises(ValueError, match="equal length"):
    sweep.create_sweep(_sweep_init, seeds=[0, 1], temperatures=[1.0],
                       alphas=[0.1, 0.1])
  with pytest.raises(ValueError, match="equal length"):
    sweep.create_sweep(_sweep_init, seeds=[0, 1], temperatures=[1.0, 2.0],
                       alphas=[0.1])
  with pytest.raises(ValueError, match="equal length"):
    sweep.create_sweep(_sweep_init, seeds=[], temperatures=[], alphas=[])
