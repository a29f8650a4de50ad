"""Batches that stream from the host: sources, checks, device prefetch.

:func:`kdjax.fit` trains on device-resident arrays (a dict: the whole set is
moved to the device once) or on batches that come from the host, one at a
time. A host source is one of:

* a ``grain.MapDataset`` of batches: batch ``i`` of epoch ``e`` is
  ``ds[e * len(ds) + i]``, and grain shuffles each epoch anew at indices past
  its length (``ds.shuffle(seed).batch(B)``). Random access: a resumed run
  jumps to its batch, nothing is replayed;
* a function ``epoch -> batches``, where ``batches`` is a ``MapDataset`` or
  a sequence (indexed from the resumed position), a grain iterable (its
  iterator's ``get_state`` is saved in the checkpoint and restored), or any
  re-iterable (a resumed epoch calls the function again and skips the
  batches already trained on: the function must be deterministic in
  ``epoch``);
* a grain ``IterDataset`` or ``DataLoader``: one iterator for the whole
  run, cut into epochs of ``steps_per_epoch`` batches; its state is
  checkpointed.

An iterator (a generator object, say) is refused before anything is read
from it: it can be neither re-iterated each epoch nor resumed. A batch is a
dict of NumPy arrays with a shared leading axis; every batch must have the
first batch's fields, shapes and dtypes (the compiled step is built for
them), and its labels must lie in ``[0, num_classes)`` where its weight is
positive: each is checked on the host as it arrives, and a bad one raises an
error naming its epoch and index.

:class:`Prefetcher` moves batches to the device ahead of the step on a
background thread (double buffering by default), already placed with the
step's sharding, so that the device does not wait on the host; with
``block > 1`` it stacks that many batches into one ``[block, B, ...]``
transfer for a jitted block of steps.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Iterator, Mapping
from typing import Callable, Iterable, Optional

import jax
import numpy as np

from kdjax import validate
from kdjax.fields import BatchError, Fields, check_batch

__all__ = ["HostSource", "as_host_source", "is_host_source", "Prefetcher",
           "BatchChecker", "SourceError"]



class SourceError(TypeError):
  """``fit`` was given something it cannot stream batches from."""


def _grain_map_dataset():
  try:
    import grain  # pylint: disable=g-import-not-at-top
    return grain.MapDataset
  except ImportError:  # grain is optional for device-resident data.
    return None


def _is_map_dataset(x) -> bool:
  cls = _grain_map_dataset()
  return cls is not None and isinstance(x, cls)


def _is_sequence(x) -> bool:
  return (hasattr(x, "__getitem__") and hasattr(x, "__len__")
          and not isinstance(x, (Mapping, str, bytes)))


def is_host_source(data) -> bool:
  """Whether ``data`` is a host source rather than device-resident arrays."""
  return not isinstance(data, Mapping)


def _refuse_iterator(data, what: str) -> None:
  if isinstance(data, Iterator):
    raise SourceError(
        f"{what} is an iterator ({type(data).__name__}), which fit can "
        "neither read again each epoch nor resume after an interruption; "
        "nothing was read from it. Pass a function epoch -> batches (e.g. "
        "lambda epoch: my_batches(epoch)), a grain.MapDataset of batches, "
        "or a grain.IterDataset / DataLoader with steps_per_epoch=.")


@dataclasses.dataclass
class _Position:
  """Where the next batch comes from; ``state`` is JSON-able."""
  epoch: int
  step: int
  state: Optional[dict] = None


class HostSource:
  """A uniform view of the host sources above (see the module docstring).

  ``batches(epoch, start, state)`` yields ``(batch, data_state)`` pairs from
  step ``start`` of ``epoch`` on, where ``data_state`` is what a checkpoint
  taken after that batch must hold to resume right after it.
  """

  def __init__(self, data, steps_per_epoch: Optional[int] = None):
    _refuse_iterator(data, "the data")
    self._data = data
    self.kind = ("map" if _is_map_dataset(data) else
                 "sequence" if _is_sequence(data) else
                 "fn" if callable(data) else
                 "iterable" if isinstance(data, Iterable) else None)
    if self.kind is None:
      raise SourceError(
          f"fit cannot stream batches from a {type(data).__name__}: pass a "
          "dict of arrays (device-resident data), a grain dataset of "
          "batches, or a function epoch -> batches.")
    self._iterator = None
    # A function's epoch-0 sequence, built once (for its length, the peek
    # and epoch 0 itself) instead of once for each.
    self._epoch0 = None
    if self.kind in ("map", "sequence"):
      n = len(data)
      if steps_per_epoch is not None and steps_per_epoch != n:
        raise ValueError(f"steps_per_epoch={steps_per_epoch}, but the "
                         f"dataset has {n} batches per epoch.")
      steps_per_epoch = n
    elif self.kind == "fn":
      first = data(0)
      _refuse_iterator(first, "data(0)")
      if _is_sequence(first):
        self._epoch0 = first
        if steps_per_epoch is None:
          steps_per_epoch = len(first)
    if steps_per_epoch is None:
      raise ValueError(
          "the number of batches per epoch is unknown for this source: pass "
          "steps_per_epoch=.")
    if steps_per_epoch <= 0:
      raise ValueError(f"an epoch needs at least one batch, got "
                       f"{steps_per_epoch}.")
    self.steps_per_epoch = int(steps_per_epoch)

  def describe(self) -> str:
    return f"{self.kind}:{type(self._data).__name__}"

  def peek(self):
    """The first batch, read without consuming anything the run will use."""
    if self.kind in ("map", "sequence"):
      return self._data[0]
    if self.kind == "fn":
      if self._epoch0 is not None:
        return self._epoch0[0]
      return next(iter(self._data(0)))
    return next(iter(self._data))  # A grain IterDataset: a fresh iterator.

  def batches(self, epoch: int, start: int, state: Optional[dict]):
    n = self.steps_per_epoch
    if self.kind == "map":
      for i in range(start, n):
        yield self._data[epoch * n + i], None
      return
    if self.kind == "sequence":
      for i in range(start, n):
        yield self._data[i], None
      return
    if self.kind == "fn":
      obj = self._epoch0 if epoch == 0 and self._epoch0 is not None else (
          self._data(epoch))
      _refuse_iterator(obj, f"data({epoch})")
      if _is_sequence(obj):
        if len(obj) != n:
          raise ValueError(f"data({epoch}) has {len(obj)} batches, epoch 0 "
                           f"had {n}; every epoch needs the same number.")
        for i in range(start, n):
          yield obj[i], None
        return
      it = iter(obj)
      stateful = hasattr(it, "get_state") and hasattr(it, "set_state")
      if start and stateful and state is not None:
        it.set_state(state)
      else:
        for _ in range(start):  # The documented replay rule.
          next(it)
      for i in range(start, n):
        try:
          batch = next(it)
        except StopIteration:
          raise ValueError(f"data({epoch}) ended after {i} batches; epochs "
                           f"have {n}.") from None
        yield batch, (it.get_state() if stateful else None)
      return
    # One iterator for the whole run (grain IterDataset / DataLoader).
    if self._iterator is None:
      self._iterator = iter(self._data)
      if state is not None:
        self._iterator.set_state(state)
      elif epoch or start:
        for _ in range(epoch * n + start):
          next(self._iterator)
    it = self._iterator
    for i in range(start, n):
      try:
        batch = next(it)
      except StopIteration:
        raise ValueError(f"the data ended in epoch {epoch + 1} after {i} "
                         "batches.") from None
      yield batch, (it.get_state() if hasattr(it, "get_state") else None)


def as_host_source(data, steps_per_epoch: Optional[int] = None) -> HostSource:
  return data if isinstance(data, HostSource) else HostSource(
      data, steps_per_epoch)


class BatchChecker:
  """Checks every host batch against the first one (fields, shapes, labels).

  Args:
    first: the first batch (fixes the fields, shapes and dtypes).
    fields: the step's :class:`kdjax.fields.Fields`.
    num_classes: the student's number of classes (for the label range).
  """

  def __init__(self, first, fields: Fields, num_classes: Optional[int],
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
        validate.validate_labels(labels, self.num_classes)
      except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    return batch


def _describe(spec) -> str:
  return ", ".join(f"{k}: {v}" for k, v in sorted(spec.items()))


_DONE = object()


class Prefetcher:
  """Moves host batches to the device ahead of the step, on a thread.

  Iterating yields ``(device_batch, count, data_state)``: ``count`` host
  batches (``block`` of them, stacked on a new leading axis, or one when
  ``block`` is 1) and the data state after the last of them. At most
  ``size`` prepared transfers wait in the queue (2: double buffering).
  An exception in the producer (a bad batch) is raised in the consumer.

  Args:
    batches: an iterable of ``(host_batch, data_state)``.
    block: batches per transfer (the steps of one jitted block).
    size: the queue depth.
    sharding: a ``jax.sharding.Sharding`` for every leaf (e.g. the batch
      axis split over a mesh), or None for the default device. With
      ``block > 1`` it must take the extra leading (block) axis into account.
    block_sharding: the sharding of a stacked block (default device if
      None).
    check: optional ``(batch, index) -> batch`` run on each host batch.
    place: optional ``(host_batch, lead) -> device batch`` instead of
      ``jax.device_put`` with the shardings above (``lead`` is 1 for a
      stacked block): :meth:`kdjax.mesh.Plan.place_batch`, which puts each
      process's rows straight into their shards of the global batch.
    total: the number of batches to expect; the last ``total % block`` are
      transferred one by one (so that blocks keep one compiled shape).
  """

  def __init__(self, batches: Iterable, *, block: int = 1, size: int = 2,
               sharding=None, block_sharding=None,
               check: Optional[Callable] = None, total: Optional[int] = None,
               place: Optional[Callable] = None):
    self._q: "queue.Queue" = queue.Queue(maxsize=max(1, size))
    self._stop = threading.Event()
    if place is None:
      place = lambda b, lead: jax.device_put(
          b, block_sharding if lead else sharding)
    self._args = (batches, block, place, check, total)
    self._thread = threading.Thread(target=self._produce, daemon=True)
    self._thread.start()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._q.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _produce(self):
    batches, block, place, check, total = self._args

    def singles(pending) -> bool:
      return all(self._put((place(b, 0), 1, st))
                 for b, st in pending)

    try:
      pending, index = [], 0
      for batch, data_state in batches:
        if check is not None:
          batch = check(batch, index)
        index += 1
        pending.append((batch, data_state))
        if len(pending) == block and block > 1:
          stacked = jax.tree.map(lambda *x: np.stack(x),
                                 *[b for b, _ in pending])
          if not self._put((place(stacked, 1), block,
                            data_state)):
            return
          pending = []
        elif block == 1 or (total is not None and index == total):
          if not singles(pending):  # One step, or the epoch's short tail.
            return
          pending = []
        if self._stop.is_set():
          return
      if not singles(pending):
        return
      self._put(_DONE)
    except BaseException as e:  # pylint: disable=broad-except
      self._put(("error", e))

  def __iter__(self):
    while True:
      item = self._q.get()
      if item is _DONE:
        return
      if isinstance(item, tuple) and len(item) == 2 and item[0] == "error":
        raise item[1]
      yield item

  def close(self) -> None:
    self._stop.set()
    self._thread.join(timeout=5)
