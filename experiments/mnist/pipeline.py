"""The paper's MNIST section (Hinton, Vinyals & Dean 2015, §3), end to end.

``run(config, workdir)`` trains (or loads) the teacher, then every requested
row of the results table, and writes ``<workdir>/results.json``,
``results.md`` and the plots. All logic lives here so a notebook can call
it; ``main.py`` is only flags.

Protocol (what makes the numbers honest):

* The 60k training images are split into 50k for training and 10k for
  validation (seeded). The validation split chooses bias shifts; the test
  set chooses nothing.
* Every reported number is the **last epoch's**; no epoch is picked.
* Students of one row are trained together as a vmapped sweep over seeds
  (and temperatures), one compiled program; each member equals the same run
  done alone.
* The distilled students train on the **unjittered** transfer set with the
  teacher's logits cached once (the teacher is in inference mode).

``results.json`` (``results.partial.json`` while the run goes, with
``"partial": true``)::

  {"config", "git_commit", "jax_version", "device", "environment", "command",
   "total_seconds",
   "rows": [{"name", "test_errors": [one per seed], "paper_test_errors": n or
             null, "seconds", "val_errors": [one per seed], ...}, ...],
   "params_sha256": {"teacher": sha, <row>: [one per seed],
                     "sweep_w<width>": {"T<T>_seed<s>": sha, ...}}}

Rows, in this order, for the rows the config asks for: ``teacher``
(``source``), ``student_alone``, ``distilled_T20``, the optional
``student_alone_jitter`` / ``distilled_T20_jitter``, ``omit3_before_shift``
/ ``omit3_after_shift`` (``errors_on_3``, ``num_test_3s``,
``paper_errors_on_3``; after: ``bias_shift``, ``paper_bias_shift``,
``shift_chosen_on``), ``only78_before_shift`` / ``only78_after_shift``
(``test_error_rate``, ``paper_test_error_rate``; after: ``bias_shift``,
``paper_bias_shift``, ``shift_chosen_on``), ``soft3pct_hard_labels`` /
``soft3pct_soft_targets`` (``num_train``), ``sweep_w{width}_T{T:g}`` and
``logit_matching_caruana`` / ``logit_matching_distill_T{T:g}``. Trained rows
also carry ``temperature``, ``alpha``, ``epochs``, ``objective``, ``width``
and ``jitter`` (the sweep: ``width``, ``temperature``, ``alpha``,
``epochs``).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import pathlib
import sys
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kdjax import cache, checkpoint, evaluate, sweep, validate
from kdjax.paper import augment, data, models, optim, provenance
from kdjax.fitting import check_run_config, fit
from kdjax.options import Checkpointing, Evaluation, StepSpec

from experiments.mnist import transfer
from kdjax.teacher import Teacher
from kdjax.step import TrainState

PAPER = {"teacher": 67, "student_alone": 146, "distilled_T20": 74,
         "omit3_before_shift": 206, "omit3_after_shift": 109,
         # The paper gives rates (47.3%, 13.2%) of the 10,000 test images.
         "only78_before_shift": 4730, "only78_after_shift": 1320,
         "soft3pct_hard_labels": None, "soft3pct_soft_targets": None}
PAPER_EXTRA = {"omit3_before_shift": {"errors_on_3": 133},
               "omit3_after_shift": {"errors_on_3": 14, "bias_shift": 3.5},
               "only78_before_shift": {"test_error_rate": 0.473},
               "only78_after_shift": {"test_error_rate": 0.132,
                                      "bias_shift": -7.6}}


# ----------------------------------------------------------------------------
# Data.
# ----------------------------------------------------------------------------


def load_splits(config) -> data.MnistSplits:
  return data.load_mnist_splits(config.data_dir or None,
                                num_val=config.num_val, seed=config.split_seed,
                                as_float=False)


def to_device(images, labels) -> dict:
  return {"image": jnp.asarray(images), "label": jnp.asarray(labels)}


# ----------------------------------------------------------------------------
# Optimisers.
# ----------------------------------------------------------------------------


make_optimizer = optim.make_optimizer


# ----------------------------------------------------------------------------
# Evaluation.
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _eval_fn(apply):
  """One eval function per apply (a static argument: reused compilations)."""
  return lambda params, x: apply(params, x, False, None)


def predict_logits(apply, params, images) -> np.ndarray:
  """Eval-mode logits, ``[N, C]``, in chunks of 1000 (kdjax.evaluate)."""
  return np.array(evaluate.predict_logits(_eval_fn(apply), params, images,
                                          batch_size=1000))


errors = evaluate.errors


def shifted(logits: np.ndarray, classes, amount: float) -> np.ndarray:
  """Logits with ``amount`` added to ``classes``: a shift of their biases."""
  out = logits.copy()
  out[:, list(classes)] += amount
  return out


def choose_bias_shift(val_logits: np.ndarray, val_labels: np.ndarray,
                      classes, grid) -> float:
  """The shift of ``classes``' logits (biases) that minimises validation errors.

  Ties go to the smallest absolute shift. The test set is never used. Grid
  points are rounded to 6 decimals first, so that a float-stepped
  ``np.arange`` grid reports -10.6, not -10.600000000000016.
  """
  best, best_err = 0.0, None
  for b in sorted((round(float(g), 6) for g in grid), key=abs):
    err = errors(shifted(val_logits, classes, b), val_labels)
    if best_err is None or err < best_err:
      best, best_err = b, err
  return best


# ----------------------------------------------------------------------------
# Teacher.
# ----------------------------------------------------------------------------


def teacher_module(config):
  t = config.teacher
  return models.MLP(tuple(t.hidden), input_dropout=t.input_dropout,
                    hidden_dropout=t.hidden_dropout)


def save_teacher(path: pathlib.Path, params, info: dict) -> None:
  checkpoint.save_params(path, params)
  meta = path.with_suffix(".json")
  meta.write_text(
      json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")


def load_teacher_params(path: pathlib.Path, module):
  # Only the structure and shapes are needed: no initialisation is run.
  like = jax.eval_shape(lambda: models.init_params(
      module, jax.random.key(0), (1, 28, 28)))
  return checkpoint.load_params(path, like)


def train_teacher(config, splits, workdir: pathlib.Path):
  """The paper's teacher recipe: dropout, max-norm, ±2-pixel jitter."""
  t = config.teacher
  module = teacher_module(config)
  train_data = to_device(splits.train_images, splits.train_labels)
  steps = (splits.train_labels.shape[0] // t.batch_size) * t.epochs
  tx = make_optimizer(t.optimizer, steps, max_sq_norm=t.max_sq_norm)
  params = models.init_params(module, jax.random.key(t.seed), (1, 28, 28))
  state = TrainState.create(apply_fn=models.linen_student_apply(module),
                            params=params, tx=tx)
  apply = models.linen_student_apply(module)
  val = jnp.asarray(splits.val_images)

  def eval_fn(state):
    return {"val_errors": errors(predict_logits(apply, state.params, val),
                                 splits.val_labels)}

  state, history = fit(
      state, None, train_data, epochs=t.epochs, batch_size=t.batch_size,
      rng=jax.random.key(t.seed), spec=StepSpec(
          "hard", augment=augment.make_jitter(t.jitter) if t.jitter else None),
      checkpoint=Checkpointing(workdir / "teacher", run_config=t.to_dict()),
      evaluation=Evaluation(eval_fn, every=t.get("eval_every", 10)),
      desc="teacher")
  return state.params, history


def get_teacher(config, splits, workdir: pathlib.Path):
  """Loads the shipped teacher (``config.teacher.path``) or trains one."""
  module = teacher_module(config)
  path = config.teacher.get("path", "")
  t0 = time.perf_counter()
  if path:
    path = pathlib.Path(path)
    if not path.is_absolute():
      path = pathlib.Path(__file__).resolve().parents[2] / path
    if not path.exists():
      raise FileNotFoundError(
          f"teacher file {path} not found; set --config.teacher.path='' to "
          "train a teacher instead.")
    params = load_teacher_params(path, module)
    source = str(path)
  else:
    params, _ = train_teacher(config, splits, workdir)
    source = "trained in this run"
  seconds = time.perf_counter() - t0
  teacher = Teacher.from_linen(module, {"params": params})
  return teacher, params, source, seconds


# ----------------------------------------------------------------------------
# Students (vmapped sweeps).
# ----------------------------------------------------------------------------


def student_dropout(config) -> tuple[float, float]:
  """The students' (input, hidden) dropout rates (0, 0 in the paper)."""
  s = config.student
  return (float(s.get("input_dropout", 0.0)),
          float(s.get("hidden_dropout", 0.0)))


def initial_students(width: int, opt_cfg, total_steps: int, *, seeds,
                     temperatures, alphas, dropout=(0.0, 0.0)):
  """The stacked initial states of a row's students, and their apply function.

  One ``width``-unit paper student per (seed, temperature, alpha), with the
  optimizer of ``opt_cfg`` scheduled over ``total_steps``, and ``dropout``
  (input, hidden) rates: none in the paper. Also the structure to restore a
  row's checkpoint into (``fidelity.py``).
  """
  module = models.MLP((width, width), input_dropout=float(dropout[0]),
                      hidden_dropout=float(dropout[1]))
  apply = models.linen_student_apply(module)
  tx = make_optimizer(opt_cfg, total_steps)

  def init(rng, temperature, alpha):
    params = models.init_params(module, rng, (1, 28, 28))
    return TrainState.create(apply_fn=apply, params=params, tx=tx,
                             temperature=temperature, alpha=alpha)

  states = sweep.create_sweep(init, seeds=seeds, temperatures=temperatures,
                              alphas=alphas)
  return states, apply


def train_students(config, *, name: str, width: int, transfer: dict,
                   objective: str, seeds, temperatures, alphas, epochs: int,
                   opt_cfg, workdir: pathlib.Path, teacher=None,
                   jitter: int = 0):
  """Trains len(seeds) students of one width as one vmapped program.

  ``transfer`` holds the cached ``'teacher_logits'``, or ``teacher`` is
  given and applied online (needed when ``jitter`` > 0 shifts the inputs,
  since cached logits would be those of the unshifted images).

  Returns:
    (stacked final params, apply function, seconds).
  """
  n = int(transfer["label"].shape[0])
  batch_size = min(config.batch_size, n)
  dropout = student_dropout(config)
  states, apply = initial_students(
      width, opt_cfg, (n // batch_size) * epochs, seeds=seeds,
      temperatures=temperatures, alphas=alphas, dropout=dropout)
  t0 = time.perf_counter()
  run_cfg = {"name": name, "width": width, "objective": objective,
             "seeds": list(seeds), "temperatures": list(temperatures),
             "alphas": list(alphas), "epochs": epochs, "n": n,
             "optimizer": opt_cfg.to_dict(), "batch_size": batch_size,
             "jitter": jitter, "dropout": list(dropout)}
  states, _ = fit(states, teacher, transfer, epochs=epochs,
                  batch_size=batch_size, rng=sweep.sweep_keys(
                      [1000 + s for s in seeds]),
                  spec=StepSpec(objective, augment=augment.make_jitter(
                      jitter) if jitter else None),
                  checkpoint=Checkpointing(
                      workdir / "students" / name, run_config=run_cfg,
                      every_epochs=config.get("checkpoint_every", 5)),
                  vmapped=True, desc=name)
  jax.block_until_ready(states)
  return states.params, apply, time.perf_counter() - t0


def member_logits(apply, stacked_params, images) -> list[np.ndarray]:
  k = jax.tree.leaves(stacked_params)[0].shape[0]
  return [predict_logits(apply, sweep.member(stacked_params, i), images)
          for i in range(k)]


# ----------------------------------------------------------------------------
# The table.
# ----------------------------------------------------------------------------


def command_line() -> str:
  """How this process was launched (for results JSONs)."""
  argv = list(sys.argv)
  script = pathlib.PurePath(argv[0]) if argv else None
  if script and script.parent.parts[-2:] == ("experiments", "mnist"):
    argv[0] = f"python -m experiments.mnist.{script.stem}"
  return " ".join(argv)


def result_row(name, test_errors, seconds, **extra):
  """One row of results.json (its schema is in the module docstring)."""
  return {"name": name, "test_errors": [int(e) for e in test_errors],
          "paper_test_errors": PAPER.get(name), "seconds": round(seconds, 2),
          **extra}


# ----------------------------------------------------------------------------
# The rows: a registry of functions (context, config) -> None.
# ----------------------------------------------------------------------------


@dataclasses.dataclass
class Context:
  """What every row needs: the data, the teacher, and where results go.

  Attributes:
    config: the run's config.
    workdir: the run's directory (students' checkpoints under it).
    splits: the MNIST splits.
    teacher: the frozen teacher.
    rows: the results table so far (rows append to it).
    hashes: ``params_sha256`` of every trained net, by row name.
    save_partial: writes ``results.partial.json`` (after each row).
  """
  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  splits: data.MnistSplits
  teacher: Teacher
  rows: list
  hashes: dict
  save_partial: Callable[[], None]
  _transfer: dict = dataclasses.field(default_factory=dict)

  def transfer(self, variant: str, **kw) -> dict:
    """A transfer set with the teacher's cached logits (each made once)."""
    key = (variant, tuple(sorted(kw.items())))
    if key not in self._transfer:
      x, y = transfer.transfer_set(self.splits.train_images,
                               self.splits.train_labels, variant, **kw)
      self._transfer[key] = cache.with_teacher_logits(to_device(x, y),
                                                      self.teacher)
    return self._transfer[key]

  def student_row(self, name, *, transfer, objective, temperature, alpha,
                  epochs, opt_cfg, width=None, jitter=0, **extra):
    """Trains one row's students (3 seeds, one vmapped program); its row.

    Returns:
      The members' ``(test_logits, val_logits)``.
    """
    config, s = self.config, self.config.student
    seeds = list(config.seeds)
    ones = lambda v: [v] * len(seeds)
    dropout = student_dropout(config)  # Recorded in a row only when set.
    if jitter:  # The teacher runs online on the shifted images: no cache.
      transfer = {k: transfer[k] for k in ("image", "label")}
    params, apply, sec = train_students(
        config, name=name, width=width or s.width, transfer=transfer,
        objective=objective, seeds=seeds, temperatures=ones(temperature),
        alphas=ones(alpha), epochs=epochs, opt_cfg=opt_cfg,
        workdir=self.workdir,
        teacher=self.teacher if jitter and objective != "hard" else None,
        jitter=jitter)
    test_x, test_y = self.splits.test_images, self.splits.test_labels
    val_x, val_y = self.splits.val_images, self.splits.val_labels
    test_logits = member_logits(apply, params, test_x)
    val_logits = member_logits(apply, params, val_x)
    self.hashes[name] = [provenance.params_sha256(sweep.member(params, i))
                         for i in range(len(seeds))]
    row = result_row(
        name, [errors(l, test_y) for l in test_logits], sec,
        temperature=temperature, alpha=alpha, epochs=epochs,
        objective=objective, width=width or s.width, jitter=jitter,
        **({"dropout": list(dropout)} if any(dropout) else {}),
        val_errors=[errors(l, val_y) for l in val_logits], **extra)
    self.rows.append(row)
    print(f"{name}: {row['test_errors']} test errors ({sec:.0f}s)",
          flush=True)
    self.save_partial()
    return test_logits, val_logits


# name in config.rows -> (context, config) -> None; the order is the run's.
ROWS: dict[str, Callable] = {}


def row(name: str):
  """Registers a row (or a family of rows) under the name config.rows uses."""

  def register(fn):
    ROWS[name] = fn
    return fn

  return register


def _student(ctx, name, **kw):
  s = ctx.config.student
  kind = s.alone if kw["objective"] == "hard" else s.distill
  kw.setdefault("epochs", kind.epochs)
  kw.setdefault("opt_cfg", kind.optimizer)
  if kw["objective"] == "hard":
    kw.update(temperature=1.0, alpha=1.0)
  else:
    kw.setdefault("temperature", s.distill.temperature)
    kw.setdefault("alpha", s.distill.alpha)
  return ctx.student_row(name, transfer=ctx.transfer("all"), **kw)


@row("student_alone")
def _student_alone(ctx, config):
  _student(ctx, "student_alone", objective="hard")


@row("distilled_T20")
def _distilled(ctx, config):
  _student(ctx, "distilled_T20", objective="kd")


# Not in the paper: both rows again on ±2-pixel shifted images (the
# teacher's augmentation). The distilled student then queries the teacher
# online on the shifted images ("consistent teaching", Beyer et al. 2022),
# learning its outputs off the 50k training points; the student alone with
# the same jitter is the control that separates that from the jitter's own
# regularisation.
@row("student_alone_jitter")
def _student_alone_jitter(ctx, config):
  _student(ctx, "student_alone_jitter", objective="hard",
           jitter=config.teacher.jitter)


@row("distilled_T20_jitter")
def _distilled_jitter(ctx, config):
  _student(ctx, "distilled_T20_jitter", objective="kd",
           jitter=config.teacher.jitter)


def bias_shift_rows(ctx, *, prefix: str, variant: str, classes, grid,
                    epochs: int, before_extra: Callable, after_extra: Callable,
                    summary: Callable) -> None:
  """A row trained on a transfer set missing classes, then bias-shifted.

  ``<prefix>_before_shift`` trains distilled students on ``variant``;
  ``<prefix>_after_shift`` adds the bias shift of ``classes`` chosen on the
  validation split from ``grid`` (the test split never chooses). The two
  experiments of the paper that use it (omit the 3s; only 7s and 8s)
  differ only in what they record: ``before_extra(test_logits)`` and
  ``after_extra(shifted test logits)`` return their extra row fields.
  """
  s = ctx.config.student
  val_y, test_y = ctx.splits.val_labels, ctx.splits.test_labels
  test_logits, val_logits = ctx.student_row(
      f"{prefix}_before_shift", transfer=ctx.transfer(variant),
      objective="kd", temperature=s.distill.temperature,
      alpha=s.distill.alpha, epochs=epochs, opt_cfg=s.distill.optimizer)
  before = ctx.rows[-1]
  before.update(before_extra(test_logits))
  t0 = time.perf_counter()
  shifts = [choose_bias_shift(vl, val_y, classes, grid) for vl in val_logits]
  test_after = [shifted(tl, classes, b) for tl, b in zip(test_logits, shifts)]
  ctx.rows.append(result_row(
      f"{prefix}_after_shift", [errors(tl, test_y) for tl in test_after],
      time.perf_counter() - t0, **after_extra(test_after),
      bias_shift=shifts,
      val_errors=[errors(shifted(vl, classes, b), val_y)
                  for vl, b in zip(val_logits, shifts)],
      shift_chosen_on="validation"))
  print(summary(before, ctx.rows[-1]), flush=True)
  ctx.save_partial()


@row("omit3")
def _omit3(ctx, config):
  test_y = ctx.splits.test_labels
  on3 = lambda logits: [errors(l, test_y, on_class=3) for l in logits]
  bias_shift_rows(
      ctx, prefix="omit3", variant="no3", classes=[3],
      grid=np.arange(0.0, 10.01, 0.25), epochs=config.omit3.epochs,
      before_extra=lambda tl: {
          "errors_on_3": on3(tl), "num_test_3s": int(np.sum(test_y == 3)),
          "paper_errors_on_3": PAPER_EXTRA["omit3_before_shift"][
              "errors_on_3"]},
      after_extra=lambda tl: {
          "errors_on_3": on3(tl),
          "paper_errors_on_3": PAPER_EXTRA["omit3_after_shift"][
              "errors_on_3"],
          "paper_bias_shift": PAPER_EXTRA["omit3_after_shift"][
              "bias_shift"]},
      summary=lambda b, a: (
          f"omit3: {b['test_errors']} ({b['errors_on_3']} on 3s) -> "
          f"{a['test_errors']} ({a['errors_on_3']} on 3s) with shifts "
          f"{a['bias_shift']}"))


@row("only78")
def _only78(ctx, config):
  test_y = ctx.splits.test_labels
  n = len(test_y)
  rate = lambda logits: [errors(l, test_y) / n for l in logits]
  bias_shift_rows(
      ctx, prefix="only78", variant="only78", classes=[7, 8],
      grid=np.arange(-15.0, 0.01, 0.2), epochs=config.only78.epochs,
      before_extra=lambda tl: {
          "test_error_rate": rate(tl),
          "paper_test_error_rate": PAPER_EXTRA["only78_before_shift"][
              "test_error_rate"]},
      after_extra=lambda tl: {
          "test_error_rate": rate(tl),
          "paper_test_error_rate": PAPER_EXTRA["only78_after_shift"][
              "test_error_rate"],
          "paper_bias_shift": PAPER_EXTRA["only78_after_shift"][
              "bias_shift"]},
      summary=lambda b, a: (
          f"only78: {b['test_error_rate']} -> {a['test_error_rate']} with "
          f"shifts {a['bias_shift']}"))


@row("soft3pct")
def _soft3pct(ctx, config):
  c, s = config.soft3pct, config.student
  sub = ctx.transfer("subset", seed=c.subset_seed, fraction=c.fraction)
  n = int(sub["label"].shape[0])
  ctx.student_row("soft3pct_hard_labels", transfer=sub, objective="hard",
                  temperature=1.0, alpha=1.0, epochs=c.epochs,
                  opt_cfg=s.alone.optimizer, num_train=n)
  ctx.student_row("soft3pct_soft_targets", transfer=sub, objective="kd",
                  temperature=s.distill.temperature, alpha=c.alpha,
                  epochs=c.epochs, opt_cfg=s.distill.optimizer, num_train=n)


@row("sweep")
def _sweep(ctx, config):
  c = config.sweep
  test_x, test_y = ctx.splits.test_images, ctx.splits.test_labels
  val_x, val_y = ctx.splits.val_images, ctx.splits.val_labels
  for width in c.widths:
    grid = list(itertools.product(c.temperatures, c.seeds))
    name = f"sweep_w{width}"
    params, apply, sec = train_students(
        config, name=name, width=width, transfer=ctx.transfer("all"),
        objective="kd", seeds=[g[1] for g in grid],
        temperatures=[g[0] for g in grid], alphas=[c.alpha] * len(grid),
        epochs=c.epochs, opt_cfg=config.student.distill.optimizer,
        workdir=ctx.workdir)
    logits = member_logits(apply, params, test_x)
    val_logits = member_logits(apply, params, val_x)
    ctx.hashes[name] = {
        f"T{g[0]:g}_seed{g[1]}": provenance.params_sha256(
            sweep.member(params, i)) for i, g in enumerate(grid)}
    for temp in c.temperatures:
      idx = [i for i, g in enumerate(grid) if g[0] == temp]
      ctx.rows.append(result_row(
          f"sweep_w{width}_T{temp:g}",
          [errors(logits[i], test_y) for i in idx],
          sec / len(c.temperatures), width=width, temperature=temp,
          alpha=c.alpha, epochs=c.epochs,
          val_errors=[errors(val_logits[i], val_y) for i in idx]))
    print(f"{name}: " + ", ".join(
        f"T={t:g}: " + format(np.mean(
            [errors(logits[i], test_y) for i, g in enumerate(grid)
             if g[0] == t]), ".1f")
        for t in c.temperatures), flush=True)
    ctx.save_partial()


@row("logit_matching")
def _logit_matching(ctx, config):
  c = config.logit_matching
  ctx.student_row("logit_matching_caruana", transfer=ctx.transfer("all"),
                  objective="logit_matching", temperature=1.0, alpha=0.0,
                  epochs=c.epochs, opt_cfg=c.optimizer)
  for temp in c.temperatures:
    ctx.student_row(f"logit_matching_distill_T{temp:g}",
                    transfer=ctx.transfer("all"), objective="soft",
                    temperature=temp, alpha=0.0, epochs=c.epochs,
                    opt_cfg=config.student.distill.optimizer)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks ``config`` against configs/default.py (keys, types, ranges).

  Raises:
    kdjax.validate.ConfigError: one line per unknown key (with the closest
      valid key), wrong type or out-of-range hyperparameter; or an entry of
      ``config.rows`` that is not in :data:`ROWS`.
  """
  from experiments.mnist.configs import default  # pylint: disable=g-import-not-at-top
  validate.validate_config(config, default.get_config())
  validate.validate_choices("config.rows", config.rows, tuple(ROWS),
                            what="row")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the configured rows and writes results.json, results.md, plots.

  The config is validated (:func:`validate_config`) and recorded in
  ``<workdir>/run_config.json`` once the data has loaded (so a run that
  fails on a bad ``data_dir`` leaves no record that would refuse its
  corrected rerun) and before anything is compiled; a workdir holding a run
  of a different config raises (use a new workdir).
  Each finished row is saved at once to ``results.partial.json``, which
  ``results.json`` replaces when the run completes.
  """
  from experiments.mnist import report  # pylint: disable=g-import-not-at-top
  validate_config(config)
  workdir = pathlib.Path(workdir)
  check_run_config(workdir, config.to_dict(), write=False)
  t_start = time.perf_counter()
  splits = load_splits(config)
  check_run_config(workdir, config.to_dict())
  test_x, test_y = splits.test_images, splits.test_labels
  val_x, val_y = splits.val_images, splits.val_labels
  rows, hashes = [], {}

  env = provenance.environment()
  commit = provenance.git_commit(str(pathlib.Path(__file__).parent))

  def results_so_far() -> dict:
    return {
        "config": config.to_dict(), "git_commit": commit,
        "jax_version": env["jax_version"], "device": env["device"],
        "environment": env, "command": command_line(),
        "total_seconds": round(time.perf_counter() - t_start, 1),
        "rows": rows, "params_sha256": hashes,
    }

  def save_partial() -> None:
    # Finished rows survive an interrupted run (results.partial.json);
    # results.json is written only when every row is done.
    report.write_partial(results_so_far(), workdir)

  teacher, t_params, t_source, t_sec = get_teacher(config, splits, workdir)
  t_apply = lambda p, x, train, rng: teacher.apply_fn(p, {}, x)
  t_test = predict_logits(t_apply, t_params, test_x)
  rows.append(result_row("teacher", [errors(t_test, test_y)], t_sec,
                   source=t_source,
                   val_errors=[errors(predict_logits(t_apply, t_params, val_x),
                                      val_y)]))
  hashes["teacher"] = provenance.params_sha256(t_params)
  if config.teacher.get("save_to", ""):
    env = provenance.environment()
    save_teacher(workdir / config.teacher.save_to, t_params, {
        "architecture": "784-1200-1200-10 MLP (kdjax.models.MLP)",
        "config": config.teacher.to_dict(), "source": t_source,
        "test_errors": rows[-1]["test_errors"][0],
        "val_errors": rows[-1]["val_errors"][0], "seconds": round(t_sec, 1),
        "device": env["device"], "jax_version": env["jax_version"],
        "git_commit": provenance.git_commit(str(pathlib.Path(__file__).parent)),
        "params_sha256": hashes["teacher"],
        "command": command_line()})
  print(f"teacher: {rows[-1]['test_errors']} test errors ({t_source})",
        flush=True)
  save_partial()

  ctx = Context(config=config, workdir=workdir, splits=splits,
                teacher=teacher, rows=rows, hashes=hashes,
                save_partial=save_partial)
  for name in ROWS:  # The registry's order, for the rows the config asks.
    if name in config.rows:
      ROWS[name](ctx, config)

  results = results_so_far()
  report.write_all(results, workdir)
  return results
