"""Fail-fast checks: one clear error line, raised before anything compiles.

The one home of kdjax's input checks: configs, batch sizes, batches
against their :class:`kdjax.Fields`, the models against the data, host
batches as they arrive, keys and workdirs.

Everything here runs on the host with plain Python and NumPy (shapes come
from ``jax.eval_shape``, which traces but never compiles), so a mistake in
a config file, a batch size or the data costs a second, not a compilation
followed by a cryptic error or, worse, a silently wrong run.

* :func:`validate_config`: unknown keys (with the closest valid key), wrong
  types and out-of-range hyperparameters in an ``ml_collections`` config,
  compared against the reference (default) config.
* :func:`validate_batch`: the batch size must split evenly over the devices
  of a data-parallel step.
* :func:`validate_models`: teacher and student must predict the same number
  of classes.
* :func:`validate_labels`: labels must be integer class indices in
  ``[0, num_classes)``.

* :func:`check_batch`, :func:`check_weights`: a batch against the step's
  :class:`kdjax.Fields` (shapes only; also run inside the step, at trace
  time).
* :func:`check_inputs`: :func:`kdjax.fit`'s state, teacher and data
  against each other (abstractly, nothing compiles); :class:`BatchChecker`:
  every host batch against the first.
* :func:`check_key`, :func:`check_workdir`: ``rng=0`` and a workdir that is
  a file, as one line naming the fix.

:func:`kdjax.fit` runs the checks on its inputs; the MNIST pipeline runs
:func:`validate_config` on its config.
"""

from __future__ import annotations

import difflib
import math
import numbers
import reprlib
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional, Sequence

import jax
import numpy as np

from kdjax import student as student_lib

if TYPE_CHECKING:
  from kdjax.fields import Fields

__all__ = ["ConfigError", "ConfigTypeError", "WorkdirMismatchError",
           "validate_config",
           "validate_choices", "validate_batch", "validate_models",
           "validate_labels", "BatchError", "leading_size", "check_batch",
           "check_weights", "check_inputs", "BatchChecker", "check_key",
           "check_workdir", "check_accumulate"]

_repr = reprlib.Repr()
_repr.maxstring = 40
_repr.maxlist = 6
_repr.maxtuple = 6


class ConfigError(ValueError):
  """An invalid configuration (unknown key, wrong type or bad value)."""


class ConfigTypeError(ConfigError, TypeError):
  """A config value of the wrong type."""


class WorkdirMismatchError(ValueError):
  """The workdir holds a run of another configuration.

  Raised by :func:`kdjax.fitting.check_run_config` (so by :func:`kdjax.fit`
  and the MNIST pipeline) instead of mixing two runs in one workdir.
  """


# ----------------------------------------------------------------------------
# Temperature and alpha.
# ----------------------------------------------------------------------------


def concrete(x) -> Optional[np.ndarray]:
  """``x`` as a NumPy array, or None for a tracer (its value is unknown)."""
  try:
    return np.asarray(x)
  except (jax.errors.TracerArrayConversionError,
          jax.errors.ConcretizationTypeError):
    return None


def check_temperature(temperature) -> None:
  """Rejects a non-positive temperature that is known at trace time.

  Python and NumPy numbers and concrete (non-traced) JAX arrays are
  checked; a traced temperature (a ``TrainState``'s inside ``jit``) cannot
  be, and is the caller's to validate (``TrainState.create`` does).

  The one check of a temperature in kdjax: the losses, the train state and
  the sweeps all call it.
  """
  if isinstance(temperature, bool):
    raise TypeError(
        f"temperature must be a positive number, got {temperature!r}.")
  t = concrete(temperature)
  if t is not None and t.dtype.kind not in "iuf":
    raise TypeError(
        f"temperature must be a positive number, got {temperature!r}.")
  if t is not None and not np.all(t > 0):  # also catches NaN
    raise ValueError(
        f"temperature must be > 0, got {temperature!r}. The paper uses "
        "T in [1, 20]; T=1 is the ordinary softmax.")


def check_alpha(alpha) -> None:
  """Rejects an alpha outside [0, 1] that is known at trace time."""
  a = concrete(alpha)
  if a is not None and a.dtype.kind not in "iuf":
    raise TypeError(f"alpha must be a number in [0, 1], got {alpha!r}.")
  if a is not None and not np.all((a >= 0.0) & (a <= 1.0)):
    raise ValueError(
        f"alpha must lie in [0, 1], got {alpha!r}. alpha weights the "
        "hard-label "
        "cross-entropy; (1 - alpha) weights the T^2-scaled distillation term.")


# ----------------------------------------------------------------------------
# Configs.
# ----------------------------------------------------------------------------


def _is_mapping(x) -> bool:
  # ml_collections.ConfigDict is not a collections.abc.Mapping.
  return isinstance(x, Mapping) or (hasattr(x, "keys") and
                                    hasattr(x, "__getitem__"))


def _is_real(x) -> bool:
  return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_int(x) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _expected(ref) -> tuple[str, Any]:
  """(description, predicate) of the values a reference value admits."""
  if isinstance(ref, bool):
    return "a bool", lambda v: isinstance(v, bool)
  if _is_int(ref):
    return "an int", _is_int
  if _is_real(ref):
    return "a float (an int is accepted)", _is_real
  if isinstance(ref, str):
    return "a string", lambda v: isinstance(v, str)
  if isinstance(ref, (list, tuple)):
    return "a list", lambda v: isinstance(v, (list, tuple))
  if _is_mapping(ref):
    return "a ConfigDict (a group of keys)", _is_mapping
  ref_type = type(ref)
  return f"a {ref_type.__name__}", lambda v: isinstance(v, ref_type)


def _element_reference(ref: Sequence):
  """The reference of a list's elements: float if any number is a float."""
  if not ref:
    return None
  if all(_is_real(r) for r in ref) and any(not _is_int(r) for r in ref):
    return 1.0
  return ref[0]


def _dotted_keys(reference, prefix: str = "") -> list[str]:
  keys = []
  for k in reference.keys():
    path = f"{prefix}{k}"
    keys.append(path)
    if _is_mapping(reference[k]):
      keys.extend(_dotted_keys(reference[k], path + "."))
  return keys


def _unknown_key(path: str, key: str, prefix: str, siblings,
                 all_keys: list[str]) -> str:
  close = difflib.get_close_matches(key, [str(s) for s in siblings], n=1,
                                    cutoff=0.6)
  if close:
    return (f"unknown config key '{path}'; did you mean "
            f"'{prefix}{close[0]}'?")
  close = difflib.get_close_matches(path, all_keys, n=1, cutoff=0.6)
  if close:
    return f"unknown config key '{path}'; did you mean '{close[0]}'?"
  where = f"under '{prefix[:-1]}'" if prefix else "at the top level"
  return (f"unknown config key '{path}'; valid keys {where}: "
          f"{', '.join(sorted(str(s) for s in siblings))}.")


# Value rules by the key's last component: (check, requirement, hint).
def _positive(v) -> bool:
  return math.isfinite(v) and v > 0


def _unit(v) -> bool:
  return 0.0 <= v <= 1.0


_T_HINT = " (T=1 is the ordinary softmax; the paper uses T in [1, 20])"
_A_HINT = (" (alpha weights the hard-label loss, 1 - alpha the T^2-scaled "
           "distillation term)")
_VALUE_RULES = {
    "temperature": (_positive, "must be a finite number > 0", _T_HINT),
    "temperatures": (_positive, "must be a finite number > 0", _T_HINT),
    "alpha": (_unit, "must lie in [0, 1]", _A_HINT),
    "alphas": (_unit, "must lie in [0, 1]", _A_HINT),
    "input_dropout": (lambda v: 0.0 <= v < 1.0, "must lie in [0, 1)",
                      " (the fraction of units dropped in training)"),
    "hidden_dropout": (lambda v: 0.0 <= v < 1.0, "must lie in [0, 1)",
                       " (the fraction of units dropped in training)"),
    "batch_size": (lambda v: v > 0, "must be > 0", ""),
    "epochs": (lambda v: v >= 0, "must be >= 0", ""),
}


def _check_value(path: str, key: str, value, errors: list) -> None:
  rule = _VALUE_RULES.get(key)
  if rule is None:
    return
  ok, requirement, hint = rule
  items = (list(enumerate(value)) if isinstance(value, (list, tuple))
           else [(None, value)])
  for i, v in items:
    if _is_real(v) and not ok(v):
      where = path if i is None else f"{path}[{i}]"
      errors.append(("value", f"config key '{where}' {requirement}, got "
                               f"{v!r}{hint}."))


def _walk(config, reference, prefix: str, all_keys: list[str],
          errors: list) -> None:
  for key in config.keys():
    path = f"{prefix}{key}"
    value = config[key]
    if key not in reference:
      errors.append(("key", _unknown_key(path, str(key), prefix,
                                         reference.keys(), all_keys)))
      continue
    ref = reference[key]
    if ref is None:
      continue
    desc, ok = _expected(ref)
    if not ok(value):
      errors.append(("type", f"config key '{path}' must be {desc}, got "
                             f"{type(value).__name__} {_repr.repr(value)}."))
      continue
    if _is_mapping(ref):
      _walk(value, ref, path + ".", all_keys, errors)
      continue
    if isinstance(ref, (list, tuple)):
      elem = _element_reference(ref)
      if elem is not None:
        e_desc, e_ok = _expected(elem)
        bad = [(i, v) for i, v in enumerate(value) if not e_ok(v)]
        if bad:
          i, v = bad[0]
          errors.append(("type", f"config key '{path}[{i}]' must be "
                                 f"{e_desc}, got {type(v).__name__} "
                                 f"{_repr.repr(v)}."))
          continue
    _check_value(path, str(key), value, errors)


def validate_config(config, reference) -> None:
  """Checks ``config`` against ``reference`` (e.g. the default config).

  * every key of ``config`` must exist in ``reference`` (at the same place);
    an unknown key is reported with its full dotted name and the closest
    valid key;
  * every value must have the reference value's type (an int is accepted
    where a float is expected; lists and tuples are interchangeable and
    their elements are checked against the reference's elements); a
    reference value of None admits anything;
  * hyperparameters are checked by name wherever they appear:
    ``temperature``/``temperatures`` > 0, ``alpha``/``alphas`` in [0, 1],
    ``input_dropout``/``hidden_dropout`` in [0, 1), ``batch_size`` > 0,
    ``epochs`` >= 0.

  Keys of ``reference`` missing from ``config`` are allowed (code reads
  optional keys with ``config.get``).

  Args:
    config: an ``ml_collections.ConfigDict`` (or a nested dict).
    reference: the config that defines the valid keys and types.

  Raises:
    ConfigError: one line per problem found (a ``ConfigTypeError``, also a
      ``TypeError``, when the problems are all wrong types).
  """
  errors: list[tuple[str, str]] = []  # (kind, message)
  _walk(config, reference, "", _dotted_keys(reference), errors)
  if errors:
    only_types = all(kind == "type" for kind, _ in errors)
    cls = ConfigTypeError if only_types else ConfigError
    raise cls("\n".join(msg for _, msg in errors))


def validate_choices(name: str, values, allowed, *, what: str) -> None:
  """Checks that every entry of the config list ``name`` is in ``allowed``.

  Raises:
    ConfigError: one line naming every unknown entry (with the closest
      allowed one, as for unknown keys) and listing the allowed values.
  """
  allowed = [str(a) for a in allowed]
  unknown = [v for v in values if v not in allowed]
  if not unknown:
    return
  hints = []
  for v in unknown:
    close = difflib.get_close_matches(str(v), allowed, n=1, cutoff=0.6)
    hints.append(f"{v!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
  raise ConfigError(f"{name}: unknown {what}(s) {', '.join(hints)}; valid "
                    f"{what}s are {', '.join(allowed)}.")


# ----------------------------------------------------------------------------
# Batches, models, labels.
# ----------------------------------------------------------------------------


def validate_batch(batch_size: int, num_devices: int) -> None:
  """The global batch must split evenly over a data-parallel step's devices.

  Raises:
    ValueError: if ``batch_size`` is not a positive multiple of
      ``num_devices``.
  """
  if not _is_int(num_devices) or num_devices < 1:
    raise ValueError(f"the device count must be a positive int, got "
                     f"{num_devices!r}.")
  if not _is_int(batch_size) or batch_size < 1:
    raise ValueError(f"batch size must be a positive int, got "
                     f"{batch_size!r}.")
  if batch_size % num_devices:
    up = -(-batch_size // num_devices) * num_devices
    raise ValueError(
        f"batch size {batch_size} is not divisible by the device count "
        f"{num_devices}; use a multiple of {num_devices} (e.g. {up}).")


def check_accumulate(batch_size: int, accumulate: int, devices: int = 1,
                     axes: str = "", what: str = "batch_size") -> None:
  """A batch must split into ``accumulate`` micro-batches on every device.

  Each of ``devices`` devices (the mesh's batch axes, ``axes`` their
  description, e.g. ``"data=8"``) holds ``batch_size / devices`` rows and
  ``1 / accumulate`` of them go to each micro-batch
  (:mod:`kdjax.accumulate`), so ``batch_size`` must be a multiple of
  ``accumulate * devices``.

  Raises:
    ValueError: naming the sizes and the nearest batch sizes that work.
  """
  if accumulate == 1:
    return
  n = accumulate * devices
  if batch_size % n:
    lo, hi = (batch_size // n) * n, (batch_size // n + 1) * n
    over = (f" x the mesh's batch axes ({axes or devices} = {devices} "
            f"devices)" if devices > 1 else "")
    sizes = " or ".join(str(s) for s in (lo, hi) if s > 0)
    raise ValueError(
        f"{what}={batch_size} cannot be split into accumulate={accumulate} "
        f"equal micro-batches on every device: it must be a multiple of "
        f"accumulate{over} = {n}; use {sizes}, or another "
        "StepSpec(accumulate=).")


def validate_models(teacher_logits_shape: Optional[Iterable[int]],
                    student_logits_shape: Iterable[int]) -> None:
  """Teacher and student must predict the same number of classes.

  Args:
    teacher_logits_shape: the teacher's (or the cached teacher logits')
      shape ``[..., C_t]``; None skips the check (no teacher).
    student_logits_shape: the student's logits shape ``[..., C_s]``.

  Raises:
    ValueError: if ``C_t != C_s`` (or a shape has no class axis).
  """
  s = tuple(student_logits_shape)
  if not s:
    raise ValueError("the student's logits must have a class axis, got a "
                     "scalar.")
  if teacher_logits_shape is None:
    return
  t = tuple(teacher_logits_shape)
  if not t:
    raise ValueError("the teacher's logits must have a class axis, got a "
                     "scalar.")
  if t[-1] != s[-1]:
    hint = (f" If the teacher's last {t[-1] - s[-1]} columns are vocabulary "
            f"padding, drop them: kdjax.vocab.aligned_teacher(teacher, "
            f"{s[-1]}, padding={t[-1] - s[-1]})." if t[-1] > s[-1] else "")
    raise ValueError(
        f"teacher and student predict different numbers of classes: the "
        f"teacher has {t[-1]} classes (logits shape {t}), the student "
        f"{s[-1]} (logits shape {s}); distillation needs the same classes."
        f"{hint}")


def validate_labels(labels, num_classes: int) -> None:
  """Labels must be integer class indices in ``[0, num_classes)``.

  Runs on the host (NumPy), before the data goes to the device.

  Raises:
    TypeError: if the labels are not integers.
    ValueError: naming the first offending label, its index and the valid
      range.
  """
  labels = np.asarray(labels)
  if not np.issubdtype(labels.dtype, np.integer):
    raise TypeError(f"labels must be integer class indices, got dtype "
                    f"{labels.dtype}.")
  if labels.size == 0:
    return
  lo, hi = labels.min(), labels.max()
  if lo < 0 or hi >= num_classes:
    flat = labels.reshape(-1)
    bad = np.flatnonzero((flat < 0) | (flat >= num_classes))
    i = int(bad[0])
    raise ValueError(
        f"label {int(flat[i])} (at index {i}) is out of range: labels must "
        f"lie in [0, {num_classes - 1}] for {num_classes} classes; "
        f"{bad.size} label(s) out of range (min {int(lo)}, max {int(hi)}).")


# ----------------------------------------------------------------------------
# Batches (the step's batch contract, kdjax.fields.Fields).
# ----------------------------------------------------------------------------


class BatchError(ValueError):
  """A batch that does not match the step's :class:`Fields`."""


def leading_size(batch: Mapping, *, what: str = "batch") -> int:
  """The common leading axis of every leaf of ``batch``.

  Raises:
    BatchError: a leaf is a scalar, or the leaves' leading axes differ
      (every top-level field's shapes are named).
  """
  sizes = {}
  for name, value in batch.items():
    for path, leaf in jax.tree_util.tree_flatten_with_path(value)[0]:
      key = name + jax.tree_util.keystr(path)
      if not np.shape(leaf):
        raise BatchError(
            f"{what} field {key!r} is a scalar; every leaf of a {what} needs "
            "a leading example axis.")
      sizes[key] = np.shape(leaf)
  if not sizes:
    raise BatchError(f"the {what} has no arrays.")
  leading = {s[0] for s in sizes.values()}
  if len(leading) > 1:
    shapes = ", ".join(f"{k}: {'x'.join(map(str, s))}"
                       for k, s in sizes.items())
    raise BatchError(
        f"the {what}'s leaves must share their leading (example) axis, got "
        f"{shapes}. Give every field one row per example.")
  return int(leading.pop())


def check_batch(batch, fields: Fields, *, needs_labels: bool = False,
                what: str = "batch") -> int:
  """Checks ``batch`` against ``fields`` (shapes only); returns its size.

  Raises:
    BatchError: ``batch`` is not a dict, its leaves' leading axes differ,
      a configured field is missing (the fields present are named), a
      field is not one the step reads (with the :class:`Fields` argument
      that would use it), or ``needs_labels`` and ``fields.labels`` is None.
  """
  if not isinstance(batch, Mapping):
    raise BatchError(
        f"a {what} must be a dict of arrays (e.g. {{'image': ..., "
        f"'label': ...}}), got {type(batch).__name__}.")
  present = sorted(map(str, batch))
  required = [*fields.input_names]
  if fields.teacher_logits not in batch:
    required += [n for n in fields.teacher_input_names if n not in required]
  if fields.labels is not None:
    required.append(fields.labels)
  if fields.weights is not None:
    required.append(fields.weights)
  missing = [n for n in required if n not in batch]
  if missing:
    hint = ""
    if missing == [fields.labels] and not needs_labels:
      hint = (" This objective reads no labels: pass "
              "fields=kdjax.Fields(labels=None) for an unlabelled batch.")
    raise BatchError(
        f"the {what} has no field {', '.join(repr(m) for m in missing)} "
        f"(fields present: {', '.join(present) or 'none'}).{hint} Name the "
        "fields with kdjax.Fields(inputs=..., labels=..., weights=...).")
  if needs_labels and fields.labels is None:
    raise BatchError(
        "this objective needs labels, but Fields(labels=None) says the "
        "batch has none.")
  known = fields.known()
  unknown = [k for k in present if k not in known]
  if unknown:
    raise BatchError(_unknown_message(unknown, known, what))
  return leading_size(batch, what=what)


def _unknown_message(unknown, known, what) -> str:
  parts = []
  for k in unknown:
    close = difflib.get_close_matches(k, known, n=1, cutoff=0.6)
    parts.append(repr(k) + (f" (did you mean {close[0]!r}?)" if close else ""))
  return (
      f"the {what} has field(s) {', '.join(parts)} that the step does not "
      f"read (it reads: {', '.join(known)}); a field is never silently "
      "ignored. Use it (kdjax.Fields(weights='mask') for a padding mask, "
      "labels=..., inputs=(...) for more model inputs), declare it for a "
      "custom objective (Fields(extra=('name',))), or drop it.")


def check_weights(weights_shape, logits_shape, name: str) -> None:
  """Weights must have the logits' shape without the class axis.

  Raises:
    BatchError: naming both shapes.
  """
  want = tuple(logits_shape)[:-1]
  if tuple(weights_shape) != want:
    raise BatchError(
        f"weights field {name!r} has shape {tuple(weights_shape)}, but the "
        f"logits have shape {tuple(logits_shape)}: weights need shape {want} "
        "(one per example, or per position for sequences; 0 for padding).")


def _describe(spec) -> str:
  return ", ".join(f"{k}: {v}" for k, v in sorted(spec.items()))


class BatchChecker:
  """Checks every host batch against the first one (fields, shapes, labels).

  Args:
    first: the first batch (fixes the fields, shapes and dtypes).
    fields: the step's :class:`kdjax.fields.Fields`.
    num_classes: the student's number of classes (for the label range).
  """

  def __init__(self, first, fields, num_classes: Optional[int],
               needs_labels: bool = False):
    check_batch(first, fields, needs_labels=needs_labels)
    self.fields = fields
    self.num_classes = num_classes
    self.spec = jax.tree.map(lambda x: (np.shape(x), np.asarray(x).dtype),
                             dict(first))

  def __call__(self, batch, epoch: int, index: int) -> dict:
    where = f"batch {index + 1} of epoch {epoch + 1}"
    if not isinstance(batch, Mapping):
      raise BatchError(f"{where} is a {type(batch).__name__}, not a dict of "
                       "arrays.")
    batch = {k: np.asarray(v) if not isinstance(v, Mapping) else v
             for k, v in batch.items()}
    spec = jax.tree.map(lambda x: (np.shape(x), np.asarray(x).dtype), batch)
    if spec != self.spec:
      raise BatchError(
          f"{where} has fields/shapes {_describe(spec)}, the first batch "
          f"had {_describe(self.spec)}; every batch needs the same (drop "
          "or pad the last, short batch).")
    f = self.fields
    if f.labels is not None and self.num_classes is not None:
      labels = np.asarray(batch[f.labels])
      if f.weights is not None:
        labels = labels[np.asarray(batch[f.weights]) > 0]
      try:
        validate_labels(labels, self.num_classes)
      except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return batch


# ----------------------------------------------------------------------------
# fit's inputs: the models against the data (abstractly, nothing compiles).
# ----------------------------------------------------------------------------


def example_specs(data) -> Any:
  """Shape structs of one example of ``data`` (a batch axis of 1)."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(
      (1,) + tuple(np.shape(a)[1:]), np.asarray(a).dtype
      if not hasattr(a, "dtype") else a.dtype), data)


def member_specs(tree, vmapped: bool) -> Any:
  """Shape structs of one sweep member's leaves (all of them if not vmapped)."""
  cut = 1 if vmapped else 0
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[cut:], a.dtype),
                      tree)


def check_inputs(state, teacher, data, spec, *,
                 vmapped: bool = False) -> tuple[int, Optional[int]]:
  """Host-side checks of :func:`kdjax.fit`'s inputs; nothing is compiled.

  The student's (and teacher's) logits shapes come from ``jax.eval_shape``
  on one example, which traces the models abstractly without compiling.

  Args:
    state: the :class:`kdjax.TrainState` (a stacked one if ``vmapped``).
    teacher: the :class:`kdjax.Teacher` or None.
    data: a dict of arrays with a shared leading axis (device data, or the
      first host batch).
    spec: the run's :class:`kdjax.StepSpec`.
    vmapped: ``state`` is a stacked sweep.

  Returns:
    ``(num_examples, num_classes)``: the data's leading axis and the
    student's classes (None for a state without a student).

  Raises:
    kdjax.fields.BatchError: the data does not match ``spec.fields``.
    ValueError: teacher and student predict different numbers of classes,
      a label (of positive weight) lies outside ``[0, num_classes)``, the
      student was built for inputs of another shape, or a stateful student
      came without its model state.
    TypeError: the labels are not integers.
  """
  fields, obj = spec.fields, spec.objective
  num_examples = check_batch(data, fields, needs_labels=obj.needs_labels,
                             what="data")
  apply_fn = getattr(state, "apply_fn", None)
  params = getattr(state, "params", None)
  if apply_fn is None or params is None:
    return num_examples, None
  one = example_specs(data)
  inputs = lambda names, b: student_lib.model_inputs(
      b, names, input_transform=spec.input_transform, augment=spec.augment)
  student = student_lib.abstract_student_logits(
      apply_fn, member_specs(params, vmapped),
      member_specs(getattr(state, "model_state", {}), vmapped),
      lambda b: inputs(fields.input_names, b), one)
  if fields.weights is not None:
    check_weights(np.shape(data[fields.weights]),
                  (num_examples,) + tuple(student[1:]), fields.weights)
  teacher_shape = None
  if obj.needs_teacher:
    if fields.teacher_logits in data:
      teacher_shape = (1,) + tuple(np.shape(data[fields.teacher_logits])[1:])
    elif teacher is not None:
      teacher_shape = jax.eval_shape(
          lambda t, b: t(*inputs(fields.teacher_input_names, b)),
          teacher, one).shape
  validate_models(teacher_shape, student)
  _check_topk_indices(data, fields, obj, student[-1])
  if fields.labels is not None:
    labels = np.asarray(data[fields.labels])
    if fields.weights is not None:
      labels = labels[np.asarray(data[fields.weights]) > 0]
    validate_labels(labels, student[-1])
  return num_examples, student[-1]


def _check_topk_indices(data, fields, obj, num_classes: int) -> None:
  """The ``"topk"`` objective's cached indices are student classes.

  Checked on the host (positions of positive weight only), so that a cache
  of a padded teacher vocabulary made without dropping the padding
  (:mod:`kdjax.vocab`) is refused before anything compiles.
  """
  if getattr(obj, "name", None) != "topk" or "topk_indices" not in data:
    return
  from kdjax.losses import topk  # pylint: disable=g-import-not-at-top
  idx = np.asarray(data["topk_indices"])
  if fields.weights is not None:
    idx = idx[np.asarray(data[fields.weights]) > 0]
  topk.check_indices(idx, num_classes)


def check_key(rng, *, vmapped: bool = False, what: str = "rng") -> None:
  """``rng`` must be a JAX PRNG key (one per member when ``vmapped``).

  Raises:
    TypeError: an int (``rng=0``) or another non-key, naming the fix.
  """
  dtype = getattr(rng, "dtype", None)
  typed = dtype is not None and jax.dtypes.issubdtype(
      dtype, jax.dtypes.prng_key)
  raw = (dtype == np.uint32 and np.ndim(rng) >= 1
         and np.shape(rng)[-1] in (2, 4))
  rank = np.ndim(rng) - (0 if typed else 1)
  if (typed or raw) and rank == (1 if vmapped else 0):
    return
  want = ("a stacked key per member (kdjax.sweep.sweep_keys(seeds))"
          if vmapped else "a JAX key such as jax.random.key(0)")
  got = (f"{type(rng).__name__} {rng!r}" if np.ndim(rng) == 0 and not typed
         else f"{type(rng).__name__} of shape {np.shape(rng)}")
  raise TypeError(f"{what} must be {want}, got {got}: pass "
                  f"{what}=jax.random.key(seed).")


def check_workdir(workdir) -> None:
  """A workdir must be a directory (or not exist yet).

  Raises:
    ValueError: ``workdir`` or one of its parents is a file.
  """
  import pathlib  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(workdir)
  for p in (path, *path.parents):
    if p.exists() and not p.is_dir():
      what = "is" if p == path else f"is inside {p}, which is"
      raise ValueError(f"workdir={str(path)!r} {what} a file, not a "
                       "directory: pass workdir= a directory path (a new "
                       "one starts a run).")
