"""Tests for kdjax.paper.models, .constraints and .augment."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax.paper import augment, constraints, models


# ----------------------------------------------------------------------------
# Models.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher():
  net = models.paper_teacher()
  return net, models.init_params(net, jax.random.key(0), (1, 28, 28))


@pytest.fixture(scope="module")
def student():
  net = models.paper_student()
  return net, models.init_params(net, jax.random.key(1), (1, 28, 28))


def _shapes(params):
  return jax.tree.map(lambda x: tuple(x.shape), params)


def test_paper_teacher_param_count_and_names(teacher):
  net, params = teacher
  assert models.count_params(params) == 2_395_210
  assert set(params) == {"hidden_0", "hidden_1", "logits"}
  assert _shapes(params) == {
      "hidden_0": {"kernel": (784, 1200), "bias": (1200,)},
      "hidden_1": {"kernel": (1200, 1200), "bias": (1200,)},
      "logits": {"kernel": (1200, 10), "bias": (10,)},
  }
  assert (net.input_dropout, net.hidden_dropout) == (0.2, 0.5)


def test_paper_student_param_count(student):
  net, params = student
  assert models.count_params(params) == 1_276_810
  assert set(params) == {"hidden_0", "hidden_1", "logits"}
  assert (net.input_dropout, net.hidden_dropout) == (0.0, 0.0)
  assert params["logits"]["bias"].shape == (10,)


@pytest.mark.integration
def test_paper_student_width():
  params = models.init_params(models.paper_student(width=30),
                              jax.random.key(0), (1, 28, 28))
  assert models.count_params(params) == (784 * 30 + 30 + 30 * 30 + 30
                                         + 30 * 10 + 10)


@pytest.mark.integration
@pytest.mark.parametrize("shape", [(5, 28, 28), (5, 784), (5, 28, 28, 1)])
def test_mlp_output_shape_any_input_layout(student, shape):
  net, params = student
  x = jax.random.uniform(jax.random.key(2), shape)
  out = net.apply({"params": params}, x)
  assert out.shape == (5, 10)
  assert out.dtype == jnp.float32
  # All layouts flatten to the same 784 features.
  flat = net.apply({"params": params}, x.reshape(5, 784))
  np.testing.assert_array_equal(out, flat)


def test_mlp_rejects_unbatched_vector():
  net = models.MLP((4,))
  with pytest.raises(ValueError, match="batch axis"):
    net.init(jax.random.key(0), jnp.zeros((784,)))


def test_mlp_eval_mode_is_deterministic_and_ignores_rng(teacher):
  net, params = teacher
  apply = models.linen_student_apply(net)
  x = jax.random.uniform(jax.random.key(3), (4, 28, 28))
  a = apply(params, x, False, jax.random.key(10))
  b = apply(params, x, False, jax.random.key(11))
  c = apply(params, x, False, None)
  d = net.apply({"params": params}, x)  # default train=False, no rngs
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a, c)
  np.testing.assert_array_equal(a, d)


def test_mlp_dropout_active_in_train_mode(teacher):
  net, params = teacher
  apply = models.linen_student_apply(net)
  x = jax.random.uniform(jax.random.key(3), (4, 28, 28))
  a = apply(params, x, True, jax.random.key(10))
  b = apply(params, x, True, jax.random.key(11))
  a2 = apply(params, x, True, jax.random.key(10))
  ev = apply(params, x, False, None)
  assert not np.allclose(a, b)
  assert not np.allclose(a, ev)
  np.testing.assert_array_equal(a, a2)  # same rng, same mask


def test_mlp_train_mode_needs_dropout_rng(teacher):
  net, params = teacher
  with pytest.raises(flax.errors.InvalidRngError):
    net.apply({"params": params}, jnp.zeros((1, 784)), train=True)


def test_student_without_dropout_train_equals_eval(student):
  net, params = student
  apply = models.linen_student_apply(net)
  x = jax.random.uniform(jax.random.key(4), (3, 784))
  np.testing.assert_array_equal(apply(params, x, True, jax.random.key(0)),
                                apply(params, x, False, None))


def test_uint8_input_equals_float_over_255(student):
  net, params = student
  raw = jax.random.randint(jax.random.key(5), (3, 28, 28), 0,
                           256).astype(jnp.uint8)
  out_u8 = net.apply({"params": params}, raw)
  out_f = net.apply({"params": params}, raw.astype(jnp.float32) / 255.0)
  np.testing.assert_allclose(out_u8, out_f, rtol=1e-6, atol=1e-6)


def test_float_input_not_rescaled(student):
  net, params = student
  x = jnp.full((1, 784), 2.0)
  a = net.apply({"params": params}, x)
  b = net.apply({"params": params}, x / 255.0)
  assert not np.allclose(a, b)


def test_teacher_apply_is_eval_mode(teacher):
  net, params = teacher
  t_apply = models.linen_teacher_apply(net)
  x = jax.random.uniform(jax.random.key(6), (4, 784))
  out = jax.jit(t_apply)({"params": params}, x)
  np.testing.assert_allclose(out, net.apply({"params": params}, x, train=False),
                             rtol=1e-5, atol=1e-5)


def test_student_apply_under_jit_with_static_train(student):
  net, params = student
  apply = jax.jit(models.linen_student_apply(net), static_argnums=2)
  x = jnp.ones((2, 28, 28))
  assert apply(params, x, True, jax.random.key(0)).shape == (2, 10)
  assert apply(params, x, False, None).shape == (2, 10)


def test_logits_bias_shift_changes_logits(student):
  net, params = student
  x = jnp.zeros((1, 784))
  shift = jnp.arange(10.0)
  shifted = jax.tree.map(lambda p: p, params)
  shifted["logits"] = dict(params["logits"],
                           bias=params["logits"]["bias"] + shift)
  np.testing.assert_allclose(
      net.apply({"params": shifted}, x) - net.apply({"params": params}, x),
      shift[None], rtol=1e-6, atol=1e-5)


@pytest.mark.integration
def test_cnn_shapes_and_params():
  net = models.CNN()
  params = models.init_params(net, jax.random.key(0), (1, 28, 28))
  assert set(params) == {"conv_0", "conv_1", "dense", "logits"}
  assert params["conv_0"]["kernel"].shape == (3, 3, 1, 32)
  assert models.count_params(params) == 421_642
  apply = jax.jit(net.apply, static_argnames="train")
  x = jax.random.uniform(jax.random.key(1), (3, 28, 28))
  # train=True is accepted, and no rng is needed.
  out = apply({"params": params}, x, train=True)
  assert out.shape == (3, 10)
  np.testing.assert_array_equal(out, apply({"params": params}, x))
  np.testing.assert_array_equal(out, apply({"params": params}, x[..., None]))
  u8 = (x * 255).astype(jnp.uint8)
  np.testing.assert_allclose(apply({"params": params}, u8),
                             apply({"params": params}, u8 / 255.0),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.integration
def test_cnn_custom_classes():
  net = models.CNN(num_classes=3, features=(4,), dense=8)
  params = models.init_params(net, jax.random.key(0), (1, 28, 28))
  out = net.apply({"params": params}, jnp.zeros((2, 28, 28)))
  assert out.shape == (2, 3)


def test_count_params_generic_tree():
  tree = {"a": jnp.zeros((2, 3)), "b": [jnp.zeros(4), np.zeros((1, 1, 5))]}
  assert models.count_params(tree) == 15
  assert models.count_params({}) == 0


# ----------------------------------------------------------------------------
# Max-norm constraint.
# ----------------------------------------------------------------------------

C = 15.0


def _np_project(w, c):
  """NumPy reference: rescale each column w[..., j] onto ||.||^2 <= c."""
  w = np.asarray(w, np.float64)
  sq = (w ** 2).reshape(-1, w.shape[-1]).sum(0)
  scale = np.where(sq > c, np.sqrt(c / np.maximum(sq, c)), 1.0)
  return w * scale


def _mixed_params(key):
  """Kernels with some columns far outside the ball and some inside."""
  k1, k2, k3 = jax.random.split(key, 3)
  dense = jax.random.normal(k1, (50, 6))
  # Columns 2 and 4 are outside.
  dense = dense * jnp.array([0.1, 0.2, 3.0, 0.3, 2.0, 0.05])
  conv = jax.random.normal(k2, (3, 3, 4, 5)) * jnp.array(
      [2.0, 0.1, 2.0, 0.2, 0.1])
  return {
      "hidden_0": {"kernel": dense, "bias": jax.random.normal(k3, (6,)) * 10},
      "conv_0": {"kernel": conv, "bias": jnp.full((5,), 100.0)},
  }


@pytest.mark.integration
def test_project_matches_numpy_reference():
  params = _mixed_params(jax.random.key(0))
  out = constraints.project_max_norm(params, C)
  for name in ("hidden_0", "conv_0"):
    w = params[name]["kernel"]
    np.testing.assert_allclose(out[name]["kernel"], _np_project(w, C),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out[name]["bias"], params[name]["bias"])
  # Some columns were actually projected, others were not.
  sq = np.sum(np.asarray(params["hidden_0"]["kernel"]) ** 2, axis=0)
  assert (sq > C).any() and (sq <= C).any()


@pytest.mark.integration
def test_project_inside_columns_exactly_unchanged_and_direction_kept():
  w = _mixed_params(jax.random.key(1))["hidden_0"]["kernel"]
  out = constraints.project_max_norm({"kernel": w}, C)["kernel"]
  sq = np.sum(np.asarray(w, np.float64) ** 2, axis=0)
  out_sq = np.sum(np.asarray(out, np.float64) ** 2, axis=0)
  inside = sq <= C
  np.testing.assert_array_equal(np.asarray(out)[:, inside],
                                np.asarray(w)[:, inside])
  np.testing.assert_allclose(out_sq[~inside], C, rtol=1e-5)
  # Direction: cosine similarity 1, positive scale.
  for j in np.flatnonzero(~inside):
    a, b = np.asarray(w[:, j], np.float64), np.asarray(out[:, j], np.float64)
    cos = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
    assert cos == pytest.approx(1.0, abs=1e-6)


def test_project_bf16_keeps_dtype():
  w = jnp.full((16, 3), 2.0, jnp.bfloat16)  # sq norm 64 > 15
  out = constraints.project_max_norm({"kernel": w}, C)["kernel"]
  assert out.dtype == jnp.bfloat16
  assert np.all(np.sum(np.asarray(out, np.float32) ** 2, 0) <= C * 1.02)


def _sgd_step_setup(lr=1.0):
  params = _mixed_params(jax.random.key(2))
  grads = jax.tree.map(lambda p: -0.5 * jnp.sign(p) * jnp.ones_like(p), params)
  tx = optax.chain(optax.sgd(lr), constraints.max_norm(C))
  return params, grads, tx


@pytest.mark.integration
def test_max_norm_chain_with_sgd_under_jit():
  params, grads, tx = _sgd_step_setup()
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  new, state = step(params, state)
  plain = optax.apply_updates(params, jax.tree.map(lambda g: -g, grads))
  for name in ("hidden_0", "conv_0"):
    k = np.asarray(new[name]["kernel"], np.float64)
    sq = np.sum(k.reshape(-1, k.shape[-1]) ** 2, axis=0)
    assert np.all(sq <= C * (1 + 1e-5)), sq
    # Equals the projection of the unconstrained step.
    np.testing.assert_allclose(k, _np_project(plain[name]["kernel"], C),
                               rtol=1e-5, atol=1e-6)
    # Biases get the plain SGD update.
    np.testing.assert_array_equal(new[name]["bias"], plain[name]["bias"])
  # A second step still works with the chained state.
  new2, _ = step(new, state)
  assert jax.tree.structure(new2) == jax.tree.structure(params)


def test_max_norm_inside_columns_get_exact_optimizer_update():
  params, grads, tx = _sgd_step_setup(lr=1e-3)  # tiny step
  updates, _ = tx.update(grads, tx.init(params), params)
  sgd_updates, _ = optax.sgd(1e-3).update(grads, optax.sgd(1e-3).init(params))
  k = (np.asarray(params["hidden_0"]["kernel"])
       + np.asarray(sgd_updates["hidden_0"]["kernel"]))
  inside = np.sum(k.astype(np.float64) ** 2, 0) <= C
  assert inside.any() and (~inside).any()
  np.testing.assert_array_equal(
      np.asarray(updates["hidden_0"]["kernel"])[:, inside],
      np.asarray(sgd_updates["hidden_0"]["kernel"])[:, inside])
  np.testing.assert_array_equal(updates["hidden_0"]["bias"],
                                sgd_updates["hidden_0"]["bias"])


def test_max_norm_noop_when_everything_inside():
  params = {"d": {"kernel": jnp.full((4, 3), 0.1), "bias": jnp.zeros(3)}}
  grads = jax.tree.map(jnp.ones_like, params)
  tx = optax.chain(optax.sgd(0.01), constraints.max_norm(C))
  updates, _ = tx.update(grads, tx.init(params), params)
  ref, _ = optax.sgd(0.01).update(grads, optax.sgd(0.01).init(params))
  jax.tree.map(np.testing.assert_array_equal, updates, ref)


def test_max_norm_on_mlp_params_and_custom_predicate():
  net = models.MLP((8,))
  params = models.init_params(net, jax.random.key(0), (1, 28, 28))
  params = jax.tree.map(lambda p: p * 100.0, params)
  out = constraints.project_max_norm(params, 1.0)
  for name in ("hidden_0", "logits"):
    assert np.all(np.sum(np.asarray(out[name]["kernel"]) ** 2, 0) <= 1.0 + 1e-5)
  # Only constrain the hidden layers.
  pred = lambda path, leaf: (constraints.default_predicate(path, leaf)
                             and path[0].key.startswith("hidden"))
  out2 = constraints.project_max_norm(params, 1.0, predicate=pred)
  np.testing.assert_array_equal(out2["logits"]["kernel"],
                                params["logits"]["kernel"])
  np.testing.assert_array_equal(out2["hidden_0"]["kernel"],
                                out["hidden_0"]["kernel"])


def test_max_norm_missing_params_raises():
  tx = constraints.max_norm(C)
  g = {"kernel": jnp.ones((2, 2))}
  with pytest.raises(ValueError, match=r"max_norm needs params; call "
                     r"tx.update\(grads, opt_state, params\)"):
    tx.update(g, tx.init(g))
  chained = optax.chain(optax.sgd(0.1), constraints.max_norm(C))
  with pytest.raises(ValueError, match="max_norm needs params"):
    chained.update(g, chained.init(g))


@pytest.mark.parametrize("bad", [0.0, -1.0, True])
def test_max_norm_rejects_bad_bound(bad):
  with pytest.raises((ValueError, TypeError)):
    constraints.max_norm(bad)


# ----------------------------------------------------------------------------
# Jitter augmentation.
# ----------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("shape,dtype", [((4, 28, 28), jnp.uint8),
                                         ((4, 28, 28), jnp.float32),
                                         ((4, 28, 28, 3), jnp.float32),
                                         ((4, 10, 12, 1), jnp.bfloat16)])
def test_jitter_shape_dtype(shape, dtype):
  x = (jax.random.uniform(jax.random.key(0), shape) * 255).astype(dtype)
  y = augment.jitter(jax.random.key(1), x)
  assert y.shape == x.shape and y.dtype == x.dtype


def test_jitter_single_pixel_moves_at_most_max_shift():
  b, h, w = 64, 9, 9
  x = jnp.zeros((b, h, w), jnp.float32).at[:, 4, 4].set(1.0)
  y = np.asarray(augment.jitter(jax.random.key(0), x, max_shift=2))
  np.testing.assert_array_equal(y.sum(axis=(1, 2)), 1.0)  # mass kept, one pixel
  rows, cols = np.nonzero(y.sum(axis=2))[1], np.nonzero(y.sum(axis=1))[1]
  dy, dx = rows - 4, cols - 4
  assert np.abs(dy).max() <= 2 and np.abs(dx).max() <= 2
  # Every shift in [-2, 2] is drawn on both axes (64 draws, fixed key).
  assert set(dy) == set(range(-2, 3)) and set(dx) == set(range(-2, 3))


def test_jitter_zero_fill_no_wraparound():
  x = jnp.zeros((32, 6, 6), jnp.float32).at[:, 0, 0].set(1.0)
  y = np.asarray(augment.jitter(jax.random.key(3), x, max_shift=2))
  mass = y.sum(axis=(1, 2))
  assert set(np.unique(mass)) <= {0.0, 1.0}
  assert (mass == 0).any()  # pushed off the border for negative shifts
  # Never wraps to the far side.
  assert y[:, 4:, :].sum() == 0 and y[:, :, 4:].sum() == 0


def test_translate_matches_numpy():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 255, (6, 7, 8, 2)).astype(np.uint8)
  shifts = np.array([[0, 0], [1, -2], [-2, 2], [2, 1], [-1, -1], [0, 3]])
  y = np.asarray(augment.translate(x, shifts, max_shift=2))
  for b, (dy, dx) in enumerate(np.clip(shifts, -2, 2)):
    ref = np.zeros_like(x[b])
    for i in range(7):
      for j in range(8):
        if 0 <= i - dy < 7 and 0 <= j - dx < 8:
          ref[i, j] = x[b, i - dy, j - dx]
    np.testing.assert_array_equal(y[b], ref)


def test_jitter_max_shift_zero_is_identity():
  x = jax.random.uniform(jax.random.key(0), (3, 28, 28))
  np.testing.assert_array_equal(augment.jitter(jax.random.key(1), x, 0), x)
  np.testing.assert_array_equal(augment.make_jitter(0)(jax.random.key(1), x), x)


def test_jitter_rng_dependence():
  x = jax.random.uniform(jax.random.key(0), (8, 28, 28))
  a = augment.jitter(jax.random.key(1), x)
  b = augment.jitter(jax.random.key(2), x)
  a2 = augment.jitter(jax.random.key(1), x)
  np.testing.assert_array_equal(a, a2)
  assert not np.array_equal(a, b)


def test_jitter_per_example_shifts():
  img = jax.random.uniform(jax.random.key(0), (28, 28))
  x = jnp.broadcast_to(img, (16, 28, 28))
  y = np.asarray(augment.jitter(jax.random.key(4), x))
  distinct = {y[i].tobytes() for i in range(16)}
  assert len(distinct) > 1


@pytest.mark.integration
def test_jitter_jit_and_vmap():
  x = jax.random.uniform(jax.random.key(0), (3, 5, 28, 28))
  keys = jax.random.split(jax.random.key(1), 3)
  fn = augment.make_jitter(2)
  jitted = jax.jit(fn)
  np.testing.assert_array_equal(jitted(keys[0], x[0]), fn(keys[0], x[0]))
  vm = jax.jit(jax.vmap(fn))(keys, x)
  assert vm.shape == x.shape
  for g in range(3):
    np.testing.assert_array_equal(vm[g], fn(keys[g], x[g]))
  # Jitting with max_shift static also works.
  y = jax.jit(augment.jitter, static_argnames="max_shift")(keys[0], x[0],
                                                           max_shift=1)
  assert y.shape == x[0].shape


def test_jitter_raw_prngkey_and_bad_args():
  x = jnp.ones((2, 8, 8))
  assert augment.jitter(jax.random.PRNGKey(0), x).shape == x.shape
  with pytest.raises(ValueError):
    augment.jitter(jax.random.key(0), x, max_shift=-1)
  with pytest.raises(ValueError):
    augment.jitter(jax.random.key(0), x, max_shift=1.5)
  with pytest.raises(ValueError):
    augment.jitter(jax.random.key(0), jnp.ones((8, 8)))
