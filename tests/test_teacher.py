"""Tests for kdjax.teacher: a frozen, inference-mode teacher.

The teacher must never change (params, batch statistics), never receive a
gradient, never enter the optimizer state, and always run in eval mode
(no dropout, running batch statistics), whichever constructor built it.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from kdjax import losses, train
from kdjax.teacher import Teacher, ensemble

from _helpers import NnxMLP, np_init
from _helpers import OptionsMLP as MLP
from _helpers import assert_trees_equal as _assert_trees_equal

NUM_CLASSES = 10
TEMPERATURE = 3.0


def _images(seed, n=16):
  # NumPy, not jax.random: eager JAX ops each cost a small compilation.
  return np.random.RandomState(seed).rand(n, 8, 8).astype(np.float32)


def _batch(seed, n=16):
  rng = np.random.RandomState(seed)
  return {"image": rng.rand(n, 8, 8).astype(np.float32),
          "label": rng.randint(0, NUM_CLASSES, (n,)).astype(np.int32)}


def _np_copy(tree):
  return jax.tree.map(lambda x: np.array(x, copy=True), tree)


# Module-level student, optimizers and compiled steps: ``apply_fn``, ``tx``
# and the step are static (hashed by identity), so sharing them lets tests
# reuse one compilation instead of recompiling per test.
STUDENT = MLP(16)
SGD = optax.sgd(0.1)
ADAM = optax.adam(1e-2)


def _student_apply(p, x, training, rng):
  del rng  # Deterministic student (no dropout).
  return STUDENT.apply({"params": p}, x, train=training)


@functools.cache
def _student_params(seed):
  return np_init(STUDENT, seed)["params"]


@functools.cache
def _jit_step(objective):
  return train.jit_train_step(objective)


def _student_state(tx=SGD, seed=2, temperature=TEMPERATURE, alpha=0.3):
  """A deterministic (no dropout) linen student of width 16."""
  # A fresh copy: the jitted steps donate the state's buffers.
  params = jax.tree.map(jnp.copy, _student_params(seed))
  return train.TrainState.create(
      apply_fn=_student_apply, params=params, tx=tx,
      temperature=temperature, alpha=alpha)


@pytest.fixture(scope="module")
def bn_dropout_teacher():
  """A linen teacher with BatchNorm (non-trivial running stats) and Dropout."""
  module = MLP(64, dropout=0.5, batchnorm=True)
  variables = np_init(module, 1)
  # Move the running statistics away from their (0, 1) initial values.
  update = jax.jit(lambda v, x, r: module.apply(
      v, x, train=True, mutable=["batch_stats"], rngs={"dropout": r})[1])
  for i in range(3):
    variables = {**variables, **update(variables, 3.0 * _images(100 + i, 32)
                                       + 1.0, jax.random.key(i))}
  return module, variables, Teacher.from_linen(module, variables)


# ----------------------------------------------------------------------------
# Frozen: unchanged by training, never in the optimizer state.
# ----------------------------------------------------------------------------


def test_from_linen_splits_params_and_batch_stats(bn_dropout_teacher):
  _, variables, teacher = bn_dropout_teacher
  _assert_trees_equal(teacher.params, variables["params"])
  assert set(teacher.state) == {"batch_stats"}
  _assert_trees_equal(teacher.state["batch_stats"], variables["batch_stats"])


def test_from_linen_requires_params_collection():
  with pytest.raises(ValueError, match="params"):
    Teacher.from_linen(MLP(), {"batch_stats": {}})


def test_teacher_unchanged_after_jitted_steps(bn_dropout_teacher):
  _, _, teacher = bn_dropout_teacher
  saved_params = _np_copy(teacher.params)
  saved_state = _np_copy(teacher.state)
  step = _jit_step("kd")
  state = _student_state(ADAM)
  initial_student = _np_copy(state.params)
  for i in range(3):
    state, metrics = step(state, teacher, _batch(i), jax.random.key(i))
  assert int(state.step) == 3
  assert float(metrics["finite"]) == 1.0
  # The student did train ...
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(initial_student), jax.tree.leaves(state.params)))
  # ... the teacher did not (and was not donated).
  for leaf in jax.tree.leaves((teacher.params, teacher.state)):
    assert not leaf.is_deleted()
  _assert_trees_equal(teacher.params, saved_params)
  _assert_trees_equal(teacher.state, saved_state)


def test_teacher_never_in_optimizer_state(bn_dropout_teacher):
  _, _, teacher = bn_dropout_teacher
  state = _student_state(ADAM)
  expected = ADAM.init(state.params)
  state, _ = _jit_step("kd")(state, teacher, _batch(0), jax.random.key(0))
  assert (jax.tree.structure(state.opt_state)
          == jax.tree.structure(expected))
  # Teacher (width 64) and student (width 16) shapes differ: no teacher-shaped
  # buffer may appear anywhere in the optimizer state.
  teacher_shapes = {np.shape(x) for x in jax.tree.leaves(teacher.params)}
  student_shapes = {np.shape(x) for x in jax.tree.leaves(state.params)}
  only_teacher = teacher_shapes - student_shapes
  assert only_teacher
  opt_shapes = {np.shape(x) for x in jax.tree.leaves(state.opt_state)}
  assert not opt_shapes & only_teacher
  # And the train state has no teacher field at all.
  state_shapes = {np.shape(x) for x in jax.tree.leaves(state)}
  assert not state_shapes & only_teacher


def test_no_gradient_reaches_teacher(bn_dropout_teacher):
  _, _, teacher = bn_dropout_teacher
  x = _images(0)

  def loss_params(params):
    return jnp.sum(teacher.replace(params=params)(x) ** 2)

  def loss_teacher(t):
    return jnp.sum(jnp.tanh(t(x)))

  grads = jax.grad(loss_params)(teacher.params)
  for g in jax.tree.leaves(grads):
    np.testing.assert_array_equal(g, np.zeros_like(g))
  grads = jax.grad(loss_teacher)(teacher)  # Params and batch stats alike.
  assert jax.tree.leaves(grads)
  for g in jax.tree.leaves(grads):
    np.testing.assert_array_equal(g, np.zeros_like(g))
  # Nor does any gradient flow back into the inputs through the teacher.
  gx = jax.grad(lambda x: jnp.sum(teacher(x)))(x)
  np.testing.assert_array_equal(gx, np.zeros_like(gx))


# ----------------------------------------------------------------------------
# Inference mode: no dropout, running batch statistics.
# ----------------------------------------------------------------------------


def test_linen_teacher_is_in_eval_mode(bn_dropout_teacher):
  module, variables, teacher = bn_dropout_teacher
  x = _images(1)
  expected = module.apply(variables, x, train=False)
  out1, out2 = teacher(x), jax.jit(lambda t, x: t(x))(teacher, x)
  np.testing.assert_array_equal(out1, expected)
  np.testing.assert_allclose(out2, expected, rtol=1e-6, atol=1e-6)
  # Train mode would differ (dropout and batch statistics), so the equality
  # above is not vacuous.
  train_out, _ = module.apply(variables, x, train=True, mutable=["batch_stats"],
                              rngs={"dropout": jax.random.key(0)})
  assert not np.allclose(train_out, expected, atol=1e-3)


def test_linen_teacher_uses_running_batch_stats(bn_dropout_teacher):
  module, variables, teacher = bn_dropout_teacher
  x = _images(2)
  fresh = np_init(module, 1)  # Initial statistics: mean 0, variance 1.
  # Same params, initial (0, 1) statistics: a different output.
  fresh_out = module.apply({"params": variables["params"],
                            "batch_stats": fresh["batch_stats"]}, x,
                           train=False)
  assert not np.allclose(teacher(x), fresh_out, atol=1e-3)
  np.testing.assert_array_equal(teacher(x),
                                module.apply(variables, x, train=False))


def test_teacher_ignores_step_rng(bn_dropout_teacher):
  # With a deterministic student the step's rng only feeds dropout and
  # augmentation; a teacher in eval mode makes the result rng-independent.
  _, _, teacher = bn_dropout_teacher
  step = _jit_step("soft")
  batch = _batch(3)
  s1, m1 = step(_student_state(), teacher, batch, jax.random.key(0))
  s2, m2 = step(_student_state(), teacher, batch, jax.random.key(12345))
  _assert_trees_equal(s1.params, s2.params)
  assert float(m1["loss"]) == float(m2["loss"])


def test_from_linen_custom_eval_kwargs():

  class Det(nn.Module):

    @nn.compact
    def __call__(self, x, deterministic: bool = False):
      x = nn.Dense(NUM_CLASSES)(x.reshape(x.shape[0], -1))
      return nn.Dropout(0.5, deterministic=deterministic)(x)

  module = Det()
  variables = np_init(module, 0, deterministic=True)
  teacher = Teacher.from_linen(module, variables, deterministic=True)
  x = _images(3)
  np.testing.assert_array_equal(
      teacher(x), module.apply(variables, x, deterministic=True))


# ----------------------------------------------------------------------------
# Other constructors: NNX, plain functions; plain-function students.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nnx_teacher():
  model = NnxMLP(nnx.Rngs(0, dropout=1), width=32)
  model.train()  # from_nnx takes an eval-mode snapshot of it...
  teacher = Teacher.from_nnx(model)
  # ... without switching the caller's module; switch it here to compare.
  assert all(not m.deterministic for _, m in nnx.iter_graph(model)
             if isinstance(m, nnx.Dropout))
  model.eval()
  return model, teacher


def test_from_nnx_matches_model_in_eval_mode(nnx_teacher):
  model, teacher = nnx_teacher
  x = _images(4)
  expected = model(x)  # The fixture switched the model to eval mode.
  np.testing.assert_array_equal(model(x), expected)
  np.testing.assert_allclose(teacher(x), expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(jax.jit(lambda t, x: t(x))(teacher, x), expected,
                             rtol=1e-6, atol=1e-6)
  # The same model in train mode differs (dropout, batch statistics).
  clone = nnx.clone(model)
  clone.train()
  assert not np.allclose(clone(x), expected, atol=1e-3)


def test_from_nnx_in_jitted_train_step(nnx_teacher):
  model, teacher = nnx_teacher
  saved = _np_copy(nnx.state(model, nnx.BatchStat))
  batch = _batch(5)
  cached = {**batch, "teacher_logits": np.asarray(model(batch["image"]))}
  step = _jit_step("kd")
  s_online, m_online = step(_student_state(), teacher, batch,
                            jax.random.key(0))
  s_cached, m_cached = step(_student_state(), None, cached, jax.random.key(0))
  assert float(m_online["finite"]) == 1.0
  np.testing.assert_allclose(m_online["soft_loss"], m_cached["soft_loss"],
                             rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s_online.params),
                  jax.tree.leaves(s_cached.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  # The step did not update the model's batch statistics.
  _assert_trees_equal(nnx.state(model, nnx.BatchStat), saved)


@pytest.mark.integration
def test_from_fn_teacher():
  w = np.random.RandomState(7).randn(64, NUM_CLASSES).astype(np.float32)
  teacher = Teacher.from_fn(lambda p, x: x.reshape(len(x), -1) @ p["w"],
                            {"w": w})
  assert teacher.state == {}
  batch = _batch(6)
  x = batch["image"]
  expected = x.reshape(len(x), -1) @ w
  np.testing.assert_allclose(teacher(x), expected, rtol=1e-6, atol=1e-6)
  step = _jit_step("kd")
  s_online, _ = step(_student_state(), teacher, batch, jax.random.key(0))
  s_cached, _ = step(_student_state(), None,
                     {**batch, "teacher_logits": teacher(x)},
                     jax.random.key(0))
  for a, b in zip(jax.tree.leaves(s_online.params),
                  jax.tree.leaves(s_cached.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_plain_function_student_trains(bn_dropout_teacher):
  """A student written without Flax: ``apply_fn(params, x, train, rng)``."""
  _, _, teacher = bn_dropout_teacher
  init = np.random.RandomState(3)
  params = {"w1": 0.1 * init.randn(64, 32).astype(np.float32),
            "b1": np.zeros(32, np.float32),
            "w2": 0.1 * init.randn(32, NUM_CLASSES).astype(np.float32)}

  def apply_fn(p, x, training, rng):
    h = jnp.tanh(x.reshape(x.shape[0], -1) @ p["w1"] + p["b1"])
    if training:  # Inverted dropout from the step's key.
      keep = jax.random.bernoulli(rng, 0.9, h.shape)
      h = jnp.where(keep, h / 0.9, 0.0)
    return h @ p["w2"]

  state = train.TrainState.create(apply_fn=apply_fn, params=params,
                                  tx=optax.adam(3e-2), temperature=2.0,
                                  alpha=0.5)
  step = _jit_step("kd")
  batch = _batch(7, 32)
  rng = jax.random.key(0)
  history = []
  for _ in range(25):
    state, metrics = step(state, teacher, batch, rng)
    history.append(float(metrics["loss"]))
  assert np.all(np.isfinite(history))
  assert np.mean(history[-3:]) < 0.5 * np.mean(history[:3])
  assert int(state.skipped) == 0


# ----------------------------------------------------------------------------
# Ensembles.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def members(bn_dropout_teacher):
  _, _, bn = bn_dropout_teacher
  w = np.random.RandomState(12).randn(64, NUM_CLASSES).astype(np.float32)
  linear = Teacher.from_fn(lambda p, x: x.reshape(len(x), -1) @ p["w"],
                           {"w": w})
  plain = Teacher.from_linen(STUDENT, {"params": _student_params(11)})
  return [bn, plain, linear]


def test_ensemble_mean_logits(members):
  x = _images(8)
  member_logits = np.stack([np.asarray(t(x)) for t in members])
  ens = ensemble(members)
  logits = ens(x)
  np.testing.assert_allclose(logits, member_logits.mean(0), rtol=1e-6,
                             atol=1e-6)
  np.testing.assert_allclose(jax.jit(lambda t, x: t(x))(ens, x), logits,
                             rtol=1e-6, atol=1e-6)
  assert len(ens.params) == len(members)
  # At every temperature: the renormalised geometric mean of the members'
  # tempered probabilities.
  for temperature in (1.0, 2.5, 10.0):
    q = np.asarray(jax.nn.softmax(member_logits / temperature, axis=-1),
                   np.float64)
    geo = np.prod(q ** (1.0 / len(members)), axis=0)
    geo /= geo.sum(-1, keepdims=True)
    np.testing.assert_allclose(
        losses.tempered_softmax(logits, temperature), geo, rtol=1e-5,
        atol=1e-7)


@pytest.mark.integration
@pytest.mark.parametrize("temperature", [1.0, 4.0, 20.0])
def test_ensemble_arithmetic(members, temperature):
  x = _images(9)
  member_logits = jnp.stack([t(x) for t in members])
  ens = ensemble(members, combine="arithmetic", temperature=temperature)
  expected = jnp.mean(jax.nn.softmax(member_logits / temperature, axis=-1), 0)
  np.testing.assert_allclose(
      jax.nn.softmax(ens(x) / temperature, axis=-1), expected, rtol=1e-5,
      atol=1e-7)
  # It is not the geometric mean (the two combinations really differ).
  geo = jax.nn.softmax(member_logits.mean(0) / temperature, axis=-1)
  assert not np.allclose(geo, expected, rtol=1e-4, atol=1e-5)


def test_ensemble_in_train_step(members):
  ens = ensemble(members)
  batch = _batch(10)
  state, metrics = _jit_step("kd")(_student_state(), ens, batch,
                                   jax.random.key(0))
  assert float(metrics["finite"]) == 1.0
  assert int(state.step) == 1


def test_ensemble_errors(members):
  with pytest.raises(ValueError, match="combine"):
    ensemble(members, combine="median")
  with pytest.raises(ValueError, match="temperature"):
    ensemble(members, combine="arithmetic")
  with pytest.raises(ValueError, match="temperature"):
    ensemble(members, combine="arithmetic", temperature=0.0)
  with pytest.raises(ValueError, match="at least one"):
    ensemble([])
