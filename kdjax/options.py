"""The option types of :func:`kdjax.fit` and :func:`kdjax.make_train_step`.

Four small frozen dataclasses say what a run's settings group:

* :class:`StepSpec`: what the step computes (objective, batch fields, input
  transform, augmentation, :class:`Precision`, non-finite policy, gradient
  accumulation over micro-batches);
* :class:`Checkpointing`: where and how often the run is saved;
* :class:`Evaluation`: a host metric function and its period;
* :class:`Loop`: how an epoch runs (whole-epoch scan, jitted steps, blocks
  of host batches).

They are hashable: a :class:`StepSpec` is the key of the compiled-step cache
(a second :func:`kdjax.fit` with an equal spec does not recompile), and its
:meth:`StepSpec.record` is what ``fit.json`` records of it, so the object
that builds the step is the one a resumed run is checked against.

>>> import kdjax
>>> spec = kdjax.StepSpec(objective="kd", on_nonfinite="raise")
>>> spec.record()["objective"], spec.skip_nonfinite
('kd', True)
>>> hash(spec) == hash(kdjax.StepSpec(objective="kd", on_nonfinite="raise"))
True
"""

from __future__ import annotations

import dataclasses
import pathlib
import warnings
from typing import Any, Callable, Optional, Union

import numpy as np

from kdjax import objectives, precision as precision_lib, records
from kdjax.fields import Fields

__all__ = ["StepSpec", "Precision", "Checkpointing", "Evaluation", "Loop",
           "NONFINITE", "LOOP_FORMS", "step_spec", "callable_name"]

# What a step does with a non-finite loss or gradient: skip it (keep the old
# state, count it in state.skipped) and go on; skip it and make fit raise
# after the epoch; or apply the update anyway.
NONFINITE = ("skip", "raise", "apply")
LOOP_FORMS = ("auto", "scan", "steps")


def callable_name(fn: Optional[Callable]) -> Optional[str]:
  """A function's qualified name (a callable object's type name) or None."""
  if fn is None:
    return None
  return getattr(fn, "__qualname__", type(fn).__name__)


@dataclasses.dataclass(frozen=True)
class Precision:
  """Mixed precision of the forward passes (:mod:`kdjax.precision`).

  Attributes:
    compute_dtype: a floating dtype (``jnp.bfloat16``) for the forward
      passes, or None (float32). Params and optimizer state stay float32,
      the losses see float32 logits.
    keep_float32: param names kept in float32 (e.g. ``("logits",)``).
  """
  compute_dtype: Any = None
  keep_float32: tuple[str, ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "compute_dtype",
                       precision_lib.check_compute_dtype(self.compute_dtype))
    object.__setattr__(self, "keep_float32", tuple(self.keep_float32 or ()))

  def record(self) -> dict:
    """``fit.json``'s entries (none for float32: older records match)."""
    if self.compute_dtype is None:
      return {}
    return {"compute_dtype": str(np.dtype(self.compute_dtype)),
            "keep_float32": sorted(self.keep_float32)}


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """What the train step computes (:func:`kdjax.make_train_step`).

  Attributes:
    objective: a registered name (``"kd"``, ``"soft"``, ...), an
      :class:`kdjax.objectives.Objective` or a function (see
      :func:`kdjax.objectives.get`); stored as the resolved Objective.
    fields: which batch fields are what (:class:`kdjax.Fields`).
    input_transform: optional ``x -> x`` applied to every model input
      before augmentation, teacher and student alike (e.g.
      :func:`kdjax.preprocess.scale_pixels`).
    augment: optional ``(rng, x) -> x`` applied to the first model input
      (e.g. :func:`kdjax.paper.augment.make_jitter`); the teacher sees the
      augmented batch.
    precision: a :class:`Precision` (default float32).
    on_nonfinite: ``"skip"`` (a step whose loss or gradients are not finite
      keeps the old state and is counted in ``state.skipped``), ``"raise"``
      (skip it, and :func:`kdjax.fit` raises ``FloatingPointError`` after
      the epoch, before checkpointing it), or ``"apply"`` (apply it).
    accumulate: split each global batch into this many micro-batches and
      accumulate (:mod:`kdjax.accumulate`): the loss, its gradient and the
      metrics are still those of the whole batch, ``sum(w * loss) /
      sum(w)`` over all its real positions (the weighted sums and the
      weight sum are accumulated and divided once, never a mean of
      micro-batch means), while only one micro-batch's activations are
      live at a time. BatchNorm statistics are per micro-batch, the model
      state threaded through the micro-batches in order. The global batch
      must be a multiple of ``accumulate`` times the mesh's batch axes.
      1 (the default) is exactly the step without accumulation.
  """
  objective: Any = "kd"
  fields: Optional[Fields] = None
  input_transform: Optional[Callable] = None
  augment: Optional[Callable] = None
  precision: Optional[Precision] = None
  on_nonfinite: str = "skip"
  accumulate: int = 1

  def __post_init__(self):
    set_ = lambda k, v: object.__setattr__(self, k, v)
    set_("objective", objectives.get(self.objective))
    set_("fields", Fields() if self.fields is None else self.fields)
    if not isinstance(self.fields, Fields):
      raise TypeError(f"fields must be a kdjax.Fields, got "
                      f"{type(self.fields).__name__}.")
    set_("precision", Precision() if self.precision is None
         else self.precision)
    if not isinstance(self.precision, Precision):
      raise TypeError(f"precision must be a kdjax.Precision, got "
                      f"{type(self.precision).__name__}.")
    if self.on_nonfinite not in NONFINITE:
      raise ValueError(f"on_nonfinite must be one of {NONFINITE}, got "
                       f"{self.on_nonfinite!r}.")
    if isinstance(self.accumulate, bool) or not isinstance(
        self.accumulate, (int, np.integer)) or self.accumulate < 1:
      raise ValueError(f"StepSpec.accumulate must be an int >= 1 (the number "
                       f"of micro-batches per step), got "
                       f"{self.accumulate!r}.")
    set_("accumulate", int(self.accumulate))
    if self.accumulate > 1 and self.objective.form == "hidden":
      raise ValueError(
          f"StepSpec(accumulate={self.accumulate}) is not supported with the "
          f"hidden-state objective {self.objective.name!r} yet: use "
          "accumulate=1 (the fused loss already holds no [tokens, V] "
          "logits, so a larger batch usually fits), or its logits objective.")
    for name in ("input_transform", "augment"):
      fn = getattr(self, name)
      if fn is not None and not callable(fn):
        raise TypeError(f"{name} must be a function or None, got "
                        f"{type(fn).__name__}.")

  @property
  def skip_nonfinite(self) -> bool:
    """Whether a non-finite update is kept out of the state."""
    return self.on_nonfinite != "apply"

  def record(self) -> dict:
    """What ``fit.json`` records of the step.

    Settings added after the first records were written (fields, input
    transform, precision, accumulate) appear only when they differ from
    their defaults, so that the records of earlier runs still match and
    resume. ``"skip"`` and ``"raise"`` compute the same states and are
    recorded alike. An objective that is not a kdjax built-in is recorded
    with a hash of its code (:func:`kdjax.objectives.record`).
    """
    record = {**objectives.record(self.objective),
              "augment": records.describe(self.augment),
              "skip_nonfinite": self.skip_nonfinite}
    if self.fields != Fields():
      record["fields"] = self.fields.describe()
    if self.input_transform is not None:
      record["input_transform"] = callable_name(self.input_transform)
    record.update(self.precision.record())
    if self.accumulate != 1:  # A resumed run must accumulate alike.
      record["accumulate"] = self.accumulate
    return record


@dataclasses.dataclass(frozen=True)
class Checkpointing:
  """Where and how often :func:`kdjax.fit` saves a run.

  Attributes:
    workdir: the run's directory (checkpoints, ``metrics.jsonl``,
      ``fit.json``, ``run_config.json``).
    every_epochs: checkpoint period in epochs (the last epoch is always
      saved).
    every_steps: on host data, also checkpoint within an epoch at the first
      block boundary past every multiple of this many steps (0: never).
    run_config: a JSON-able description of what ``fit`` cannot see (the
      optimizer's settings, the data's origin), checked against the
      workdir's ``run_config.json``. Not part of the hash.
  """
  workdir: Union[str, pathlib.Path]
  every_epochs: int = 1
  every_steps: int = 0
  run_config: Optional[dict] = dataclasses.field(default=None, hash=False)

  def __post_init__(self):
    object.__setattr__(self, "workdir", pathlib.Path(self.workdir))
    for name, low in (("every_epochs", 1), ("every_steps", 0)):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Checkpointing.{name} must be an int >= {low}, got "
                         f"{value!r}.")


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """Host metrics of the state, added to an epoch's record.

  Attributes:
    fn: ``state -> dict`` of host metrics (e.g. validation errors).
    every: period in epochs (0: only after the last epoch).
  """
  fn: Callable
  every: int = 0

  def __post_init__(self):
    if not callable(self.fn):
      raise TypeError(f"Evaluation.fn must be a function state -> dict, got "
                      f"{type(self.fn).__name__}.")
    if isinstance(self.every, bool) or not isinstance(self.every, int) or (
        self.every < 0):
      raise ValueError(f"Evaluation.every must be an int >= 0, got "
                       f"{self.every!r}.")


@dataclasses.dataclass(frozen=True)
class Loop:
  """How :func:`kdjax.fit` runs an epoch (:mod:`kdjax.loop`).

  Attributes:
    form: ``"scan"`` (device data: the whole epoch in one ``lax.scan``;
      host data: jitted blocks of ``block_steps`` steps), ``"steps"`` (one
      jitted step per batch) or ``"auto"`` (:func:`kdjax.fitting.choose_loop`).
      Both compute the same thing to float32 rounding.
    block_steps: steps per jitted block on the host path (the block's
      batches are stacked into one transfer).
    steps_per_epoch: batches per epoch of a host source whose length is
      unknown (a grain ``IterDataset``); otherwise taken from the source.
  """
  form: str = "auto"
  block_steps: int = 16
  steps_per_epoch: Optional[int] = None

  def __post_init__(self):
    if self.form not in LOOP_FORMS:
      raise ValueError(f"loop must be one of {LOOP_FORMS}, got "
                       f"{self.form!r}.")
    if int(self.block_steps) < 1:
      raise ValueError(f"Loop.block_steps must be >= 1, got "
                       f"{self.block_steps}.")


# The keyword arguments of make_train_step and fit before StepSpec existed.
_LEGACY_STEP = {"augment_fn": "augment", "compute_dtype": None,
                "keep_float32": None, "skip_nonfinite": None}


def step_spec(spec=None, *, stacklevel: int = 3, **kwargs) -> StepSpec:
  """A :class:`StepSpec` from a spec, an objective, and/or keyword options.

  ``kwargs`` are StepSpec's fields or the older keyword forms
  (``augment_fn``, ``compute_dtype``, ``keep_float32``, ``skip_nonfinite``,
  deprecated: they warn once per call site). ``spec`` may be a StepSpec
  (then no keyword may be given), an objective, or None (``"kd"``).
  """
  if isinstance(spec, StepSpec):
    if kwargs:
      raise TypeError(f"pass either a StepSpec or keyword options "
                      f"({sorted(kwargs)}), not both.")
    return spec
  legacy = sorted(k for k in kwargs if k in _LEGACY_STEP)
  if legacy:
    warnings.warn(f"{legacy} are deprecated: pass kdjax.StepSpec(augment=, "
                  "precision=kdjax.Precision(...), on_nonfinite=...).",
                  DeprecationWarning, stacklevel=stacklevel)
  if "augment_fn" in kwargs:
    kwargs["augment"] = kwargs.pop("augment_fn")
  dtype = kwargs.pop("compute_dtype", None)
  keep = kwargs.pop("keep_float32", None)
  if dtype is not None or keep:
    kwargs["precision"] = Precision(dtype, tuple(keep or ()))
  if not kwargs.pop("skip_nonfinite", True):
    if kwargs.get("on_nonfinite", "skip") == "raise":
      raise ValueError("on_nonfinite='raise' keeps the non-finite update out "
                       "of the state; it cannot be combined with "
                       "skip_nonfinite=False.")
    kwargs["on_nonfinite"] = "apply"
  unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(
      StepSpec)})
  if unknown:
    raise TypeError(f"unknown step option(s) {unknown}; StepSpec takes "
                    f"{[f.name for f in dataclasses.fields(StepSpec)]}.")
  if spec is not None:
    kwargs["objective"] = spec
  return StepSpec(**kwargs)
