"""The option types of fit and the step (issue #19 part 4), and fit's
one-line errors for the mistakes of a first trial (part 7)."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kdjax
from kdjax import fitting, options
from kdjax.paper import models

BATCH, NUM = 32, 128


def _data(n=NUM):
  rs = np.random.RandomState(0)
  return {"image": rs.randint(0, 256, (n, 8, 8)).astype(np.uint8),
          "label": rs.randint(0, 10, (n,)).astype(np.int32)}


def _state(input_shape=(1, 8, 8)):
  net = models.MLP((16,))
  student = kdjax.Student.from_linen(net, {
      "params": models.init_params(net, jax.random.key(2), input_shape)})
  return kdjax.TrainState.create(student, tx=optax.sgd(0.1), temperature=4.0,
                                 alpha=0.1)


def _teacher():
  net = models.MLP((24,))
  return kdjax.Teacher.from_linen(net, {
      "params": models.init_params(net, jax.random.key(1), (1, 8, 8))})


def test_fit_has_at_most_15_parameters():
  assert len(inspect.signature(kdjax.fit).parameters) <= 15


def test_option_types_are_frozen_hashable_and_equal_by_value():
  jitter = kdjax.paper.augment.make_jitter(1)
  a = kdjax.StepSpec("kd", augment=jitter,
                     precision=kdjax.Precision(jnp.bfloat16, ["logits"]))
  b = kdjax.StepSpec("kd", augment=jitter,
                     precision=kdjax.Precision("bfloat16", ("logits",)))
  assert a == b and hash(a) == hash(b)
  assert a != kdjax.StepSpec("kd", augment=jitter)
  with pytest.raises(AttributeError):
    a.on_nonfinite = "raise"  # frozen
  assert a.record() == {
      "objective": "kd", "augment": "jitter(max_shift=1)",
      "skip_nonfinite": True, "compute_dtype": "bfloat16",
      "keep_float32": ["logits"]}
  ckpt = kdjax.Checkpointing("/tmp/x", run_config={"lr": 0.1})
  assert hash(ckpt) == hash(kdjax.Checkpointing("/tmp/x"))
  for opt in (kdjax.Loop("steps"), kdjax.Evaluation(lambda s: {})):
    hash(opt)


@pytest.mark.parametrize("make, match", [
    (lambda: kdjax.StepSpec(on_nonfinite="ignore"), "on_nonfinite"),
    (lambda: kdjax.StepSpec(objective="nope"), "objective"),
    (lambda: kdjax.Loop("fast"), "loop"),
    (lambda: kdjax.Checkpointing("/tmp/x", every_epochs=0), "every_epochs"),
    (lambda: kdjax.Evaluation(3), "Evaluation.fn"),
    (lambda: kdjax.Precision(jnp.int32), "compute_dtype"),
])
def test_bad_options_are_refused_where_they_are_made(make, match):
  with pytest.raises((TypeError, ValueError), match=match):
    make()


def test_the_legacy_keywords_make_the_same_spec():
  with pytest.warns(DeprecationWarning):
    old = options.step_spec("soft", augment_fn=None, compute_dtype="bfloat16",
                            keep_float32=("logits",), skip_nonfinite=False)
  assert old == kdjax.StepSpec(
      "soft", precision=kdjax.Precision("bfloat16", ("logits",)),
      on_nonfinite="apply")
  with pytest.raises(ValueError, match="cannot be combined"):
    options.step_spec("kd", skip_nonfinite=False, on_nonfinite="raise")
  with pytest.raises(TypeError, match="not both"):
    options.step_spec(kdjax.StepSpec(), fields=kdjax.Fields())


@pytest.mark.integration  # two or three fits
def test_fit_with_options_equals_fit_with_the_old_keywords(tmp_path):
  kw = dict(epochs=2, batch_size=BATCH, rng=jax.random.key(0),
            progress=False)
  new, h_new = kdjax.fit(
      _state(), _teacher(), _data(), spec=kdjax.StepSpec("kd"),
      checkpoint=kdjax.Checkpointing(tmp_path / "a", every_epochs=1),
      evaluation=kdjax.Evaluation(lambda s: {"n": 1.0}, every=1),
      loop=kdjax.Loop("scan"), **kw)
  with pytest.warns(DeprecationWarning):
    old, h_old = kdjax.fit(
        _state(), _teacher(), _data(), objective="kd",
        workdir=tmp_path / "b", checkpoint_every=1,
        eval_fn=lambda s: {"n": 1.0}, eval_every=1, loop="scan", **kw)
  jax.tree.map(np.testing.assert_array_equal, new.params, old.params)
  assert [h["n"] for h in h_new] == [h["n"] for h in h_old] == [1.0, 1.0]
  assert ((tmp_path / "a" / "fit.json").read_text()
          == (tmp_path / "b" / "fit.json").read_text())


@pytest.mark.integration
def test_a_second_fit_with_an_equal_spec_does_not_recompile():
  fitting._RUNNERS.clear()  # pylint: disable=protected-access
  kw = dict(epochs=1, batch_size=BATCH, rng=jax.random.key(0),
            progress=False, loop="scan")
  kdjax.fit(_state(), _teacher(), _data(), spec=kdjax.StepSpec("kd"), **kw)
  kdjax.fit(_state(), _teacher(), _data(), spec=kdjax.StepSpec("kd"), **kw)
  assert len(fitting._RUNNERS) == 1  # pylint: disable=protected-access


@pytest.mark.integration
def test_make_train_step_from_a_spec_equals_the_keyword_form():
  batch = {k: jnp.asarray(v[:BATCH]) for k, v in _data().items()}
  spec = kdjax.StepSpec("kd", input_transform=kdjax.preprocess.scale_pixels)
  a, _ = kdjax.make_train_step(spec)(_state(), _teacher(), batch,
                                     jax.random.key(0))
  b, _ = kdjax.make_train_step(
      "kd", input_transform=kdjax.preprocess.scale_pixels)(
          _state(), _teacher(), batch, jax.random.key(0))
  jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
  assert kdjax.make_train_step(spec).spec is spec


@pytest.mark.integration  # two or three fits
def test_apply_policy_applies_a_nonfinite_update():
  data = _data()
  data = {"image": data["image"].astype(np.float32), "label": data["label"]}
  data["image"][0, 0, 0] = np.nan
  kw = dict(epochs=1, batch_size=NUM, rng=jax.random.key(0), progress=False)
  skipped, _ = kdjax.fit(_state(), _teacher(), data,
                         spec=kdjax.StepSpec(on_nonfinite="skip"), **kw)
  applied, _ = kdjax.fit(_state(), _teacher(), data,
                         spec=kdjax.StepSpec(on_nonfinite="apply"), **kw)
  assert int(skipped.skipped) == 1 and int(applied.skipped) == 0
  assert np.isfinite(jax.tree.leaves(skipped.params)[0]).all()
  assert not np.isfinite(np.concatenate(
      [np.ravel(x) for x in jax.tree.leaves(applied.params)])).all()
  with pytest.raises(FloatingPointError, match="non-finite"):
    kdjax.fit(_state(), _teacher(), data,
              spec=kdjax.StepSpec(on_nonfinite="raise"), **kw)


# Part 7: one-line errors naming the fix, raised before anything compiles.


def test_rng_that_is_not_a_key_is_one_line():
  with pytest.raises(TypeError, match=r"rng must be a JAX key.*got int 0.*"
                     r"rng=jax.random.key\(seed\)"):
    kdjax.fit(_state(), _teacher(), _data(), epochs=1, batch_size=BATCH,
              rng=0, progress=False)


def test_a_workdir_that_is_a_file_is_one_line(tmp_path):
  path = tmp_path / "run"
  path.write_text("not a directory")
  for workdir in (path, path / "sub"):
    with pytest.raises(ValueError, match=r"workdir=.* a file.*workdir="):
      kdjax.fit(_state(), _teacher(), _data(), epochs=1, batch_size=BATCH,
                rng=jax.random.key(0), progress=False,
                checkpoint=kdjax.Checkpointing(workdir))


@pytest.mark.integration
def test_a_different_run_in_the_workdir_names_the_workdir_argument(tmp_path):
  kw = dict(epochs=1, rng=jax.random.key(0), progress=False,
            checkpoint=tmp_path)
  kdjax.fit(_state(), _teacher(), _data(), batch_size=BATCH, **kw)
  with pytest.raises(ValueError, match="Pass a new workdir="):
    kdjax.fit(_state(), _teacher(), _data(), batch_size=BATCH // 2, **kw)


def test_an_input_shape_the_student_was_not_built_for_is_one_line():
  with pytest.raises(ValueError, match=r"not built for inputs of shape "
                     r"\(1, 8, 8\).*Initialise the student"):
    kdjax.fit(_state(input_shape=(1, 6, 6)), _teacher(), _data(), epochs=1,
              batch_size=BATCH, rng=jax.random.key(0), progress=False)
