"""Objectives own their hyperparameters (issue #19, part 5).

The state carries them as a dict of arrays (``TrainState.hparams``); an
objective declares the names it reads and the step passes exactly those;
any of them can be a schedule, is logged and can be swept under vmap.
"""

import functools
import inspect
import json
import pathlib

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kdjax
from kdjax import hparams as hparams_lib
from kdjax import losses, objectives, sweep, train, validate

C = 5


class Net(nn.Module):
  width: int = 8

  @nn.compact
  def __call__(self, x, train=False):
    h = nn.relu(nn.Dense(self.width)(x.reshape(x.shape[0], -1)))
    return nn.Dense(C)(h)


@functools.cache
def _models():
  t_net, s_net = Net(16), Net()
  x = jnp.zeros((1, 6))
  teacher = kdjax.Teacher.from_linen(t_net, t_net.init(jax.random.key(0), x))
  return teacher, s_net


def _student(seed=1):
  _, s_net = _models()
  return kdjax.Student.from_linen(
      s_net, s_net.init(jax.random.key(seed), jnp.zeros((1, 6))))


def _init(rng):
  _, s_net = _models()
  return train.TrainState.create(
      kdjax.Student.from_linen(s_net, s_net.init(rng, jnp.zeros((1, 6)))),
      tx=optax.sgd(0.3), temperature=2.0)


def _data(n=64):
  rs = np.random.RandomState(0)
  return {"image": rs.randn(n, 6).astype(np.float32),
          "label": rs.randint(0, C, (n,)).astype(np.int32)}


def _batch(n=16):
  return jax.tree.map(lambda a: a[:n], _data())


BUILTIN_READS = {
    "kd": ("temperature", "alpha"), "soft": ("temperature",),
    "logit_matching": (), "hard": (), "reverse_kl": ("temperature",),
    "jsd": ("temperature", "beta"), "topk": ("temperature",)}


def test_builtins_declare_exactly_what_they_read():
  for name, reads in BUILTIN_READS.items():
    obj = objectives.get(name)
    assert obj.hparams == reads, name
    # No built-in discards a hyperparameter: none is passed one it does not
    # read, and none has a `del` of one in its code.
    src = inspect.getsource(obj.fn)
    assert "del alpha" not in src and "del temperature" not in src
  assert objectives.get("jsd").optional == ("beta",)
  with pytest.raises(TypeError, match=r"reads \['temperature'\], not "
                     r"\['alpha'\]"):
    objectives.get("soft")(jnp.zeros((2, C)), jnp.zeros((2, C)), {},
                           temperature=2.0, alpha=0.5)


@pytest.mark.integration
def test_the_step_passes_exactly_the_declared_hyperparameters():
  seen = []

  def gamma_loss(s, t, batch, *, temperature, gamma):
    seen.append((temperature.dtype, gamma.dtype))
    return gamma * losses.distillation_loss(s, t, temperature)

  teacher, _ = _models()
  state = train.TrainState.create(_student(), tx=optax.sgd(0.1),
                                  temperature=3.0, alpha=0.7,
                                  hparams={"gamma": 0.25})
  assert sorted(state.hparams) == ["alpha", "gamma", "temperature"]
  assert objectives.get(gamma_loss).hparams == ("temperature", "gamma")
  _, m = jax.jit(train.make_train_step(gamma_loss))(
      state, teacher, _batch(), jax.random.key(0))
  assert seen == [(jnp.float32, jnp.float32)]  # traced once, two arguments
  s, t = state.predict(_batch()["image"]), teacher(_batch()["image"])
  np.testing.assert_allclose(
      float(m["loss"]), 0.25 * float(jnp.mean(
          losses.distillation_loss(s, t, 3.0))), rtol=1e-5)
  # Every hyperparameter is logged, by name.
  assert [float(m[k]) for k in ("temperature", "alpha", "gamma")] == [
      3.0, float(np.float32(0.7)), 0.25]


@pytest.mark.integration
def test_create_accepts_numbers_and_schedules_and_checks_them():
  beta = optax.linear_schedule(0.2, 0.8, 2)
  state = train.TrainState.create(_student(), tx=optax.sgd(0.1),
                                  hparams={"beta": beta, "temperature": 4.0})
  assert float(state.temperature) == 4.0 and float(state.alpha) == 0.0
  assert np.isclose(float(state.hparams["beta"]), 0.2)
  assert [n for n, _ in state.schedules] == ["beta"]
  teacher, _ = _models()
  step = jax.jit(train.make_train_step("jsd"))
  betas = []
  for _ in range(3):
    state, m = step(state, teacher, _batch(), jax.random.key(0))
    betas.append(float(m["beta"]))
  np.testing.assert_allclose(betas, [0.2, 0.5, 0.8], rtol=1e-6)
  assert np.isclose(float(state.hparams["beta"]), 0.8)  # the last used
  with pytest.raises(ValueError, match="beta must lie in"):
    train.TrainState.create(_student(), tx=optax.sgd(0.1),
                            hparams={"beta": 1.5})
  with pytest.raises(ValueError, match="temperature was given twice"):
    train.TrainState.create(_student(), tx=optax.sgd(0.1), temperature=2.0,
                            hparams={"temperature": 3.0})
  with pytest.raises(ValueError, match="the step's metrics use it"):
    train.TrainState.create(_student(), tx=optax.sgd(0.1),
                            hparams={"loss": 1.0})
  with pytest.raises(ValueError, match="must be finite"):
    train.TrainState.create(_student(), tx=optax.sgd(0.1),
                            hparams={"gamma": float("nan")})


@pytest.mark.integration
def test_jsd_reads_beta_from_the_state():
  teacher, _ = _models()
  batch = _batch()
  steps = {}

  def run(obj, state):
    if obj not in steps:
      steps[obj] = jax.jit(train.make_train_step(obj))
    return float(steps[obj](state, teacher, batch, jax.random.key(0))[1][
        "loss"])

  make = lambda **hp: train.TrainState.create(
      _student(), tx=optax.sgd(0.1), temperature=2.0, hparams=hp)
  for beta in (0.0, 0.3, 1.0):  # One compiled "jsd" step for all three.
    np.testing.assert_allclose(run("jsd", make(beta=beta)),
                               run(objectives.jsd(beta), make()), rtol=1e-6)
  # Without a beta in the state: the default 0.5, exactly jsd(0.5).
  assert run("jsd", make()) == run(objectives.jsd(0.5), make())


@pytest.mark.integration
def test_a_sweep_over_beta_equals_each_member_trained_alone():
  teacher, _ = _models()
  data, betas, seeds = _data(), [0.1, 0.5, 0.9], [3, 3, 4]
  states = sweep.create_sweep(_init, seeds=seeds, hparams={"beta": betas})
  np.testing.assert_array_equal(states.hparams["beta"],
                                np.asarray(betas, np.float32))
  kw = dict(epochs=2, batch_size=16, objective="jsd", progress=False)
  swept, history = kdjax.fit(states, teacher, data, vmapped=True,
                             rng=sweep.sweep_keys(seeds), **kw)
  np.testing.assert_allclose(history[-1]["beta"], betas, rtol=1e-7)
  losses_alone = []
  for i, (seed, beta) in enumerate(zip(seeds, betas)):
    alone = _init(jax.random.key(seed))
    alone = alone.replace(hparams={**alone.hparams,
                                   "beta": jnp.float32(beta)})
    alone, h = kdjax.fit(alone, teacher, data, rng=jax.random.key(seed),
                         **kw)
    chex.assert_trees_all_close(sweep.member(swept, i).params, alone.params,
                                rtol=1e-5, atol=1e-6)
    losses_alone.append(h[-1]["loss"])
  np.testing.assert_allclose(history[-1]["loss"], losses_alone, rtol=1e-5)
  # beta matters: members 0 and 1 share a seed but not their params.
  assert not np.allclose(sweep.member(swept, 0).params["Dense_0"]["kernel"],
                         sweep.member(swept, 1).params["Dense_0"]["kernel"])
  with pytest.raises(ValueError, match="beta must lie in"):
    sweep.create_sweep(_init, seeds=[0], hparams={"beta": [2.0]})
  with pytest.raises(ValueError, match="not both"):
    sweep.create_sweep(_init, seeds=[0], temperatures=[1.0], alphas=[0.0],
                       hparams={"beta": [0.5]})


def test_fit_refuses_a_state_missing_a_hyperparameter_before_compiling():
  calls = []

  def focal(s, t, batch, *, temperature, gamma):
    calls.append(1)
    return losses.distillation_loss(s, t, temperature) * gamma

  teacher, _ = _models()
  state = train.TrainState.create(_student(), tx=optax.sgd(0.1))
  with pytest.raises(ValueError, match=(
      r"objective '.*focal' reads the hyperparameter\(s\) \['gamma'\], which "
      r"the state does not hold .* hparams=\{'gamma': \.\.\.\}")):
    kdjax.fit(state, teacher, _data(), epochs=1, batch_size=16,
              rng=jax.random.key(0), objective=focal, progress=False)
  assert not calls  # Nothing was traced.
  # A hyperparameter no one reads is refused too (a misspelt beta would
  # leave "jsd" at its default).
  typo = train.TrainState.create(_student(), tx=optax.sgd(0.1),
                                 hparams={"betta": 0.3})
  with pytest.raises(ValueError, match=(
      r"holds the hyperparameter\(s\) \['betta'\], which objective 'jsd' "
      r"does not read \(it reads \['temperature', 'beta'\]\)")):
    kdjax.fit(typo, teacher, _data(), epochs=1, batch_size=16,
              rng=jax.random.key(0), objective="jsd", progress=False)
  # The bare step says the same when it is traced.
  with pytest.raises(ValueError, match=r"\['gamma'\]"):
    train.make_train_step(focal)(state, teacher, _batch(),
                                 jax.random.key(0))


def test_objectives_with_kwargs_must_name_their_hyperparameters():
  def anything(s, t, batch, **kw):
    return losses.distillation_loss(s, t, kw["temperature"])

  with pytest.raises(TypeError, match="hparams=\\('temperature'"):
    objectives.get(anything)
  obj = objectives.Objective(anything, "anything", hparams=("temperature",))
  assert obj.required == ("temperature",)


# ----------------------------------------------------------------------------
# with_hard_labels: the char_lm example's mixing, now kdjax's.
# ----------------------------------------------------------------------------


def _old_mix(divergence, s, batch, alpha):
  """examples/lm_objectives.py's _mix before this change, verbatim."""
  if "label" not in batch:
    return divergence, {"soft_loss": divergence}
  hard = losses.hard_label_loss(s, batch["label"])
  return (alpha * hard + (1 - alpha) * divergence,
          {"soft_loss": divergence, "hard_loss": hard})


def _old(name):
  """The example's objectives before this change (same math, same code)."""
  def fn(s, t, batch, *, temperature, alpha):
    if name == "forward_kl":
      d = losses.distillation_loss(s, t, temperature)
    elif name == "reverse_kl":
      d = losses.reverse_distillation_loss(s, t, temperature)
    elif name == "jsd":
      d = losses.generalized_jsd_loss(s, t, temperature, beta=0.5)
    elif name == "logit_matching":
      d = losses.logit_matching_loss(s, t)
    else:
      from kdjax.losses import topk  # pylint: disable=g-import-not-at-top
      d = topk.topk_distillation_loss(s, batch["topk_values"],
                                      batch["topk_indices"], temperature)
    return _old_mix(d, s, batch, alpha)
  return objectives.Objective(fn, name, needs_teacher=name != "topk",
                              needs_labels=True)


@pytest.mark.integration
@pytest.mark.parametrize("name", ["forward_kl", "reverse_kl", "jsd",
                                  "logit_matching", "topk"])
def test_lm_objectives_are_bitwise_what_the_example_computed(name):
  from examples import lm_objectives  # pylint: disable=g-import-not-at-top
  teacher, _ = _models()
  batch = _batch()
  logits = teacher(batch["image"])
  values, indices = lm_objectives.topk_targets(logits, 3)
  batch = {**batch, "teacher_logits": np.asarray(logits),
           "topk_values": np.asarray(values),
           "topk_indices": np.asarray(indices)}
  fields = kdjax.Fields(extra=("topk_values", "topk_indices"))
  new = lm_objectives.objective(name)
  assert new.hparams[-1] == "alpha" and new.needs_labels
  results = []
  for obj in (_old(name), new):
    state = train.TrainState.create(_student(), tx=optax.adam(1e-2),
                                    temperature=2.0, alpha=0.3)
    step = jax.jit(train.make_train_step(obj, fields=fields))
    for i in range(3):
      state, m = step(state, None, batch, jax.random.key(i))
    results.append((state.params, m))
  (p_old, m_old), (p_new, m_new) = results
  jax.tree.map(np.testing.assert_array_equal, p_new, p_old)
  assert set(m_new) == set(m_old)
  for k in m_old:
    np.testing.assert_array_equal(m_new[k], m_old[k])


def test_with_hard_labels_math_and_refusals():
  s = jnp.asarray(np.random.RandomState(1).randn(4, C), jnp.float32)
  t = jnp.asarray(np.random.RandomState(2).randn(4, C), jnp.float32)
  y = jnp.asarray([0, 1, 2, 3])
  mixed = objectives.with_hard_labels("reverse_kl")
  loss, aux = mixed(s, t, {"label": y}, temperature=3.0, alpha=0.25)
  s64, t64 = np.float64(s) / 3.0, np.float64(t) / 3.0
  log_q = s64 - np.log(np.exp(s64).sum(-1, keepdims=True))
  log_p = t64 - np.log(np.exp(t64).sum(-1, keepdims=True))
  rkl = 9.0 * (np.exp(log_q) * (log_q - log_p)).sum(-1)
  z = np.float64(s)
  ce = -(z - np.log(np.exp(z).sum(-1, keepdims=True)))[np.arange(4), y]
  np.testing.assert_allclose(loss, 0.25 * ce + 0.75 * rkl, rtol=1e-5)
  np.testing.assert_allclose(aux["hard_loss"], ce, rtol=1e-5)
  np.testing.assert_allclose(aux["soft_loss"], rkl, rtol=1e-5)
  with pytest.raises(ValueError, match="already reads alpha"):
    objectives.with_hard_labels("kd")
  # Equal wrappers are equal objectives: one compiled step serves both.
  assert objectives.with_hard_labels("soft") == objectives.with_hard_labels(
      "soft")


# ----------------------------------------------------------------------------
# Identities: a hash of a function's code.
# ----------------------------------------------------------------------------


def _compile(src, env=None):
  namespace = {"jnp": jnp, **(env or {})}
  exec(compile(src, "<objective>", "exec"), namespace)  # pylint: disable=exec-used
  return namespace["obj"]


BASE = '''
def obj(s, t, batch, *, temperature):
  """A docstring."""
  return temperature * jnp.sum(s - t, -1)  # a comment
'''


def test_fingerprint_follows_the_computation_not_the_formatting():
  fp = lambda src, env=None: hparams_lib.fingerprint(_compile(src, env))
  base = fp(BASE)
  assert fp(BASE) == base
  reformatted = ('\n\ndef obj(s, t, batch, *, temperature):\n'
                 '  """Another docstring."""\n'
                 '  # moved\n  return temperature * jnp.sum(s - t, -1)\n')
  assert fp(reformatted) == base
  assert fp(BASE.replace("s - t", "t - s")) != base
  assert fp(BASE.replace("-1)", "1)")) != base
  # A helper and a constant it refers to at module level are followed.
  helper = '''
def helper(x):
  return x * SCALE

def obj(s, t, batch, *, temperature):
  return helper(temperature * jnp.sum(s - t, -1))
'''
  assert fp(helper, {"SCALE": 2.0}) != fp(helper, {"SCALE": 3.0})
  # Captured values too.
  make = lambda k: (lambda s, t, batch, *, temperature: k * s)
  assert hparams_lib.fingerprint(make(1.0)) == hparams_lib.fingerprint(
      make(1.0))
  assert hparams_lib.fingerprint(make(1.0)) != hparams_lib.fingerprint(
      make(2.0))


# ----------------------------------------------------------------------------
# fit.json: an edited objective or another schedule is refused on resume;
# the workdirs of older runs still resume.
# ----------------------------------------------------------------------------

LEGACY = pathlib.Path(__file__).parent / "data" / "legacy_workdir"


def _fit(state, workdir, epochs, **kw):
  teacher, _ = _models()
  return kdjax.fit(state, teacher, _data(32), epochs=epochs, batch_size=16,
                   rng=jax.random.key(0), workdir=workdir, progress=False,
                   **kw)


@pytest.mark.integration
def test_an_edited_objective_is_refused_on_resume(tmp_path):
  _fit(train.TrainState.create(_student(), tx=optax.sgd(0.1)), tmp_path, 1,
       objective=_compile(BASE))
  record = json.loads((tmp_path / "fit.json").read_text())
  assert record["objective"] == "obj"
  assert record["objective_code"]["hparams"] == ["temperature"]
  edited = _compile(BASE.replace("s - t", "t - s"))
  with pytest.raises(validate.WorkdirMismatchError,
                     match=r"keys differing: \['objective_code'\]; "
                     r"objective 'obj''s code differs"):
    _fit(train.TrainState.create(_student(), tx=optax.sgd(0.1)), tmp_path, 2,
         objective=edited)
  # The same code (a new function object, a new comment) resumes.
  same = _compile(BASE.replace("# a comment", "# edited comment"))
  _, history = _fit(train.TrainState.create(_student(), tx=optax.sgd(0.1)),
                    tmp_path, 2, objective=same)
  assert len(history) == 1


@pytest.mark.integration
def test_a_different_schedule_is_refused_on_resume(tmp_path):
  make = lambda t: train.TrainState.create(_student(), tx=optax.sgd(0.1),
                                           temperature=t)
  _fit(make(optax.linear_schedule(4.0, 1.0, 10)), tmp_path, 1)
  record = json.loads((tmp_path / "fit.json").read_text())
  assert record["schedules"]["temperature"]["0"] == 4.0
  assert record["schedules"]["temperature"]["10"] == 1.0
  with pytest.raises(validate.WorkdirMismatchError,
                     match=r"keys differing: \['schedules'\]; the "
                     r"schedule\(s\) of \['temperature'\] take other"):
    _fit(make(optax.linear_schedule(4.0, 1.0, 20)), tmp_path, 2)
  # A schedule with the same values (another function) resumes.
  first = optax.linear_schedule(4.0, 1.0, 10)
  same = lambda step: first(step)
  _, history = _fit(make(same), tmp_path, 2)
  assert len(history) == 1


@pytest.mark.integration
def test_a_workdir_written_before_hparams_resumes(tmp_path):
  """tests/data/legacy_workdir: tests/fit_script.py's run, 1 epoch, written
  by kdjax at 302af1a (fit.json with 'temperature' and 'alpha' keys, a
  checkpoint whose state has them as leaves of their own)."""
  import shutil  # pylint: disable=g-import-not-at-top
  from test_fit import fit_script_module  # pylint: disable=g-import-not-at-top
  old = json.loads((LEGACY / "fit.json").read_text())
  assert old["temperature"] == 4.0 and "hparams" not in old
  workdir = tmp_path / "wd"
  shutil.copytree(LEGACY, workdir)
  run = fit_script_module().make_run
  kw = dict(epochs=2, batch_size=32, rng=jax.random.key(0), progress=False)
  resumed, history = kdjax.fit(*run(), workdir=workdir,
                               run_config={"script": "fit_script"}, **kw)
  assert len(history) == 1 and int(resumed.step) == 16
  assert float(resumed.temperature) == 4.0
  whole, _ = kdjax.fit(*run(), **kw)
  chex.assert_trees_all_close(resumed.params, whole.params, rtol=1e-5,
                              atol=1e-6)
  # A scheduled run of then (fit.json named its schedule) is not resumed.
  (tmp_path / "sched").mkdir()
  (tmp_path / "sched" / "fit.json").write_text(json.dumps(
      {**old, "temperature_fn": "schedule"}))
  state, teacher, data = run()
  with pytest.raises(validate.WorkdirMismatchError, match="temperature_fn"):
    kdjax.fit(state.replace(schedules=(("temperature", lambda s: 4.0),)),
              teacher, data, workdir=tmp_path / "sched", **kw)
