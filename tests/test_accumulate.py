"""Exact gradient accumulation (kdjax.accumulate, StepSpec(accumulate=k)).

The accumulated step must be the single large batch's step: the loss, the
gradients, the metrics and the params after the step equal to float32
rounding, whatever the micro-batches' token counts, on one device and on
the 8 virtual devices of the root conftest.py; and k=1 must be today's
step. Tiny nets (tests/_helpers.py), one or two compiles per test.
"""

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import kdjax
from kdjax import accumulate, fitting, losses, validate
from kdjax import mesh as mesh_lib
from kdjax import step as step_lib
from kdjax.loop import device as device_loop

import _helpers as H

B, L, V = 16, 6, 11
FIELDS = kdjax.Fields(inputs="tokens", labels="targets", weights="mask")
KEY = jax.random.key(0)
TOL = dict(rtol=2e-5, atol=2e-7)


def _temperature(step):
  """A schedule: evaluated once per step, not per micro-batch."""
  return 2.0 + step.astype(jnp.float32)


@functools.lru_cache(maxsize=None)
def _token_run(lr=1.0):
  """A per-position token student and teacher; SGD(lr), so that the params'
  change after one step is ``-lr * gradient``. Cached: equal static parts,
  so the compiled steps are shared between the tests."""
  net = H.TokenNet(vocab=V)
  init = lambda s: net.init(jax.random.key(s), jnp.zeros((1, L), jnp.int32))
  state = step_lib.TrainState.create(
      kdjax.Student.from_linen(net, init(0)), tx=optax.sgd(lr),
      temperature=_temperature, alpha=0.3)
  return state, kdjax.Teacher.from_linen(net, init(1))


def _uneven_batch(k=4, seed=0):
  """B sequences whose micro-batches (rows j, j+k, ...) hold very different
  numbers of real tokens: micro-batch 0 all L, 1 one token each, 2 only
  padding (with NaN-free garbage labels), 3 a mix."""
  rs = np.random.RandomState(seed)
  lengths = np.zeros(B, np.int64)
  rows = np.arange(B)
  lengths[rows % k == 0] = L
  lengths[rows % k == 1] = 1
  lengths[rows % k == 2] = 0
  lengths[rows % k == 3] = rs.randint(1, L, (rows % k == 3).sum())
  mask = (np.arange(L) < lengths[:, None]).astype(np.float32)
  tokens = rs.randint(0, V, (B, L)).astype(np.int32)
  targets = np.where(mask > 0, rs.randint(0, V, (B, L)), -1).astype(np.int32)
  return {"tokens": tokens, "targets": targets, "mask": mask}


@functools.lru_cache(maxsize=None)
def _step(k, precision=None):
  return jax.jit(step_lib.make_train_step(
      kdjax.StepSpec("kd", fields=FIELDS, accumulate=k, precision=precision)))


def _grads(before, after, lr=1.0):
  return jax.tree.map(lambda a, b: (a - b) / lr, before.params, after.params)


def _close(a, b, **tol):
  tol = {**TOL, **tol}
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


# ----------------------------------------------------------------------------
# The large batch, exactly.
# ----------------------------------------------------------------------------


def test_split_takes_strided_rows_so_each_device_keeps_its_own():
  x = jnp.arange(12)
  micro = accumulate.split({"x": x}, 3)["x"]
  np.testing.assert_array_equal(micro, [[0, 3, 6, 9], [1, 4, 7, 10],
                                        [2, 5, 8, 11]])
  # Two devices hold rows 0-5 and 6-11: each micro-batch has 2 of each.
  for row in np.asarray(micro):
    assert sorted(r // 6 for r in row) == [0, 0, 1, 1]


@pytest.mark.parametrize("k", [2, 4])
def test_equals_the_single_large_batch_with_uneven_token_counts(k):
  state, teacher = _token_run()
  batch = _uneven_batch(k=4)
  big, m_big = _step(1)(state, teacher, batch, KEY)
  acc, m_acc = _step(k)(state, teacher, batch, KEY)
  assert set(m_acc) == set(m_big)
  _close(m_acc, m_big)
  _close(_grads(state, acc), _grads(state, big))
  _close(acc.params, big.params)
  assert int(acc.step) == int(big.step) == 1  # One optimizer step.
  assert float(m_acc["temperature"]) == 2.0  # The schedule at step 0.
  # A second step: the schedule and optimizer state carry over alike.
  _, m2_big = _step(1)(big, teacher, batch, KEY)
  _, m2_acc = _step(k)(acc, teacher, batch, KEY)
  assert float(m2_acc["temperature"]) == 3.0
  _close(m2_acc, m2_big)


def test_a_mean_of_micro_batch_means_would_be_far_off():
  """What optax.MultiSteps-style accumulation of per-micro-batch mean
  losses gives: far outside the tolerance the accumulated step meets."""
  state, teacher = _token_run()
  k, batch = 4, _uneven_batch(k=4)
  big, m_big = _step(1)(state, teacher, batch, KEY)
  acc, m_acc = _step(k)(state, teacher, batch, KEY)
  means, grads = [], []
  for j in range(k):  # Micro-batch j alone: the other rows' weights zeroed.
    rows = (np.arange(B) % k == j)[:, None]
    micro = {**batch, "mask": np.where(rows, batch["mask"], 0.0)}
    after, m = _step(1)(state, teacher, micro, KEY)
    means.append(float(m["loss"]))
    grads.append(_grads(state, after))
  mean_of_means = np.mean(means)
  grad_of_means = jax.tree.map(lambda *g: sum(g) / k, *grads)
  exact = float(m_big["loss"])
  assert abs(float(m_acc["loss"]) - exact) <= 1e-5 * abs(exact)
  assert abs(mean_of_means - exact) > 0.05 * abs(exact)
  gap = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(grad_of_means), jax.tree.leaves(_grads(state, big))))
  assert gap > 1e3 * TOL["atol"]


def test_weighted_fields_and_padding_garbage_never_count():
  """Fractional weights; padding's -1 labels (a NaN hard loss) never
  enter the loss, the metrics or the gradients."""
  state, teacher = _token_run()
  batch = _uneven_batch()
  batch["mask"] = batch["mask"] * np.linspace(0.1, 3.0, B,
                                              dtype=np.float32)[:, None]
  _, m_big = _step(1)(state, teacher, batch, KEY)
  acc, m_acc = _step(4)(state, teacher, batch, KEY)
  _close(m_acc, m_big)
  assert float(m_acc["finite"]) == 1.0 and int(acc.skipped) == 0


def test_an_all_padding_batch_gives_zero_loss_and_gradient():
  state, teacher = _token_run()
  batch = {**_uneven_batch(), "mask": np.zeros((B, L), np.float32)}
  after, m = _step(4)(state, teacher, batch, KEY)
  assert float(m["loss"]) == 0.0 and float(m["grad_norm"]) == 0.0
  _close(after.params, state.params, rtol=0, atol=0)


def test_a_nonfinite_micro_batch_skips_the_whole_step():
  state, teacher = _token_run()
  # Cached teacher logits with one NaN at a real position of micro-batch 1.
  batch = _uneven_batch()
  logits = np.array(teacher(jnp.asarray(batch["tokens"])))
  logits[1, 0, 3] = np.nan
  batch["teacher_logits"] = logits
  after, m = _step(4)(state, teacher, batch, KEY)
  assert float(m["finite"]) == 0.0 and int(after.skipped) == 1
  _close(after.params, state.params, rtol=0, atol=0)
  # The same NaN in a padding position (micro-batch 2) is never read, and
  # a class the teacher masks (-inf) everywhere is safe.
  logits[1, 0, 3], logits[2, 0, 3] = 0.0, np.nan
  logits[..., 5] = -np.inf
  after, m = _step(4)(state, teacher, {**batch, "teacher_logits": logits},
                      KEY)
  assert float(m["finite"]) == 1.0 and int(after.skipped) == 0
  assert all(np.isfinite(np.asarray(x)).all()
             for x in jax.tree.leaves(after.params))


@pytest.mark.integration
def test_bf16_compute_keeps_float32_losses_and_matches_k1():
  state, teacher = _token_run()
  batch = _uneven_batch()
  _, m_big = _step(1)(state, teacher, batch, KEY)
  _, m_acc = _step(4, kdjax.Precision(jnp.bfloat16))(state, teacher, batch,
                                                      KEY)
  assert all(v.dtype == jnp.float32 for v in m_acc.values())
  # bf16 forward passes: float32 loss math, bf16-rounded logits.
  for name in ("loss", "hard_loss", "soft_loss"):
    np.testing.assert_allclose(m_acc[name], m_big[name], rtol=2e-2)


def test_soft_term_keeps_t_squared_on_the_accumulated_path():
  """alpha = 0: the loss is T^2 KL per real token, averaged over them."""
  state, teacher = _token_run()
  state = state.replace(hparams={**state.hparams,
                                 "alpha": jnp.zeros((), jnp.float32)})
  batch = _uneven_batch()
  _, m = _step(4)(state, teacher, batch, KEY)
  z = state.predict(jnp.asarray(batch["tokens"]))
  v = teacher(jnp.asarray(batch["tokens"]))
  per = np.asarray(losses.distillation_loss(z, v, 2.0), np.float64)
  w = batch["mask"].astype(np.float64)
  want = np.sum(w * per) / np.sum(w)  # includes T^2 = 4
  np.testing.assert_allclose(float(m["loss"]), want, rtol=2e-5)
  kl = want / 4.0
  assert abs(float(m["loss"]) - kl) > 1.0 * kl  # not missing the T^2


# ----------------------------------------------------------------------------
# k = 1 is today's step; BatchNorm's rule.
# ----------------------------------------------------------------------------


def test_k1_is_the_step_without_accumulation():
  state, teacher = _token_run()
  batch = _uneven_batch()
  plan = mesh_lib.plan(mesh_lib.make_mesh())
  jaxprs = []
  for kw in ({}, {"plan": plan}):
    step = step_lib.make_train_step(
        kdjax.StepSpec("kd", fields=FIELDS, accumulate=1), **kw)
    jaxprs.append(str(jax.make_jaxpr(step)(state, teacher, batch, KEY)))
  plain = step_lib.make_train_step(kdjax.StepSpec("kd", fields=FIELDS))
  assert jaxprs[0] == jaxprs[1] == str(
      jax.make_jaxpr(plain)(state, teacher, batch, KEY))
  assert "scan" not in jaxprs[0]
  acc = step_lib.make_train_step(kdjax.StepSpec("kd", fields=FIELDS,
                                                accumulate=2))
  assert "scan" in str(jax.make_jaxpr(acc)(state, teacher, batch, KEY))
  assert "accumulate" not in kdjax.StepSpec().record()
  assert kdjax.StepSpec(accumulate=3).record()["accumulate"] == 3


@pytest.mark.integration
def test_batchnorm_statistics_are_per_micro_batch_threaded_in_order():
  net = H.BNNet()
  student = kdjax.Student.from_linen(net, H.np_init(net, 0))
  teacher = kdjax.Teacher.from_linen(net, H.np_init(net, 1))
  state = step_lib.TrainState.create(student, tx=optax.sgd(1.0),
                                     temperature=2.0, alpha=0.5)
  rs = np.random.RandomState(0)
  batch = {"image": rs.randn(B, 8, 8).astype(np.float32) +
                    np.arange(B)[:, None, None] % 2 * 3.0,  # micro 1 shifted
           "label": rs.randint(0, 10, B).astype(np.int32)}
  step = jax.jit(step_lib.make_train_step(kdjax.StepSpec("kd",
                                                         accumulate=2)))
  after, m = step(state, teacher, batch, KEY)

  def micro_sum(params, model_state, x, y):
    z, new_state = state.apply_fn(params, model_state, x, train=True,
                                  rng=None)
    per = losses.kd_objective(z, teacher(x), y, temperature=2.0, alpha=0.5)
    return jnp.sum(per), new_state

  grad_fn = jax.jit(jax.value_and_grad(micro_sum, has_aux=True))
  model_state, grads, total = state.model_state, None, 0.0
  for j in range(2):  # Micro-batch j: rows j, j + 2, ...; state threaded.
    (s, model_state), g = grad_fn(state.params, model_state,
                                  batch["image"][j::2], batch["label"][j::2])
    total += s
    grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
    if j == 0:
      after_first = model_state
  _close(after.model_state, model_state)
  _close(_grads(state, after), jax.tree.map(lambda g: g / B, grads),
         atol=1e-6)
  np.testing.assert_allclose(float(m["loss"]), total / B, rtol=2e-5)
  # Both micro-batches moved the statistics (micro-batch 1 is shifted).
  assert H.trees_differ(after_first, after.model_state)
  assert H.trees_differ(after_first, state.model_state)


# ----------------------------------------------------------------------------
# On the mesh.
# ----------------------------------------------------------------------------


def _collectives(hlo: str) -> dict:
  return {op: len(re.findall(rf"\b{op}(-start)?\(", hlo)) for op in (
      "all-reduce", "all-gather", "all-to-all", "collective-permute",
      "reduce-scatter")}


@pytest.mark.integration
def test_on_eight_devices_rows_stay_local_and_equal_one_device():
  state, teacher = _token_run()
  batch = {n: np.concatenate([v, v[::-1]]) for n, v in
           _uneven_batch().items()}  # 32 rows: 2 per device per micro-batch
  mesh = mesh_lib.make_mesh()
  assert mesh.size == 8
  sharded = step_lib.sharded_train_step(
      mesh, kdjax.StepSpec("kd", fields=FIELDS, accumulate=2), donate=False)
  compiled = sharded.lower(state, teacher, batch, KEY).compile()
  found = _collectives(compiled.as_text())
  assert found["all-reduce"] >= 1
  assert found["all-gather"] == found["all-to-all"] == 0, found
  assert found["collective-permute"] == found["reduce-scatter"] == 0, found
  after, m = compiled(state, teacher, batch, KEY)
  big, m_big = _step(1)(state, teacher, batch, KEY)
  _close(m, m_big)
  _close(after.params, big.params, atol=1e-6)


def _data(copies=4):
  """``copies`` uneven batches of B rows, each copy reversed alternately."""
  batch = _uneven_batch()
  return {n: np.concatenate([v if i % 2 == 0 else v[::-1]
                             for i in range(copies)]) for n, v in
          batch.items()}


@pytest.mark.integration
def test_fit_accumulates_each_batch_of_its_epoch():
  """fit's epoch (scan over device data) with accumulate=4 takes the
  steps the k = 1 step takes on the same batches, in the same order."""
  state, teacher = _token_run(0.1)
  data = _data(2)
  got, history = kdjax.fit(
      state, teacher, data, epochs=1, batch_size=B, rng=KEY, progress=False,
      spec=kdjax.StepSpec("kd", fields=FIELDS, accumulate=4))
  order = device_loop.batch_order(device_loop.epoch_key(KEY, 0), 2 * B, B)
  want, losses_ = state, []
  for idx in np.asarray(order):
    want, m = _step(1)(want, teacher, {n: v[idx] for n, v in
                                       data.items()}, KEY)
    losses_.append(float(m["loss"]))
  _close(got.params, want.params, atol=1e-6)
  np.testing.assert_allclose(history[0]["loss"], np.mean(losses_), rtol=2e-5)


def test_fit_records_accumulate_and_refuses_to_resume_with_another(
    tmp_path):
  state, teacher = _token_run()
  kw = dict(batch_size=B, rng=KEY, progress=False, checkpoint=tmp_path)
  spec = lambda k: kdjax.StepSpec("kd", fields=FIELDS, accumulate=k)
  data = _data(2)
  kdjax.fit(state, teacher, data, epochs=0, spec=spec(2), **kw)  # no compile
  assert json.loads((tmp_path / "fit.json").read_text())["accumulate"] == 2
  kdjax.fit(state, teacher, data, epochs=0, spec=spec(2), **kw)  # the same
  for k in (1, 4):
    with pytest.raises(validate.WorkdirMismatchError,
                       match=r"keys differing: \['accumulate'\]"):
      kdjax.fit(state, teacher, data, epochs=1, spec=spec(k), **kw)


@pytest.mark.integration
@pytest.mark.all_devices
def test_fit_on_the_default_mesh_accumulates_like_one_large_batch():
  state, teacher = _token_run(0.1)
  data = _data(4)  # 2 steps of 32 rows: 2 per device per micro-batch
  one_device = mesh_lib.make_mesh(devices=jax.devices()[:1])
  kw = dict(epochs=1, batch_size=2 * B, rng=KEY, progress=False)
  want, h_want = kdjax.fit(state, teacher, data, mesh=one_device,
                           spec=kdjax.StepSpec("kd", fields=FIELDS), **kw)
  got, h_got = kdjax.fit(state, teacher, data, spec=kdjax.StepSpec(
      "kd", fields=FIELDS, accumulate=2), **kw)
  assert mesh_lib.plan().data_size == 8
  _close(mesh_lib.to_host(got.params), mesh_lib.to_host(want.params),
         atol=1e-6)
  np.testing.assert_allclose(h_got[0]["loss"], h_want[0]["loss"], rtol=2e-5)


@pytest.mark.integration
def test_host_batches_accumulate_like_device_data():
  state, teacher = _token_run(0.1)
  batch = _uneven_batch()
  spec = kdjax.StepSpec("kd", fields=FIELDS, accumulate=4)
  host, _ = kdjax.fit(state, teacher, lambda epoch: [batch, batch],
                      epochs=1, rng=KEY, spec=spec, progress=False)
  want, _ = kdjax.fit(state, teacher, lambda epoch: [batch, batch],
                      epochs=1, rng=KEY, spec=kdjax.StepSpec(
                          "kd", fields=FIELDS), progress=False)
  _close(host.params, want.params, atol=1e-6)


# ----------------------------------------------------------------------------
# Bad k: one line, before anything compiles.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("k", [0, -2, 1.5, True, "2"])
def test_a_bad_accumulate_is_refused_by_the_spec(k):
  with pytest.raises(ValueError, match=r"^StepSpec.accumulate must be an int "
                     r">= 1 .*got") as e:
    kdjax.StepSpec(accumulate=k)
  assert "\n" not in str(e.value)


@pytest.fixture
def jit_calls(monkeypatch):
  calls = []
  real = jax.jit
  monkeypatch.setattr(jax, "jit", lambda *a, **k: calls.append(a) or
                      real(*a, **k))
  return calls


def test_a_batch_that_does_not_split_is_refused_before_compiling(jit_calls):
  state, teacher = _token_run()
  data = {n: np.concatenate([v] * 3) for n, v in _uneven_batch().items()}
  spec = kdjax.StepSpec("kd", fields=FIELDS, accumulate=5)
  with pytest.raises(ValueError, match=r"^batch_size=24 cannot be split into "
                     r"accumulate=5 .* multiple of accumulate = 5; use 20 or "
                     r"25") as e:
    kdjax.fit(state, teacher, data, epochs=1, batch_size=24, rng=KEY,
              spec=spec, progress=False)
  assert "\n" not in str(e.value) and not jit_calls
  with pytest.raises(ValueError, match="batch_size=16 cannot be split"):
    kdjax.fit(state, teacher, lambda epoch: [_uneven_batch()], epochs=1,
              rng=KEY, progress=False,
              spec=kdjax.StepSpec("kd", fields=FIELDS, accumulate=3))
  assert not jit_calls


@pytest.mark.integration
def test_pmap_psums_the_weight_before_dividing():
  """Under pmap each device accumulates its rows' sums; the weight sum is
  psum-ed before the one division, so the result is the global batch's."""
  state, teacher = _token_run()
  batch = {n: np.concatenate([v, v[::-1]]) for n, v in
           _uneven_batch().items()}  # 32 rows: 4 per device, 2 per micro
  step = step_lib.pmap_train_step(
      kdjax.StepSpec("kd", fields=FIELDS, accumulate=2), donate=False)
  after, m = step(step_lib.replicate(state), teacher,
                  step_lib.shard_batch(batch), KEY)
  big, m_big = _step(1)(state, teacher, batch, KEY)
  _close(jax.tree.map(lambda x: x[0], m), m_big)
  _close(step_lib.unreplicate(after.params), big.params, atol=1e-6)


@pytest.mark.all_devices
def test_the_mesh_size_is_named_when_the_micro_batches_do_not_split(
    jit_calls):
  state, teacher = _token_run()
  data = {n: np.concatenate([v] * 4) for n, v in _uneven_batch().items()}
  spec = kdjax.StepSpec("kd", fields=FIELDS, accumulate=3)
  with pytest.raises(ValueError, match=r"^batch_size=32 cannot be split into "
                     r"accumulate=3 .* multiple of accumulate x the mesh's "
                     r"batch axes \(data=8 x fsdp=1 = 8 devices\) = 24; use "
                     r"24 or 48"):
    kdjax.fit(state, teacher, data, epochs=1, batch_size=32, rng=KEY,
              spec=spec, progress=False)
  assert not jit_calls


def test_the_step_itself_refuses_a_batch_that_does_not_split():
  state, teacher = _token_run()
  step = step_lib.make_train_step(kdjax.StepSpec("kd", fields=FIELDS,
                                                 accumulate=3))
  with pytest.raises(ValueError, match=r"the batch's size=16 cannot be split "
                     r"into accumulate=3"):
    jax.eval_shape(step, state, teacher, _uneven_batch(), KEY)


def test_fit_check_uses_the_plans_batch_axes():
  plan = mesh_lib.plan(mesh_lib.make_mesh(data=2, fsdp=4))
  with pytest.raises(ValueError, match=r"data=2 x fsdp=4 = 8 devices\) = 16"):
    fitting._check_accumulate(kdjax.StepSpec(accumulate=2), 24, plan)  # pylint: disable=protected-access
  fitting._check_accumulate(kdjax.StepSpec(accumulate=2), 32, plan)  # pylint: disable=protected-access
  assert plan.batch_spec(1) == P(None, ("data", "fsdp"))


def test_hidden_state_objectives_refuse_accumulation_for_now():
  """The fused objectives return whole-batch sums; accumulating them is not
  wired yet, so the spec refuses it rather than dividing wrongly."""
  with pytest.raises(ValueError, match=r"accumulate=2.*'chunked_kd'"):
    kdjax.StepSpec("chunked_kd", accumulate=2)
  assert kdjax.StepSpec("chunked_kd").accumulate == 1
