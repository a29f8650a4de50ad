"""What a run's ``fit.json`` records of its callables, and when two records
are the same run.

:func:`kdjax.fit` records the augmentation it was given by
:func:`describe` (a short, stable string) and, when a workdir is resumed,
compares the record with :func:`same_fit_record`. These are the core's
rules; the paper's jitter (:mod:`kdjax.paper.augment`) only describes
itself (a ``description`` attribute), as any augmentation may.

A record names kdjax's own functions and types by their module
(:func:`kdjax.hparams.fingerprint`, :func:`kdjax.objectives.record`), and
some modules have moved (``kdjax.topk`` is now :mod:`kdjax.losses.topk`,
``kdjax.models`` :mod:`kdjax.paper.models`, ...). :func:`recorded_module`
gives the name a record uses, the module's name before the move, so that
the records, the hashes and the workdirs written before it still match.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional

__all__ = ["describe", "same_fit_record", "recorded_module", "MOVED_FROM"]

# Where a module lived before the layout of kdjax.losses and kdjax.paper
# (its records, hashes and pickles use the old name; each old name is still
# a deprecated alias module, kdjax/<name>.py).
MOVED_FROM = {
    "kdjax.losses.divergences": "kdjax.losses",
    "kdjax.losses.topk": "kdjax.topk",
    "kdjax.losses.chunked": "kdjax.chunked",
    "kdjax.paper.models": "kdjax.models",
    "kdjax.paper.data": "kdjax.data",
    "kdjax.paper.idx": "kdjax.idx",
    "kdjax.paper.constraints": "kdjax.constraints",
    "kdjax.paper.augment": "kdjax.augment",
    "kdjax.paper.optim": "kdjax.optim",
    "kdjax.paper.cli": "kdjax.cli",
    "kdjax.paper.provenance": "kdjax.provenance",
}


def recorded_module(name: Optional[str]) -> Optional[str]:
  """The name a record gives a module: its name before it moved, if it did.

  Example:
    >>> from kdjax.records import recorded_module
    >>> recorded_module("kdjax.losses.topk"), recorded_module("kdjax.step")
    ('kdjax.topk', 'kdjax.step')
  """
  return MOVED_FROM.get(name, name)

# What fit.json recorded for every make_jitter result before augmentations
# described themselves (the __qualname__ of functools.partial).
_LEGACY_JITTER_RECORD = "partial"


def describe(fn: Optional[Callable]) -> Optional[str]:
  """A short, stable description of an augmentation, for a run's records.

  * ``None`` (no augmentation) gives ``None``;
  * a function with a string ``description`` attribute gives that (so
    ``describe(kdjax.paper.augment.make_jitter(2)) ==
    'jitter(max_shift=2)'``);
  * a ``functools.partial`` gives ``name(arg, kw=value)`` with the wrapped
    function's description and the bound arguments' ``repr``;
  * anything else its ``__qualname__`` (a plain function, a lambda's
    ``'<lambda>'``), or its type's name for a callable object.

  Args:
    fn: an augmentation ``fn(rng, images) -> images``, or ``None``.

  Returns:
    The description, or ``None`` when ``fn`` is ``None``.

  Example:
    >>> import functools
    >>> from kdjax.records import describe
    >>> def shift(rng, images, max_shift=2):
    ...   return images
    >>> describe(shift)
    'shift'
    >>> describe(functools.partial(shift, max_shift=3))
    'shift(max_shift=3)'
    >>> shift.description = "shift(2)"
    >>> describe(shift)
    'shift(2)'
  """
  if fn is None:
    return None
  description = getattr(fn, "description", None)
  if isinstance(description, str):
    return description
  if isinstance(fn, functools.partial):
    args = [repr(a) for a in fn.args]
    args += [f"{k}={v!r}" for k, v in fn.keywords.items()]
    return f"{describe(fn.func)}({', '.join(args)})"
  # The same name fit.json recorded before descriptions existed, so the
  # records of plain functions are unchanged.
  return getattr(fn, "__qualname__", type(fn).__name__)


def _same_augment(recorded: Any, current: Any) -> bool:
  if recorded == current:
    return True
  # Records written before descriptions existed name every make_jitter
  # result "partial"; they match a jitter of any max_shift.
  return (recorded == _LEGACY_JITTER_RECORD and isinstance(current, str)
          and current.startswith("jitter("))


def same_fit_record(recorded: Mapping, current: Mapping) -> bool:
  """Whether two ``fit.json`` records describe the same run.

  Equal records match, and so does an old record whose ``'augment'`` is
  ``'partial'`` (what ``fit.json`` said for
  :func:`kdjax.paper.augment.make_jitter` before :func:`describe` existed)
  against a current ``'jitter(...)'``, so a workdir written then still
  resumes. Every other key must be equal.

  Example:
    >>> from kdjax.records import same_fit_record
    >>> same_fit_record({"augment": "partial", "batch_size": 128},
    ...                 {"augment": "jitter(max_shift=2)", "batch_size": 128})
    True
    >>> same_fit_record({"augment": "partial"}, {"augment": None})
    False
  """
  if set(recorded) != set(current):
    return False
  return all(_same_augment(recorded[k], current[k]) if k == "augment"
             else recorded[k] == current[k] for k in recorded)
