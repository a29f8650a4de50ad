"""Checkpoints of the student's training state, with orbax.

What is saved: the student's :class:`kdjax.train.TrainState` leaves (params,
optimizer state, step, skipped-step count and hyperparameters; works for
stacked sweep states too; a checkpoint written when the state held
``temperature`` and ``alpha`` as fields of their own restores into today's
``hparams``), the run's key, and the data-order state (the
number of finished epochs; the order of epoch ``e`` is a pure function of
the key and ``e``, see :func:`kdjax.loops.epoch_key`). The teacher is never
saved: it is an input of the run, not part of its state.

Safety:

* Writes are atomic: orbax writes each step into a temporary directory and
  renames it only once it is complete, so a run killed mid-write leaves the
  previous checkpoint intact (and the half-written one is ignored and
  cleaned up).
* Old checkpoints are deleted only after a newer one is complete
  (``max_to_keep``, default 2).
* :func:`restore_latest` falls back to the previous good checkpoint, with a
  warning, when the latest one is truncated or corrupted; the unreadable one
  is moved aside to ``<directory>.corrupt/`` (kept for inspection, never
  deleted) so training can write that step again.
"""

from __future__ import annotations

import logging
import pathlib
import time
import warnings
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from kdjax import hparams as hparams_lib
from kdjax._types import PyTree

__all__ = ["Checkpointer", "CheckpointCorruptError", "CheckpointMismatchError",
           "key_data",
           "save_params", "load_params", "write_atomic"]

log = logging.getLogger(__name__)


class CheckpointCorruptError(RuntimeError):
  """Every checkpoint in the directory failed to restore."""


class CheckpointMismatchError(ValueError):
  """A readable checkpoint holds a state of another structure or shape.

  Not corruption: the checkpoint was written by a different model, sweep
  size or optimizer. It is left where it is (no fallback, nothing moved).
  """


def leaf_specs(tree: PyTree) -> dict[str, str]:
  """``{'params.Dense_0.kernel': '(784, 800) float32', ...}`` for a pytree.

  Names are the leaves' key paths joined by dots, as orbax names the arrays
  it saves (``jax.tree_util.keystr(path, simple=True, separator=".")``:
  dict keys, attribute names and sequence indices).
  """
  return {jax.tree_util.keystr(path, simple=True, separator="."):
          f"{tuple(np.shape(leaf))} {np.dtype(leaf.dtype).name}"
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def key_data(rng: jax.Array) -> np.ndarray:
  """The raw uint32 data of a PRNG key (typed or legacy), saved in ``meta``."""
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return np.asarray(jax.random.key_data(rng))
  return np.asarray(rng)


class Checkpointer:
  """Saves and restores ``(state, rng, epoch)`` under ``directory``.

  Args:
    directory: where checkpoints live (created if missing).
    max_to_keep: how many complete checkpoints to keep (>= 2 keeps a
      fallback for a corrupted latest one).
  """

  def __init__(self, directory: str | pathlib.Path, *, max_to_keep: int = 2):
    self.directory = pathlib.Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True,
        enable_async_checkpointing=False, cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        # Handlers named up front, so that a manager that has not saved yet
        # (a resumed process) can read the arrays' metadata too.
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  # The step number orbax uses is the epoch count (data-order state).
  def all_epochs(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, epoch: int, state: PyTree, rng: jax.Array,
           extra: Optional[dict] = None) -> None:
    """Writes the checkpoint for ``epoch`` finished epochs (atomically)."""
    # ``index`` is the checkpoint's number (finished epochs, or the global
    # step for a host-data run's mid-epoch checkpoints, whose ``extra``
    # then records the epoch and the data position).
    meta = {"epoch": int(epoch), "index": int(epoch),
            "rng_key_data": key_data(rng).tolist(),
            **(extra or {})}
    self._manager.save(
        int(epoch),
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                meta=ocp.args.JsonSave(meta)),
        force=True)
    self._manager.wait_until_finished()

  def restore(self, epoch: int, like: PyTree) -> tuple[PyTree, dict]:
    """Restores the checkpoint of ``epoch`` into the structure of ``like``.

    Raises:
      CheckpointMismatchError: the checkpoint is readable but its arrays'
        names, shapes or dtypes differ from ``like``'s.
    """
    layout = self._legacy_layout(epoch, like)
    if layout is not None:  # Written by an older kdjax: its own layout.
      old_like, convert = layout
      state, meta = self.restore(epoch, old_like)
      return convert(state), meta
    self._check_matches(epoch, like)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    out = self._manager.restore(
        int(epoch),
        args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                meta=ocp.args.JsonRestore()))
    state, meta = out["state"], out["meta"]
    # Check that nothing came back silently wrong.
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(like)):
      if got.shape != want.shape or got.dtype != want.dtype:
        raise CheckpointMismatchError(
            f"checkpoint {epoch} has a leaf of shape {got.shape} {got.dtype}, "
            f"expected {want.shape} {want.dtype}.")
    if int(meta.get("index", meta["epoch"])) != int(epoch):
      raise ValueError(f"checkpoint {epoch} says it is number "
                       f"{meta.get('index', meta['epoch'])}.")
    return state, meta

  def _saved_specs(self, epoch: int) -> Optional[dict[str, str]]:
    """The saved arrays' :func:`leaf_specs`, or None if orbax gives none."""
    saved = self._manager.item_metadata(int(epoch))["state"]
    saved = getattr(saved, "tree", saved)
    leaves = jax.tree.leaves(saved)
    if not leaves or not all(hasattr(m, a) for m in leaves
                             for a in ("name", "shape", "dtype")):
      return None
    return {m.name: f"{tuple(m.shape)} {np.dtype(m.dtype).name}"
            for m in leaves}

  def _legacy_layout(self, epoch: int, like: PyTree):
    """``(old_like, convert)`` for a checkpoint of an older state layout
    (:func:`kdjax.hparams.legacy_layout`), or None."""
    got = self._saved_specs(epoch)
    if got is None or got == leaf_specs(like):
      return None
    layout = hparams_lib.legacy_layout(like, got)
    if layout is None or leaf_specs(layout[0]) != got:
      return None
    return layout

  def _check_matches(self, epoch: int, like: PyTree) -> None:
    """Compares the saved arrays' metadata with ``like`` before restoring."""
    got = self._saved_specs(epoch)
    if got is None:
      return  # This orbax gives no per-array metadata: restore decides.
    want = leaf_specs(like)
    if got == want:
      return
    diff = [f"{k}: saved {got.get(k, 'nothing')}, expected "
            f"{want.get(k, 'nothing')}"
            for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)]
    raise CheckpointMismatchError(
        f"the checkpoint of epoch {epoch} in {self.directory} holds a state of "
        f"another structure ({len(diff)} arrays differ: {'; '.join(diff[:3])}"
        f"{'; ...' if len(diff) > 3 else ''}). It was written by a different "
        "model, sweep size or optimizer; use a new workdir (the checkpoint "
        "is intact and was left in place).")

  def restore_latest(self, like: PyTree):
    """The newest checkpoint that restores cleanly, or None if there is none.

    Returns:
      ``None`` or ``(state, meta)`` where ``meta['epoch']`` is the number of
      finished epochs and ``meta['rng_key_data']`` the run's key data.

    Raises:
      CheckpointCorruptError: if checkpoints exist but none restores.
      CheckpointMismatchError: if the newest readable checkpoint holds a
        state of another structure than ``like`` (nothing is moved).
    """
    epochs = self.all_epochs()
    if not epochs:
      return None
    errors, failed = [], []
    for epoch in reversed(epochs):
      try:
        restored = self.restore(epoch, like)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        failed.append(epoch)
        msg = (f"checkpoint for epoch {epoch} in {self.directory} could not "
               f"be restored ({type(e).__name__}: {str(e)[:200]}); falling "
               "back to the previous one.")
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        log.warning(msg)
        errors.append(f"epoch {epoch}: {type(e).__name__}")
        continue
      if failed:
        self._quarantine(failed)
      return restored
    raise CheckpointCorruptError(
        f"no checkpoint in {self.directory} could be restored ({errors}). "
        "Delete the directory to start over.")

  def _quarantine(self, epochs) -> None:
    """Moves unreadable checkpoints aside (never deletes them)."""
    dest = self.directory.parent / (self.directory.name + ".corrupt")
    dest.mkdir(parents=True, exist_ok=True)
    for epoch in epochs:
      src = self.directory / str(epoch)
      if src.exists():
        target = dest / f"{epoch}.{int(time.time() * 1e6)}"
        src.rename(target)
        warnings.warn(f"moved unreadable checkpoint {src} to {target}.",
                      RuntimeWarning, stacklevel=3)
    self._manager.reload()

  def close(self) -> None:
    self._manager.close()


def write_atomic(path: str | pathlib.Path, data: bytes | str) -> None:
  """Writes ``data`` to ``path`` via ``<path>.tmp`` and a rename.

  A reader (or a run killed mid-write) sees the old file or the new one,
  never a truncated one. Parent folders are created.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  if isinstance(data, str):
    tmp.write_text(data)
  else:
    tmp.write_bytes(data)
  tmp.replace(path)


def save_params(path: str | pathlib.Path, params: PyTree) -> None:
  """Writes a parameter pytree as flax msgpack bytes, atomically.

  This is the format of the shipped teacher
  (``experiments/mnist/teacher/teacher_cpu.msgpack``): portable, no orbax
  directory, loadable with :func:`load_params`.
  """
  import flax.serialization  # pylint: disable=g-import-not-at-top
  write_atomic(path, flax.serialization.to_bytes(jax.device_get(params)))


def load_params(path: str | pathlib.Path, like: PyTree) -> PyTree:
  """Reads a msgpack parameter file into the structure of ``like``.

  Raises:
    FileNotFoundError: naming the path, if it does not exist.
    ValueError: if the file does not match ``like``'s structure or shapes.
  """
  import flax.serialization  # pylint: disable=g-import-not-at-top
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"parameter file {path} does not exist.")
  try:
    params = flax.serialization.from_bytes(like, path.read_bytes())
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{path} is not a msgpack parameter file matching the "
                     f"expected structure ({type(e).__name__}: {e}).") from e
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(like)):
    if np.shape(got) != np.shape(want):
      raise ValueError(f"{path}: a parameter has shape {np.shape(got)}, "
                       f"expected {np.shape(want)}; wrong architecture?")
  return jax.tree.map(jnp.asarray, params)
