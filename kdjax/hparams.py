r"""Hyperparameters: the named arrays an objective reads, carried by the state.

:class:`kdjax.step.TrainState` holds them as ``hparams``, a dict of float32
arrays (scalars; a ``[K]`` vector per name in a stacked sweep), and their
schedules as ``schedules``, static ``(name, fn)`` pairs where ``fn`` maps
the int32 step to the value. The objective declares the names it reads
(:mod:`kdjax.objectives`) and the step passes exactly those. Every value
is logged in the step's metrics under its name, and because they are
arrays of the state, a ``jax.vmap`` over stacked states sweeps them
(:mod:`kdjax.sweep`).

Values are checked where they are known (at :meth:`TrainState.create`, a
schedule at step 0, and in :func:`kdjax.sweep.create_sweep`):

================  =====================================================
``temperature``   ``T > 0``
``alpha``         in ``[0, 1]`` (the weight of the hard labels)
``beta``          in ``[0, 1]`` (the teacher's weight in the JSD mixture)
any other name    finite
================  =====================================================

This module also identifies what a workdir's ``fit.json`` records: a
schedule by its values at :data:`SCHEDULE_STEPS` (:func:`schedule_record`),
a user's function by a hash of its code (:func:`fingerprint`), and it
reads the records and checkpoints that older kdjax versions wrote, whose
state held ``temperature`` and ``alpha`` as fields of their own
(:func:`upgrade_fit_record`, :func:`legacy_layout`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import keyword
import sys
import sysconfig
import types
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import validate
from kdjax.records import recorded_module

__all__ = ["check_name", "check_value", "build", "current",
           "schedule_record", "fingerprint", "mismatch_hint",
           "upgrade_fit_record", "legacy_layout", "SCHEDULE_STEPS",
           "RESERVED"]

# The steps at which fit.json records a schedule's values.
SCHEDULE_STEPS = (0, 1, 2, 10, 100, 1_000, 10_000, 100_000)
# Names the step's metrics use for other things.
RESERVED = frozenset({
    "loss", "hard_loss", "soft_loss", "accuracy", "agreement", "grad_norm",
    "finite", "skipped", "first_nonfinite_step", "nonfinite_metrics",
    "epoch", "step", "epoch_seconds", "steps_per_s"})
# Defaults of TrainState.create: the paper's hyperparameters are always in
# the state (T = 1: the plain softmax; alpha = 0: no hard labels).
DEFAULTS = {"temperature": 1.0, "alpha": 0.0}
Schedule = Callable[[jax.Array], jax.Array]


def _check_unit(name: str, hint: str):
  def check(value) -> None:
    v = validate.concrete(value)
    if v is not None and (isinstance(value, bool) or v.dtype.kind not in "iuf"):
      raise TypeError(f"{name} must be a number in [0, 1], got {value!r}.")
    if v is not None and not np.all((v >= 0.0) & (v <= 1.0)):
      raise ValueError(f"{name} must lie in [0, 1], got {value!r}. {hint}")
  return check


def _check_finite(name: str, value) -> None:
  v = validate.concrete(value)
  if v is not None and (isinstance(value, bool) or v.dtype.kind not in "iuf"):
    raise TypeError(f"hyperparameter {name!r} must be a number, got "
                    f"{value!r}.")
  if v is not None and not np.all(np.isfinite(v)):
    raise ValueError(f"hyperparameter {name!r} must be finite, got "
                     f"{value!r}.")


_CHECKS: dict[str, Callable] = {
    "temperature": validate.check_temperature,
    "alpha": validate.check_alpha,
    "beta": _check_unit("beta", "beta is the teacher's weight in the JSD "
                        "mixture m = beta * p_teacher + (1 - beta) * "
                        "q_student."),
}


def check_name(name) -> None:
  """A hyperparameter's name: an identifier that no metric uses."""
  if not isinstance(name, str) or not name.isidentifier() or (
      keyword.iskeyword(name)):
    raise ValueError(f"a hyperparameter's name must be a Python identifier "
                     f"(it is passed to the objective as a keyword), got "
                     f"{name!r}.")
  if name in RESERVED:
    raise ValueError(f"{name!r} cannot name a hyperparameter: the step's "
                     f"metrics use it ({sorted(RESERVED)} are taken).")


def check_value(name: str, value) -> None:
  """Checks a concrete value of hyperparameter ``name`` (tracers pass)."""
  check = _CHECKS.get(name)
  if check is not None:
    check(value)
  else:
    _check_finite(name, value)


def build(temperature=None, alpha=None, hparams: Optional[Mapping] = None
          ) -> tuple[dict, tuple]:
  """``(values, schedules)`` for a new state, from ``create``'s arguments.

  ``temperature`` and ``alpha`` (numbers or schedules; None: 1.0 and 0.0)
  and the entries of ``hparams`` (name -> number, array or schedule) are
  merged; a name given both ways is an error. A schedule's entry in
  ``values`` is its value at step 0.

  >>> values, schedules = build(temperature=4.0, hparams={"beta": 0.3})
  >>> sorted(values), schedules
  (['alpha', 'beta', 'temperature'], ())
  """
  given = dict(hparams or {})
  for name, value in (("temperature", temperature), ("alpha", alpha)):
    if value is None:
      given.setdefault(name, DEFAULTS[name])
    elif name in given:
      raise ValueError(f"{name} was given twice: as {name}= and in "
                       f"hparams=; pass it once.")
    else:
      given[name] = value
  values, schedules = {}, []
  zero = jnp.zeros((), jnp.int32)
  for name in sorted(given):
    check_name(name)
    value = given[name]
    if callable(value):
      schedules.append((name, value))
      value = value(zero)
    check_value(name, value)
    values[name] = jnp.asarray(value, jnp.float32)
  return values, tuple(schedules)


def current(values: Mapping, schedules, step) -> dict:
  """The hyperparameters for the step at ``step``: schedules evaluated."""
  out = dict(values)
  for name, fn in schedules:
    out[name] = jnp.asarray(fn(step), jnp.float32)
  return out


def schedule_record(fn: Schedule, steps=SCHEDULE_STEPS) -> dict[str, float]:
  """A schedule's identity for ``fit.json``: its values at ``steps``.

  Two schedules with the same values there are taken to be the same (a
  schedule is read through its values, whatever its code or name).

  >>> schedule_record(lambda s: 2.0 + 0.0 * s, steps=(0, 10))
  {'0': 2.0, '10': 2.0}
  """
  return {str(s): float(np.asarray(fn(jnp.asarray(s, jnp.int32)),
                                   np.float32))
          for s in steps}


# ----------------------------------------------------------------------------
# A function's identity: a hash of its code.
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _library_prefixes() -> tuple[str, ...]:
  paths = sysconfig.get_paths()
  return tuple({paths[k] for k in ("stdlib", "platstdlib", "purelib",
                                   "platlib") if k in paths})


def _is_library(module_name: Optional[str]) -> bool:
  """kdjax, the standard library and installed packages (not user code)."""
  if not module_name:
    return False
  top = module_name.split(".")[0]
  if top in ("kdjax", "builtins") or top in sys.builtin_module_names:
    return True
  module = sys.modules.get(top)
  path = getattr(module, "__file__", None) or ""
  return bool(path) and path.startswith(_library_prefixes())


def fingerprint(fn: Any) -> str:
  """A hash of what a function computes, for ``fit.json`` (16 hex digits).

  User code (any module that is not kdjax, the standard library or an
  installed package) is hashed by its **bytecode**: the code objects'
  instructions, constants and names (nested functions and lambdas
  included), the defaults, the closure's values, and the module-level
  functions and constants it refers to (followed the same way). Comments,
  docstrings, blank lines and local variable names do not change it; any
  change of what the code does, of a constant or of a captured value does.
  The bytecode is also where the hash depends on the Python version: a run
  resumed under another minor version is refused (``fit.json`` records the
  version beside the hash, so the message says why).

  kdjax's and installed libraries' functions are hashed by their qualified
  names only (their version is the contract), but what they capture (an
  objective wrapped by :func:`kdjax.objectives.with_hard_labels`, a
  ``functools.partial``'s arguments) is followed. Arrays are hashed by
  their bytes; other objects by their type's name.

  Why bytecode rather than ``inspect.getsource``: it needs no source file
  (a notebook cell, ``exec``'d code, a lambda defined on a shared line all
  work), and it ignores formatting and comments, which the source text
  does not.
  """
  h = hashlib.sha256()
  _feed(h, fn, set())
  return h.hexdigest()[:16]


def _put(h, text: str) -> None:
  h.update(text.encode() + b"\0")


def _feed(h, x, seen: set) -> None:
  """Hashes ``x`` into ``h`` (see :func:`fingerprint`)."""
  if x is None or isinstance(x, (bool, int, float, complex, str, bytes)):
    _put(h, f"{type(x).__name__}:{x!r}")
  elif isinstance(x, (tuple, list, frozenset, set)):
    items = sorted(x, key=repr) if isinstance(x, (set, frozenset)) else x
    _put(h, f"{type(x).__name__}:{len(items)}")
    for item in items:
      _feed(h, item, seen)
  elif isinstance(x, dict):
    _put(h, f"dict:{len(x)}")
    for k in sorted(x, key=repr):
      _feed(h, k, seen)
      _feed(h, x[k], seen)
  elif isinstance(x, (np.ndarray, np.generic, jax.Array)):
    a = np.asarray(x)
    _put(h, f"array:{a.dtype}:{a.shape}")
    h.update(np.ascontiguousarray(a).tobytes())
  elif isinstance(x, types.ModuleType):
    _put(h, f"module:{recorded_module(x.__name__)}")
  elif id(x) in seen:
    _put(h, "seen")
  else:
    seen.add(id(x))
    _feed_object(h, x, seen)


def _name(cls: type) -> str:
  return f"{recorded_module(cls.__module__)}.{cls.__qualname__}"


def _feed_object(h, x, seen: set) -> None:
  if isinstance(x, types.CodeType):
    _feed_code(h, x, seen)
  elif isinstance(x, functools.partial):
    _put(h, "partial")
    _feed(h, (x.func, x.args, x.keywords), seen)
  elif isinstance(x, types.MethodType):
    _put(h, "method")
    _feed(h, (x.__func__, x.__self__), seen)
  elif isinstance(x, types.FunctionType):
    _feed_function(h, x, seen)
  elif dataclasses.is_dataclass(x) and not isinstance(x, type):
    _put(h, f"dataclass:{_name(type(x))}")
    for f in dataclasses.fields(x):
      _put(h, f.name)
      _feed(h, getattr(x, f.name), seen)
  elif isinstance(x, type):
    _put(h, f"type:{_name(x)}")
    if not _is_library(x.__module__):
      call = x.__dict__.get("__call__")
      if call is not None:
        _feed(h, call, seen)
  else:
    cls = type(x)
    _put(h, f"object:{_name(cls)}")
    if not _is_library(cls.__module__):
      _feed(h, cls, seen)
      _feed(h, dict(getattr(x, "__dict__", {})), seen)


def _feed_function(h, fn: types.FunctionType, seen: set) -> None:
  module = fn.__module__
  _put(h, f"function:{recorded_module(module)}.{fn.__qualname__}")
  cells = []
  for cell in fn.__closure__ or ():
    try:
      cells.append(cell.cell_contents)
    except ValueError:  # An empty cell.
      cells.append("<empty cell>")
  _feed(h, (fn.__defaults__, fn.__kwdefaults__, cells), seen)
  if _is_library(module):
    return
  _feed_code(h, fn.__code__, seen, doc=fn.__doc__)
  # The module-level functions and constants the code refers to.
  for name in sorted(_global_names(fn.__code__)):
    if name in fn.__globals__:
      _put(h, f"global:{name}")
      _feed(h, fn.__globals__[name], seen)


def _global_names(code: types.CodeType) -> set[str]:
  names = set(code.co_names)
  for c in code.co_consts:
    if isinstance(c, types.CodeType):
      names |= _global_names(c)
  return names


def _feed_code(h, code: types.CodeType, seen: set, doc=None) -> None:
  _put(h, f"code:{sys.version_info[0]}.{sys.version_info[1]}")
  h.update(code.co_code)
  _put(h, repr(code.co_names))
  _put(h, f"{code.co_argcount}:{code.co_kwonlyargcount}:{code.co_flags}")
  for c in code.co_consts:
    if doc is not None and c is doc:
      continue  # The docstring is not the computation.
    if isinstance(c, types.CodeType):
      _feed_code(h, c, seen)
    else:
      _feed(h, c, seen)


def mismatch_hint(old: Mapping, new: Mapping, diff) -> str:
  """What a differing objective or schedule record means, for the error."""
  hints = []
  if "objective_code" in diff and old.get("objective") == new.get(
      "objective"):
    was = (old.get("objective_code") or {}).get("python")
    now = (new.get("objective_code") or {}).get("python")
    hints.append(
        f"objective {new.get('objective')!r}'s code differs from the "
        "recorded run's (it was edited, or its captured values changed" +
        (f"; recorded under Python {was}, now {now}: the bytecode differs"
         if was and now and was != now else "") + ")")
  if "schedules" in diff:
    old_s, new_s = old.get("schedules") or {}, new.get("schedules") or {}
    names = sorted(k for k in set(old_s) | set(new_s)
                   if old_s.get(k) != new_s.get(k))
    hints.append(f"the schedule(s) of {names} take other values than the "
                 f"recorded run's at steps {list(SCHEDULE_STEPS)}")
  return "; " + "; ".join(hints) if hints else ""


# ----------------------------------------------------------------------------
# Records and checkpoints of older kdjax versions.
# ----------------------------------------------------------------------------

# Leaf names of the state before it carried the hyperparameters as a dict.
_LEGACY_LEAVES = {"temperature": "hparams.temperature",
                  "alpha": "hparams.alpha"}


def upgrade_fit_record(record: Mapping) -> dict:
  """An older ``fit.json`` record in the current form (others unchanged).

  Before the state carried ``hparams``, ``fit.json`` held ``'temperature'``
  and ``'alpha'`` as keys of their own and the state's leaves under those
  names; the same run now records ``'hparams'`` and the leaves
  ``hparams.temperature`` / ``hparams.alpha``.

  A scheduled run's record (``temperature_fn`` / ``alpha_fn``, the
  schedules' names) is left as it is: it no longer matches, and such a run
  does not resume.

  >>> new = upgrade_fit_record({"temperature": 2.0, "alpha": 0.5,
  ...                           "state": {"alpha": "() float32"}})
  >>> new["hparams"], new["state"]
  ({'alpha': 0.5, 'temperature': 2.0}, {'hparams.alpha': '() float32'})
  """
  record = dict(record)
  if "hparams" in record or not {"temperature", "alpha"} <= set(record):
    return record
  record["hparams"] = {"alpha": record.pop("alpha"),
                       "temperature": record.pop("temperature")}
  if isinstance(record.get("state"), Mapping):
    record["state"] = {_LEGACY_LEAVES.get(k, k): v
                       for k, v in record["state"].items()}
  return record


def legacy_layout(state, saved_names) -> Optional[tuple[Any, Callable]]:
  """How to restore an older checkpoint into ``state``'s structure.

  A checkpoint written before the state carried ``hparams`` holds the
  leaves ``temperature`` and ``alpha`` where ``state`` has
  ``hparams.temperature`` and ``hparams.alpha``. Returns ``(like,
  convert)``: a dict of the old layout to restore into, and the function
  that turns the restored dict into a state like ``state``; or None if
  ``saved_names`` (the checkpoint's leaf names) are not of that layout.
  """
  hp = getattr(state, "hparams", None)
  if not isinstance(hp, Mapping) or set(hp) != {"temperature", "alpha"}:
    return None
  names = set(saved_names)
  if not ({"temperature", "alpha"} <= names) or any(
      n.startswith("hparams.") for n in names):
    return None
  fields = {f.name: getattr(state, f.name)
            for f in dataclasses.fields(state)
            if f.metadata.get("pytree_node", True)}
  like = {k: v for k, v in fields.items() if k != "hparams"}
  like.update(temperature=hp["temperature"], alpha=hp["alpha"])

  def convert(restored: Mapping):
    restored = dict(restored)
    hparams = {"temperature": restored.pop("temperature"),
               "alpha": restored.pop("alpha")}
    return state.replace(hparams=hparams, **restored)

  return like, convert
