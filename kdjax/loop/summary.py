"""The one metric summary of an epoch and its non-finite report.

Every epoch form (:mod:`kdjax.loop.device`, :mod:`kdjax.loop.host`) ends
with :func:`summarise`: the per-step metrics ``[steps]`` averaged over the
epoch and, from the same values on the device, where the epoch's first
non-finite step was (:func:`nonfinite_diagnostics`). :func:`kdjax.fit`
turns that into one line with :func:`nonfinite_message`.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["summarise", "nonfinite_diagnostics", "mean_metrics",
           "nonfinite_message"]

# The order in which non-finite metrics are named (then the rest, sorted).
_METRIC_ORDER = ("loss", "hard_loss", "soft_loss", "grad_norm")


def nonfinite_diagnostics(per_step: dict, state, steps: int) -> dict:
  """Where the epoch's first non-finite step was, from ``[steps]`` metrics.

  The result holds:

  * ``'first_nonfinite_step'``: the global step number (``state.step``
    before that step) of the epoch's first non-finite step, -1 if none;
  * ``'nonfinite_metrics'``: ``{name: bool}``, which metrics were not
    finite at that step (all False if none);
  * ``'skipped'``: ``state.skipped`` after the epoch, when the state has it.
  """
  if "finite" not in per_step:
    raise ValueError("nonfinite_diagnostics needs a step that reports a "
                     "'finite' metric (see kdjax.step.make_train_step).")
  finite = (per_step["finite"] > 0).astype(jnp.int32)
  first = jnp.argmin(finite)  # The first 0; 0 when every step is finite.
  any_bad = jnp.any(finite == 0)
  end_step = getattr(state, "step", None)
  start = 0 if end_step is None else end_step - steps
  out = {
      "first_nonfinite_step": jnp.where(any_bad, start + first,
                                        -1).astype(jnp.int32),
      "nonfinite_metrics": {
          k: jnp.logical_and(any_bad, jnp.logical_not(jnp.isfinite(v[first])))
          for k, v in per_step.items() if k != "finite"},
  }
  skipped = getattr(state, "skipped", None)
  if skipped is not None:
    out["skipped"] = skipped
  return out


def summarise(per_step: dict, state, *, diagnostics: bool = False,
              vmapped: bool = False, axis: int = 0) -> dict:
  """The epoch's metrics: per-step values averaged over ``axis``.

  With ``diagnostics`` (the step must report ``'finite'``), also
  :func:`nonfinite_diagnostics` (per member when ``vmapped``: the steps
  are then on axis 0 and members on axis 1).
  """
  steps = jax.tree.leaves(per_step)[0].shape[axis]
  out = jax.tree.map(lambda m: jnp.mean(m, axis=axis), per_step)
  if diagnostics:
    diag = nonfinite_diagnostics
    if vmapped:
      diag = jax.vmap(diag, in_axes=(1, 0, None))
    out.update(diag(per_step, state, steps))
  return out


def mean_metrics(metrics: list[dict]) -> dict:
  """Averages a list of per-step metric dicts (host floats)."""
  if not metrics:
    return {}
  return {k: float(sum(float(m[k]) for m in metrics) / len(metrics))
          for k in metrics[0]}


def nonfinite_message(epoch: int, epochs: int, first_bad: np.ndarray,
                      bad_metrics: dict, metrics: dict,
                      end_step: np.ndarray, steps_per_epoch: int,
                      saved: Optional[list[int]]) -> str:
  """One line: where the epoch's first non-finite step was, and what."""
  finite = np.asarray(metrics["finite"])
  if first_bad.ndim:  # A vmapped sweep: report its first affected member.
    members = np.flatnonzero(first_bad >= 0)
    m = int(members[0])
    step, end, finite = int(first_bad[m]), int(end_step[m]), float(finite[m])
    bad = {k: bool(np.asarray(v)[m]) for k, v in bad_metrics.items()}
    who = (f" in sweep member {m} (members affected: "
           f"{[int(i) for i in members]})")
  else:
    step, end, finite = int(first_bad), int(end_step), float(finite)
    bad = {k: bool(v) for k, v in bad_metrics.items()}
    who = ""
  order = [k for k in _METRIC_ORDER if k in bad] + sorted(
      k for k in bad if k not in _METRIC_ORDER)
  names = [k for k in order if bad[k]]
  what = (f"non-finite metric {names[0]!r}" +
          (f" (also {', '.join(repr(n) for n in names[1:])})"
           if names[1:] else "")) if names else "non-finite gradients"
  num_bad = round((1.0 - finite) * steps_per_epoch)
  index = step - (end - steps_per_epoch)
  last = (f"the last checkpoint is epoch {saved[-1]}" if saved
          else "no checkpoint was written" if saved is not None
          else "nothing was saved (no workdir)")
  return (
      f"epoch {epoch + 1}/{epochs}: {what} at global step {step}{who} "
      f"(step {index + 1} of {steps_per_epoch} in the epoch; {num_bad} "
      f"non-finite step(s) in the epoch). The non-finite updates were not "
      f"applied and this epoch was not checkpointed; {last}. Check the data "
      "for NaN/inf, lower the learning rate, or pass on_nonfinite='skip'.")
