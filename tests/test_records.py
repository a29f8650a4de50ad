"""kdjax.records: fit.json names the augmentation (describe), old records
resume (same_fit_record), and moved modules keep their recorded names."""
import functools
import json
import pathlib
import sys

import jax
import pytest

import kdjax
from kdjax import fitting, records, validate
from kdjax.paper import augment

SCRIPT_DIR = pathlib.Path(__file__).parent


def _tiny_run():
  sys.path.insert(0, str(SCRIPT_DIR))
  try:
    import fit_script  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  return fit_script.make_run()


def _record(state, augment_fn):
  return fitting.fit_record(state, kdjax.StepSpec("kd", augment=augment_fn),
                            batch_size=32, num_examples=256)


def _jitter_kw(rng, images, *, max_shift):  # a module-level plain function
  return augment.jitter(rng, images, max_shift)


def test_describe():
  assert records.describe(None) is None
  assert records.describe(augment.make_jitter(2)) == "jitter(max_shift=2)"
  assert records.describe(augment.make_jitter(0)) == "jitter(max_shift=0)"
  # A plain function keeps the name fit.json always recorded for it.
  assert records.describe(_jitter_kw) == "_jitter_kw"
  assert records.describe(lambda r, x: x) == "test_describe.<locals>.<lambda>"
  # Any functools.partial: name(args, kw=value), nested partials included.
  assert (records.describe(functools.partial(_jitter_kw, max_shift=3))
          == "_jitter_kw(max_shift=3)")
  assert (records.describe(functools.partial(augment.translate, max_shift=1))
          == "translate(max_shift=1)")
  assert records.describe(functools.partial(max, 2, key=abs)) == (
      "max(2, key=<built-in function abs>)")

  class Flip:
    def __call__(self, rng, images):
      return images[:, :, ::-1]
  assert records.describe(Flip()) == "Flip"


@pytest.mark.integration
def test_make_jitter_still_jits_and_matches_jitter():
  x = jax.numpy.ones((4, 8, 8))
  key = jax.random.key(0)
  fn = augment.make_jitter(2)
  assert (jax.jit(fn)(key, x) == augment.jitter(key, x, 2)).all()


@pytest.mark.integration
def test_record_names_the_shift():
  state, _, _ = _tiny_run()
  assert _record(state, None)["augment"] is None
  assert _record(state, augment.make_jitter(2))["augment"] == (
      "jitter(max_shift=2)")
  assert _record(state, augment.make_jitter(1)) != _record(
      state, augment.make_jitter(2))


@pytest.mark.integration
def test_a_different_shift_is_refused(tmp_path):
  state, _, _ = _tiny_run()
  fitting.check_run_config(tmp_path, _record(state, augment.make_jitter(2)),
                           filename="fit.json")
  assert json.loads((tmp_path / "fit.json").read_text())["augment"] == (
      "jitter(max_shift=2)")
  fitting.check_run_config(tmp_path, _record(state, augment.make_jitter(2)),
                           filename="fit.json")  # the same run resumes
  with pytest.raises(validate.WorkdirMismatchError,
                     match=r"fit.json: keys differing: \['augment'\]"):
    fitting.check_run_config(tmp_path, _record(state, augment.make_jitter(1)),
                             filename="fit.json")
  with pytest.raises(ValueError):  # still a ValueError, as before
    fitting.check_run_config(tmp_path, _record(state, None),
                             filename="fit.json")


def test_same_fit_record_legacy_rule():
  old = {"augment": "partial", "batch_size": 32}
  assert records.same_fit_record(old, {"augment": "jitter(max_shift=2)",
                                       "batch_size": 32})
  assert records.same_fit_record(old, {"augment": "jitter(max_shift=1)",
                                       "batch_size": 32})
  assert not records.same_fit_record(old, {"augment": "jitter(max_shift=2)",
                                           "batch_size": 64})
  assert not records.same_fit_record(old, {"augment": None, "batch_size": 32})
  assert not records.same_fit_record(old, {"augment": "translate(max_shift=1)",
                                           "batch_size": 32})
  assert not records.same_fit_record(old, {"augment": "jitter(max_shift=2)"})
  # Only "partial" in the old record is legacy; the other way round is not.
  assert not records.same_fit_record(
      {"augment": "jitter(max_shift=2)"}, {"augment": "partial"})


@pytest.mark.integration
def test_old_partial_workdir_resumes(tmp_path):
  """A workdir written when fit.json said "partial" for make_jitter resumes."""
  kw = {"batch_size": 32, "rng": jax.random.key(0), "progress": False,
        "checkpoint": kdjax.Checkpointing(tmp_path),
        "spec": kdjax.StepSpec(augment=augment.make_jitter(2))}
  kdjax.fit(*_tiny_run(), epochs=1, **kw)
  path = tmp_path / "fit.json"
  record = json.loads(path.read_text())
  assert record["augment"] == "jitter(max_shift=2)"
  path.write_text(json.dumps({**record, "augment": "partial"}))  # the old form
  _, history = kdjax.fit(*_tiny_run(), epochs=2, **kw)
  assert len(history) == 1  # resumed after epoch 1, ran epoch 2 only
  epochs = [json.loads(line)["epoch"] for line in
            (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert epochs == [1, 2]
  # The old record is kept as it was (nothing rewritten on resume).
  assert json.loads(path.read_text())["augment"] == "partial"


# The keys of fit.json as written before the option types (StepSpec), with
# 'temperature' and 'alpha' read as 'hparams' (kdjax.hparams.
# upgrade_fit_record): a run with default fields, precision and loop writes
# exactly these, so the workdirs of earlier runs (experiments/mnist's) still
# match and resume.
_OLD_KEYS = {"objective", "batch_size", "num_examples", "augment", "vmapped",
             "skip_nonfinite", "hparams", "state"}


def test_default_record_has_the_old_keys(tmp_path):
  state, _, _ = _tiny_run()
  for policy in ("skip", "raise"):
    record = fitting.fit_record(state, kdjax.StepSpec(on_nonfinite=policy),
                                batch_size=32, num_examples=256)
    assert set(record) == _OLD_KEYS
    assert record["skip_nonfinite"] is True
  # A record in the form written before StepSpec and hparams is accepted.
  old = {k: v for k, v in record.items() if k not in ("hparams", "state")}
  old.update(record["hparams"])
  old["state"] = {k.replace("hparams.", ""): v
                  for k, v in record["state"].items()}
  (tmp_path / "fit.json").write_text(json.dumps(old))
  fitting.check_run_config(tmp_path, record, filename="fit.json")
  record = fitting.fit_record(state, kdjax.StepSpec(on_nonfinite="apply"),
                              batch_size=32, num_examples=256)
  assert record["skip_nonfinite"] is False  # what skip_nonfinite=False wrote
  # The deprecated keywords give the same record (and the same spec).
  with pytest.warns(DeprecationWarning):
    old = kdjax.options.step_spec("kd", skip_nonfinite=False)
  assert old == kdjax.StepSpec(on_nonfinite="apply")


# fingerprint() of kdjax's own objects, computed at 071381b, before
# kdjax.losses, kdjax.topk, kdjax.models and kdjax.augment moved (to
# kdjax.losses.divergences, kdjax.losses.topk and kdjax.paper): hashes
# recorded then (fit.json's objective_code) must still match.
# distillation_loss and kd_objective then gained the teacher_vocab_padding
# argument (kdjax.vocab), a real change of their code: their hashes below
# are those after it, at 3f64834 (a run recorded with a partial of the old
# code is refused on resume, as an edited objective is).
_HASHES_BEFORE_THE_MOVE = {
    "partial_distill": "bc76b3ccd56a9eda",
    "partial_kd": "e4fe135f755fd4fd",
    "partial_topk": "5c21362f07d00aa4",
    "jitter": "d98e8fe40e948315",
    "mlp_type": "083c4ddb74843091",
    "module_topk": "ca55521ff477692e",
    "module_models": "bfa452421186ac59",
}


def test_fingerprints_of_moved_modules_are_unchanged():
  from kdjax import hparams, losses  # pylint: disable=g-import-not-at-top
  from kdjax.paper import models  # pylint: disable=g-import-not-at-top
  items = {
      "partial_distill": functools.partial(losses.distillation_loss,
                                           temperature=2.0),
      "partial_kd": functools.partial(kdjax.kd_objective, alpha=0.1),
      "partial_topk": functools.partial(losses.topk_distillation_loss,
                                        temperature=2.0),
      "jitter": augment.make_jitter(2),
      "mlp_type": models.MLP,
      "module_topk": losses.topk,
      "module_models": models,
  }
  got = {k: hparams.fingerprint(v) for k, v in items.items()}
  assert got == _HASHES_BEFORE_THE_MOVE


def test_recorded_module():
  assert records.recorded_module("kdjax.paper.models") == "kdjax.models"
  assert records.recorded_module("kdjax.losses.divergences") == "kdjax.losses"
  assert records.recorded_module("kdjax.step") == "kdjax.step"
  assert records.recorded_module("mymodel") == "mymodel"
