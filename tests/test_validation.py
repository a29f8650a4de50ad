"""Numeric guards (fit's on_nonfinite), fail-fast validation (kdjax.validate).

Tiny flax MLPs on 8x8 inputs. The validation errors must come before
anything compiles: every test of an invalid input patches ``jax.jit`` to
record calls and records the batch sizes the student's ``apply_fn`` is
traced with (``fit`` traces it once, on one example, with
``jax.eval_shape``; the train step would trace it with a whole batch).
"""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from experiments.mnist import pipeline
from experiments.mnist.configs import default, quick, table_cpu, teacher_cpu
from kdjax import loops, sweep, train, validate
from kdjax.checkpoint import Checkpointer
from kdjax.teacher import Teacher

# kdjax.fit is the function; the module is kdjax.trainer.
from kdjax import trainer as fit_lib  # noqa: E402

N = 72  # 4 steps of 16 per epoch; the last 8 of each epoch's order dropped.
BATCH = 16
STEPS = N // BATCH
RNG = jax.random.key(0)


class MLP(nn.Module):
  width: int = 16
  classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = nn.relu(nn.Dense(self.width)(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.classes)(x)


STUDENT = MLP(16)
TX = optax.sgd(0.1)
TRACED_BATCHES = []  # Leading sizes the student's apply_fn was traced with.


def _apply(params, x, training, rng):
  del rng
  TRACED_BATCHES.append(int(x.shape[0]))
  return STUDENT.apply({"params": params}, x, train=training)


def _init(rng, temperature, alpha):
  params = STUDENT.init(rng, jnp.zeros((1, 8, 8)))["params"]
  return train.TrainState.create(apply_fn=_apply, params=params, tx=TX,
                                 temperature=temperature, alpha=alpha)


def _state():
  return _init(jax.random.key(2), 4.0, 0.1)


def _teacher(classes=10):
  net = MLP(32, classes)
  return Teacher.from_linen(net, net.init(jax.random.key(1),
                                          jnp.zeros((1, 8, 8))))


def _data(bad=None, n=N):
  rs = np.random.RandomState(0)
  image = rs.randn(n, 8, 8).astype(np.float32)
  if bad is not None:
    image[bad, 3, 4] = np.nan
  return {"image": image, "label": rs.randint(0, 10, (n,)).astype(np.int32)}


def _used(rng, epoch, n=N):
  """The example indices of ``epoch``, in order (as make_epoch_fn does)."""
  perm = np.asarray(jax.random.permutation(loops.epoch_key(rng, epoch), n))
  return perm[:(n // BATCH) * BATCH]


def _finite(tree):
  return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def bad_index():
  """An example dropped in epoch 0 and used in epoch 1 (so epoch 1 is bad)."""
  e0, e1 = set(_used(RNG, 0)), list(_used(RNG, 1))
  return next(i for i in e1 if i not in e0)


# ----------------------------------------------------------------------------
# Task A: on_nonfinite.
# ----------------------------------------------------------------------------


@pytest.mark.integration
def test_skip_mode_skips_the_nan_steps(bad_index):
  epochs = 3
  state, history = fit_lib.fit(
      _state(), _teacher(), _data(bad_index), epochs=epochs,
      batch_size=BATCH, rng=RNG, progress=False, on_nonfinite="skip")
  saw = [bad_index in set(_used(RNG, e)) for e in range(epochs)]
  assert saw[1] and not saw[0]
  assert int(state.skipped) == sum(saw)
  assert int(state.step) == epochs * STEPS
  assert _finite(state.params) and _finite(state.opt_state)
  assert [int(h["skipped"]) for h in history] == list(np.cumsum(saw))
  pos = list(_used(RNG, 1)).index(bad_index) // BATCH
  assert int(history[1]["first_nonfinite_step"]) == STEPS + pos
  assert int(history[0]["first_nonfinite_step"]) == -1
  assert float(history[1]["finite"]) == pytest.approx(1 - 1 / STEPS)


@pytest.mark.integration
def test_raise_mode_raises_before_checkpointing(bad_index, tmp_path):
  pos = list(_used(RNG, 1)).index(bad_index) // BATCH
  with pytest.raises(FloatingPointError,
                     match=(rf"epoch 2/3: non-finite metric 'loss' .*"
                            rf"at global step {STEPS + pos} .*"
                            rf"step {pos + 1} of {STEPS} in the epoch.*"
                            r"last checkpoint is epoch 1")) as info:
    fit_lib.fit(_state(), _teacher(), _data(bad_index), epochs=3,
                batch_size=BATCH, rng=RNG, progress=False, workdir=tmp_path,
                on_nonfinite="raise")
  assert "'grad_norm'" in str(info.value)
  ckpt = Checkpointer(tmp_path / "checkpoints")
  assert ckpt.all_epochs() == [1]
  restored, meta = ckpt.restore_latest(_state())
  ckpt.close()
  # The state after the clean first epoch: trained, finite, nothing skipped.
  assert int(meta["epoch"]) == 1 and int(restored.step) == STEPS
  assert int(restored.skipped) == 0 and _finite(restored.params)
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(restored.params), jax.tree.leaves(_state().params)))
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["epoch"] for l in lines] == [1]


@pytest.mark.integration
def test_raise_mode_names_the_sweep_member():
  n, bad = 64, 5  # No example dropped: every member sees the NaN in epoch 0.
  members = [_init(jax.random.key(s), t, 0.1) for s, t in [(0, 2.0), (1, 4.0)]]
  states = jax.tree.map(lambda *x: jnp.stack(x), *members)
  keys = sweep.sweep_keys([10, 11])
  pos = list(_used(keys[0], 0, n)).index(bad) // BATCH
  with pytest.raises(FloatingPointError,
                     match=rf"global step {pos} in sweep member 0 "
                           r"\(members affected: \[0, 1\]\)"):
    fit_lib.fit(states, _teacher(), _data(bad, n), epochs=1,
                batch_size=BATCH, rng=keys, vmapped=True, progress=False,
                on_nonfinite="raise")


def test_on_nonfinite_is_checked():
  with pytest.raises(ValueError, match="on_nonfinite must be one of"):
    fit_lib.fit(_state(), _teacher(), _data(), epochs=1, batch_size=BATCH,
                rng=RNG, on_nonfinite="ignore")
  with pytest.raises(ValueError, match="skip_nonfinite=False"):
    fit_lib.fit(_state(), _teacher(), _data(), epochs=1, batch_size=BATCH,
                rng=RNG, on_nonfinite="raise", skip_nonfinite=False)


# ----------------------------------------------------------------------------
# Task B: configs.
# ----------------------------------------------------------------------------


def _config(**changes):
  """The default config with dotted-key changes, built from a dict (as a
  config file can), bypassing ConfigDict's type-safe assignment."""
  d = default.get_config().to_dict()
  for key, value in changes.items():
    *parents, last = key.split(".")
    node = d
    for p in parents:
      node = node[p]
    node[last] = value
  return ml_collections.ConfigDict(d)


@pytest.mark.parametrize("module", [default, quick, table_cpu, teacher_cpu])
def test_shipped_configs_are_valid(module):
  pipeline.validate_config(module.get_config())


def test_unknown_key_names_the_closest_valid_key():
  with pytest.raises(validate.ConfigError,
                     match=r"^unknown config key 'student\.distil'; did you "
                           r"mean 'student\.distill'\?$"):
    pipeline.validate_config(_config(**{"student.distil": {"epochs": 3}}))
  with pytest.raises(validate.ConfigError,
                     match=r"unknown config key 'sweep\.temperature'; did you "
                           r"mean 'sweep\.temperatures'\?"):
    pipeline.validate_config(_config(**{"sweep.temperature": 3.0}))


def test_unknown_row_names_the_closest_valid_row():
  with pytest.raises(validate.ConfigError,
                     match=r"^config\.rows: unknown row\(s\) 'distiled_T20' "
                           r"\(did you mean 'distilled_T20'\?\), 'xyz'; valid "
                           r"rows are student_alone, distilled_T20, "):
    pipeline.validate_config(_config(rows=("distiled_T20", "omit3", "xyz")))
  pipeline.validate_config(_config(rows=tuple(pipeline.ROWS)))


def test_wrong_type_names_expected_and_got():
  with pytest.raises(TypeError,
                     match=r"^config key 'student\.distill\.temperature' must "
                           r"be a float \(an int is accepted\), got str "
                           r"'20'\.$"):
    pipeline.validate_config(_config(**{"student.distill.temperature": "20"}))
  with pytest.raises(TypeError, match=r"'teacher\.epochs' must be an int, got "
                                      r"float 3\.0"):
    pipeline.validate_config(_config(**{"teacher.epochs": 3.0}))
  with pytest.raises(TypeError, match=r"'sweep\.temperatures\[1\]' must be a "
                                      r"float.*got str"):
    pipeline.validate_config(_config(**{"sweep.temperatures": [1.0, "x"]}))
  # Ints are fine where floats are expected.
  pipeline.validate_config(_config(**{"student.distill.temperature": 20,
                                      "sweep.temperatures": [1, 2.5]}))


@pytest.mark.parametrize("key,value,where,message", [
    ("student.distill.temperature", 0.0, "student.distill.temperature",
     "must be a finite number > 0, got 0.0"),
    ("student.distill.alpha", 1.5, "student.distill.alpha",
     r"must lie in \[0, 1\], got 1.5"),
    ("sweep.temperatures", [1.0, -2.0], r"sweep.temperatures\[1\]",
     "must be a finite number > 0, got -2.0"),
    ("sweep.alpha", -0.1, "sweep.alpha", r"must lie in \[0, 1\], got -0.1"),
    ("soft3pct.alpha", 2.0, "soft3pct.alpha", r"must lie in \[0, 1\], got 2.0"),
    ("logit_matching.temperatures", [0.0], r"logit_matching.temperatures\[0\]",
     "must be a finite number > 0, got 0.0"),
    ("student.hidden_dropout", 1.0, "student.hidden_dropout",
     r"must lie in \[0, 1\), got 1.0"),
    ("teacher.input_dropout", -0.2, "teacher.input_dropout",
     r"must lie in \[0, 1\), got -0.2"),
])
def test_hyperparameter_ranges(key, value, where, message):
  with pytest.raises(validate.ConfigError,
                     match=rf"^config key '{where}' {message}"):
    pipeline.validate_config(_config(**{key: value}))


def test_temperature_and_alpha_in_train_state():
  with pytest.raises(ValueError, match="temperature must be > 0"):
    _init(jax.random.key(0), 0.0, 0.1)
  with pytest.raises(ValueError, match=r"alpha must lie in \[0, 1\]"):
    _init(jax.random.key(0), 1.0, 1.1)


class _Stop(Exception):
  pass


@pytest.fixture
def no_data(monkeypatch):
  """pipeline.run stops where it would load MNIST."""
  def stop(config):
    raise _Stop
  monkeypatch.setattr(pipeline, "load_splits", stop)


def test_pipeline_run_validates_first(tmp_path, no_data):
  with pytest.raises(validate.ConfigError, match="student.distil'; did you"):
    pipeline.run(_config(**{"student.distil": {}}), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()  # Nothing recorded or loaded.


def test_pipeline_run_records_config_and_rejects_another(tmp_path, no_data):
  workdir = tmp_path / "w"
  config = quick.get_config()
  with pytest.raises(_Stop):
    pipeline.run(config, str(workdir))
  # The data did not load: nothing is recorded, so a corrected rerun in
  # the same workdir is not refused (run_config.json is written once the
  # data has loaded).
  assert not (workdir / "run_config.json").exists()
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / "run_config.json").write_text(json.dumps(config.to_dict()))
  with pytest.raises(_Stop):  # The same config resumes.
    pipeline.run(quick.get_config(), str(workdir))
  other = quick.get_config()
  other.student.distill.epochs = 7
  with pytest.raises(ValueError, match=r"different configuration "
                     r"\(run_config.json: keys differing: \['student'\]\)"):
    pipeline.run(other, str(workdir))


# ----------------------------------------------------------------------------
# Task B: batches, models, labels (fit checks them before compiling).
# ----------------------------------------------------------------------------


def test_validate_batch():
  with pytest.raises(ValueError, match=r"^batch size 12 is not divisible by "
                                       r"the device count 8; use a multiple "
                                       r"of 8 \(e\.g\. 16\)\.$"):
    validate.validate_batch(12, 8)
  validate.validate_batch(16, 8)
  with pytest.raises(ValueError, match="12 is not divisible by the device "
                                       "count 8"):
    train.shard_batch(_data(n=12))


@pytest.fixture
def jit_calls(monkeypatch):
  """Records every jax.jit call and the student's traced batch sizes."""
  calls = []
  real = jax.jit

  def recording_jit(*args, **kwargs):
    calls.append(args)
    return real(*args, **kwargs)

  monkeypatch.setattr(jax, "jit", recording_jit)
  TRACED_BATCHES.clear()
  yield calls
  TRACED_BATCHES.clear()


def _assert_nothing_compiled(jit_calls):
  assert not jit_calls, "fit reached jax.jit"
  assert set(TRACED_BATCHES) <= {1}, (
      f"the step was traced (batch sizes {TRACED_BATCHES})")


def test_fit_rejects_different_class_counts(jit_calls):
  with pytest.raises(ValueError, match=r"^teacher and student predict "
                                       r"different numbers of classes: the "
                                       r"teacher has 12 classes .* the "
                                       r"student 10 "):
    fit_lib.fit(_state(), _teacher(classes=12), _data(), epochs=1,
                batch_size=BATCH, rng=RNG, progress=False)
  _assert_nothing_compiled(jit_calls)
  data = {**_data(), "teacher_logits": np.zeros((N, 11), np.float32)}
  with pytest.raises(ValueError, match="teacher has 11 classes"):
    fit_lib.fit(_state(), None, data, epochs=1, batch_size=BATCH, rng=RNG,
                progress=False)
  _assert_nothing_compiled(jit_calls)


@pytest.mark.parametrize("value,index", [(10, 5), (-1, 70)])
def test_fit_rejects_out_of_range_labels(jit_calls, tmp_path, value, index):
  data = _data()
  data["label"][index] = value
  with pytest.raises(ValueError,
                     match=rf"^label {value} \(at index {index}\) is out of "
                           r"range: labels must lie in \[0, 9\] for 10 "
                           r"classes"):
    fit_lib.fit(_state(), _teacher(), data, epochs=1, batch_size=BATCH,
                rng=RNG, progress=False, workdir=tmp_path / "w",
                run_config={"x": 1})
  _assert_nothing_compiled(jit_calls)
  assert not (tmp_path / "w").exists()


def test_validate_models_and_labels():
  validate.validate_models((4, 10), (4, 10))
  validate.validate_models(None, (4, 10))
  with pytest.raises(ValueError, match="teacher has 3 classes"):
    validate.validate_models((1, 3), (1, 10))
  validate.validate_labels(np.arange(10), 10)
  with pytest.raises(TypeError, match="labels must be integer"):
    validate.validate_labels(np.zeros(3, np.float32), 10)
