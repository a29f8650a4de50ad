r"""Offline teacher targets: a corpus's top-k logits, written once, read back.

A language-model teacher run at every step costs a forward pass per step;
its full logits cost ``4 V`` bytes per token. :func:`write_targets` runs a
frozen :class:`kdjax.Teacher` over a dataset **once** and stores, for every
position of every example, what :func:`kdjax.losses.topk.topk_targets`
gives on the teacher's logits ``v`` (its padding columns ``P`` dropped
first, :mod:`kdjax.vocab`):

.. math::
  K = \operatorname{top-k}_i\, v_i, \qquad
  \text{values} = (v_j)_{j \in K}\ \text{(decreasing)}, \qquad
  \text{indices} = K,

and, with ``bucket_temperature=T_c``, the tail logit
:math:`\tilde v = T_c \log \sum_{i \notin K} e^{v_i / T_c}`
(:func:`kdjax.losses.topk.tail_logit`, valid for ``tail="bucket"`` at
``T = T_c`` only). :func:`dataset` reads them back next to the data, as
the batch fields ``"topk_values"``, ``"topk_indices"`` (and ``"topk_tail"``)
that the ``"topk"`` and ``"chunked_topk"`` objectives read, so
:func:`kdjax.fit` trains from them on the host-data path with no teacher.

**Layout on disk.** ``directory/manifest.json`` and
``directory/shard-SSSSS-of-NNNNN.array_record``. Shard ``s`` holds the
examples ``[s B, min((s + 1) B, n))`` (``B = shard_size``), one ArrayRecord
record per example, in order, so the global record index is the example
index (``grain.sources.ArrayRecordDataSource`` over the shards in order).

**Record encoding** (raw little-endian bytes, no framing; ``p`` the
example's positions, e.g. its sequence length; ``k`` per position)::

  values  [p, k]  value_dtype: float32 (default), bfloat16 or float16
  indices [p, k]  uint16 if the (student) vocabulary V <= 65,536, else int32
  tail    [p]     float32, only with bucket_temperature

so the bytes per token (position) are

.. math::
  k\,(b_v + b_i) + 4\,[\text{tail}], \qquad
  b_v \in \{4, 2\},\ b_i = 2 \text{ if } V \le 2^{16} \text{ else } 4,

e.g. ``k = 128``: 512 bytes at bfloat16 and ``V = 32,000``, 768 at
``V = 152,064``, 1,024 at float32 (:func:`bytes_per_token`); the full
float32 logits are ``4 V`` = 128,000 bytes at ``V = 32,000``. ArrayRecord
adds its own framing (about 100 bytes per record at ``group_size:1``,
files rounded up to 64 KiB), uncompressed. Stored float32 values are the
teacher's top-k logits exactly; bfloat16 / float16 values are those
rounded to nearest (indices are exact either way; the reader returns
float32 values and int32 indices).

**Every device and process.** Shard ``s`` is written by process
``s mod P`` (round robin; ``P = jax.process_count()``). A process runs
the teacher jitted, data parallel over **its own** devices (the default
mesh's devices of this process, :mod:`kdjax.mesh`): the shards are
independent, so processes never wait on each other. Each batch of
``batch_size`` examples (a multiple of the local device count; a shard's
last batch is padded by repeating its last example, and the padding is
dropped) is split over those devices; one compile in all.

**Resume.** A shard is written to ``.shard-....tmp-<pid>`` and renamed
atomically when complete; a run skips every shard whose final file exists
with the right number of records, deletes its process's leftover
temporary files (a killed run's half-written shard) and redoes them. The
manifest (format version, ``k``, dtypes, the vocabulary sizes and
padding, ``bucket_temperature``, the positions' shape, the shard layout,
the number of examples and the teacher's params hash) must equal the
existing one: a run with another ``k`` or another teacher is refused with
one error naming what differs, before the teacher runs.

>>> import numpy as np, jax.numpy as jnp, tempfile
>>> from kdjax import Teacher, offline
>>> w = np.random.RandomState(0).randn(3, 10).astype(np.float32)
>>> teacher = Teacher.from_fn(lambda w, x: x @ w, jnp.asarray(w))
>>> data = {"image": np.random.RandomState(1).randn(20, 3).astype(np.float32)}
>>> d = tempfile.mkdtemp()
>>> offline.write_targets(teacher, data, d, k=4, shard_size=8, batch_size=4)
{'written': [0, 1, 2], 'skipped': []}
>>> ds = offline.dataset(data, d)
>>> sorted(ds[0]), ds[0]["topk_indices"].dtype
(['image', 'topk_indices', 'topk_values'], dtype('int32'))
>>> offline.bytes_per_token(4, vocab_size=10)
24
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib
from typing import Any, Mapping, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kdjax import heads
from kdjax import mesh as mesh_lib
from kdjax import vocab
from kdjax.fields import Fields
from kdjax.losses import topk

__all__ = ["write_targets", "TargetsSource", "dataset", "bytes_per_token",
           "read_manifest", "ManifestMismatchError", "FORMAT", "VERSION"]

FORMAT = "kdjax.offline_topk"
VERSION = 1
MANIFEST = "manifest.json"
_WRITER_OPTIONS = "group_size:1,uncompressed"
_VALUE_DTYPES = ("float32", "bfloat16", "float16")


class ManifestMismatchError(ValueError):
  """The directory holds targets of another teacher, ``k`` or dataset."""


def _value_dtype(name: str) -> np.dtype:
  if name not in _VALUE_DTYPES:
    raise ValueError(f"value_dtype must be one of {_VALUE_DTYPES}, got "
                     f"{name!r}.")
  if name == "bfloat16":
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name).newbyteorder("<")


def _index_dtype(vocab_size: int) -> np.dtype:
  return np.dtype("<u2" if vocab_size <= 1 << 16 else "<i4")


def bytes_per_token(k: int, *, vocab_size: int, value_dtype: str = "float32",
                    bucket: bool = False) -> int:
  """Bytes one position takes in a record: ``k (b_v + b_i) + 4 [tail]``.

  ``vocab_size`` is the student's (the teacher's minus its padding): it
  picks uint16 indices up to 65,536 classes, int32 beyond.

  >>> from kdjax import offline
  >>> offline.bytes_per_token(128, vocab_size=32_000, value_dtype="bfloat16")
  512
  >>> offline.bytes_per_token(128, vocab_size=152_064, value_dtype="bfloat16")
  768
  """
  return k * (_value_dtype(value_dtype).itemsize
              + _index_dtype(vocab_size).itemsize) + (4 if bucket else 0)


# -- the data ---------------------------------------------------------------


class _Rows:
  """A dict of arrays with a shared leading axis, as a sequence of examples."""

  def __init__(self, arrays: Mapping):
    self._arrays = dict(arrays)
    sizes = {len(v) for v in self._arrays.values()}
    if len(sizes) != 1:
      raise ValueError(f"the data's arrays must share a leading (example) "
                       f"axis; got sizes "
                       f"{ {n: len(v) for n, v in self._arrays.items()} }.")
    self._n = sizes.pop()

  def __len__(self):
    return self._n

  def __getitem__(self, i):
    return {n: v[i] for n, v in self._arrays.items()}


def _examples(data):
  if isinstance(data, Mapping):
    return _Rows(data)
  if not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
    raise TypeError(
        f"data must be indexable examples (a grain MapDataset or source of "
        f"example dicts, or a dict of arrays with a shared leading axis), got "
        f"{type(data).__name__}: the targets are aligned by example index.")
  return data


def _stack(examples: list) -> dict:
  return {n: np.stack([np.asarray(e[n]) for e in examples])
          for n in examples[0]}


# -- the manifest -----------------------------------------------------------


def teacher_hash(teacher) -> str:
  """SHA-256 of the teacher's params and state (their shapes, dtypes, bytes)."""
  h = hashlib.sha256()
  leaves, treedef = jax.tree.flatten((teacher.params, teacher.state))
  h.update(str(treedef).encode())
  for leaf in mesh_lib.to_host(leaves):
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def read_manifest(directory: str | os.PathLike) -> dict:
  """The manifest of a targets directory (:func:`write_targets`)."""
  path = pathlib.Path(directory) / MANIFEST
  if not path.exists():
    raise FileNotFoundError(
        f"{path} does not exist: {directory} holds no offline targets "
        "(write them with kdjax.offline.write_targets).")
  manifest = json.loads(path.read_text())
  if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
    raise ManifestMismatchError(
        f"{path} is not a {FORMAT} manifest of version {VERSION} (format "
        f"{manifest.get('format')!r}, version {manifest.get('version')!r}).")
  return manifest


def _check_or_write_manifest(directory: pathlib.Path, manifest: dict) -> None:
  path = directory / MANIFEST
  if not path.exists():  # Every process may get here: a temporary each.
    tmp = path.with_name(
        f".{MANIFEST}.tmp-{jax.process_index()}-{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, path)
    return
  old = json.loads(path.read_text())
  diff = sorted(key for key in set(old) | set(manifest)
                if old.get(key) != manifest.get(key))
  if diff:
    what = "; ".join(f"{key}: {old.get(key)!r} there, {manifest.get(key)!r} "
                     "now" for key in diff)
    raise ManifestMismatchError(
        f"{directory} holds offline targets of another run ({what}); "
        "nothing was written. Write these targets to another directory, or "
        "delete that one to recompute it.")


def _shard_name(s: int, num_shards: int) -> str:
  return f"shard-{s:05d}-of-{num_shards:05d}.array_record"


def _num_records(path: pathlib.Path) -> int:
  from array_record.python import array_record_module as ar  # pylint: disable=g-import-not-at-top
  reader = ar.ArrayRecordReader(str(path))
  try:
    return reader.num_records()
  finally:
    reader.close()


# -- writing ----------------------------------------------------------------


def _local_mesh(mesh: Optional[Mesh]) -> Mesh:
  """A ``"data"`` mesh over this process's devices of ``mesh`` (default)."""
  if mesh is None:
    mesh = mesh_lib.default_mesh()
  me = jax.process_index()
  devices = [d for d in mesh.devices.flat if d.process_index == me]
  if not devices:
    raise ValueError(f"process {me} has no device in the mesh.")
  return Mesh(np.array(devices), (mesh_lib.DATA,))


def _reducer(k: int, padding: int, bucket_temperature, fields: Fields):
  """The jitted ``(teacher, batch) -> {values, indices[, tail]}``."""

  def reduce(teacher, batch):
    logits = heads.to_logits(teacher(*fields.teacher_inputs_of(batch)))
    values, indices = topk.topk_targets(logits, k,
                                        teacher_vocab_padding=padding)
    out = {"values": values, "indices": indices}
    if bucket_temperature is not None:
      out["tail"] = topk.tail_logit(logits, indices, bucket_temperature,
                                    teacher_vocab_padding=padding)
    return out

  return jax.jit(reduce)


def _encode(out: dict, i: int, vdtype, idtype) -> bytes:
  parts = [np.asarray(out["values"][i]).astype(vdtype).tobytes(),
           np.asarray(out["indices"][i]).astype(idtype).tobytes()]
  if "tail" in out:
    parts.append(np.asarray(out["tail"][i]).astype("<f4").tobytes())
  return b"".join(parts)


def _write_shard(path: pathlib.Path, examples, lo: int, hi: int, run) -> None:
  """Examples ``[lo, hi)``, batch by batch, to ``path`` via a temporary."""
  from array_record.python import array_record_module as ar  # pylint: disable=g-import-not-at-top
  tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  writer = ar.ArrayRecordWriter(str(tmp), _WRITER_OPTIONS)
  try:
    for start in range(lo, hi, run["batch_size"]):
      rows = list(range(start, min(start + run["batch_size"], hi)))
      rows += [rows[-1]] * (run["batch_size"] - len(rows))  # One compile.
      batch = jax.device_put(_stack([examples[i] for i in rows]),
                             run["sharding"])
      out = jax.device_get(run["reduce"](run["teacher"], batch))
      for i in range(min(run["batch_size"], hi - start)):
        writer.write(_encode(out, i, run["vdtype"], run["idtype"]))
  finally:
    writer.close()
  os.replace(tmp, path)


def _manifest(teacher, examples, fields, reduce, k, padding, value_dtype,
              bucket_temperature, shard_size, batch_size, teacher_id) -> dict:
  """The run's manifest; the teacher's output shape read by tracing only."""
  first = _stack([examples[0]] * batch_size)
  logits = jax.eval_shape(
      lambda t, b: heads.to_logits(t(*fields.teacher_inputs_of(b))),
      teacher, first)
  teacher_v = int(logits.shape[-1])
  num_classes = teacher_v - padding
  topk._check_k(k, num_classes)  # pylint: disable=protected-access
  jax.eval_shape(reduce, teacher, first)  # Every other check, traced.
  n = len(examples)
  num_shards = math.ceil(n / shard_size)
  return {
      "format": FORMAT, "version": VERSION, "k": int(k),
      "value_dtype": value_dtype,
      "index_dtype": _index_dtype(num_classes).name,
      "vocab_size": num_classes, "teacher_vocab_size": teacher_v,
      "teacher_vocab_padding": padding,
      "bucket_temperature": bucket_temperature,
      "position_shape": list(logits.shape[1:-1]),
      "bytes_per_token": bytes_per_token(
          k, vocab_size=num_classes, value_dtype=value_dtype,
          bucket=bucket_temperature is not None),
      "num_examples": n, "shard_size": int(shard_size),
      "num_shards": num_shards,
      "records_per_shard": [min(shard_size, n - s * shard_size)
                            for s in range(num_shards)],
      "teacher_inputs": list(fields.teacher_input_names),
      "teacher": teacher_id if teacher_id is not None else (
          "sha256:" + teacher_hash(teacher)),
  }


def _check_sizes(n, shard_size, batch_size, devices, bucket_temperature):
  if n < 1:
    raise ValueError("the data has no examples.")
  for name, value in (("shard_size", shard_size), ("batch_size", batch_size)):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f"{name} must be a positive int, got {value!r}.")
  if batch_size % devices:
    raise ValueError(
        f"batch_size={batch_size} must be a multiple of this process's "
        f"{devices} devices (the teacher runs data parallel over them).")
  if bucket_temperature is not None:
    bucket_temperature = float(bucket_temperature)
    if not bucket_temperature > 0:
      raise ValueError(f"bucket_temperature must be > 0, got "
                       f"{bucket_temperature}.")
  return bucket_temperature


def write_targets(teacher, data, directory: str | os.PathLike, *, k: int,
                  shard_size: int = 1024, batch_size: int = 64,
                  fields: Optional[Fields] = None,
                  value_dtype: str = "float32",
                  bucket_temperature: Optional[float] = None,
                  teacher_vocab_padding: int = 0, mesh: Optional[Mesh] = None,
                  teacher_id: Optional[str] = None,
                  process_index: Optional[int] = None,
                  process_count: Optional[int] = None) -> dict:
  """Writes the teacher's top-k targets of ``data``, this process's shards.

  Every process of a run makes the same call; each writes shards
  ``s = p, p + P, ...`` (see the module docstring). Safe to call again
  after a kill: finished shards are skipped, half-written ones redone.

  Args:
    teacher: the frozen :class:`kdjax.Teacher` (logits, or a
      :class:`kdjax.heads.Hidden` turned into logits).
    data: the examples, indexable: a grain ``MapDataset`` or data source
      of example dicts (no batch axis), or a dict of arrays with a shared
      leading axis. Read in index order, never shuffled.
    directory: where the manifest and the shards go (created).
    k: classes kept per position.
    shard_size: examples per shard file (the unit of work and of resume).
    batch_size: examples per teacher call; a multiple of this process's
      device count.
    fields: which example fields are the teacher's inputs
      (``fields.teacher_input_names``; default ``Fields()``: ``"image"``).
    value_dtype: ``"float32"`` (exact), ``"bfloat16"`` or ``"float16"``.
    bucket_temperature: also store the tail logit at this temperature
      (for ``tail="bucket"`` at exactly this ``T``).
    teacher_vocab_padding: the teacher's trailing padding columns, dropped
      before the top k (:mod:`kdjax.vocab`).
    mesh: whose devices of this process run the teacher (default
      :func:`kdjax.mesh.default_mesh`).
    teacher_id: a string naming the teacher in the manifest instead of the
      SHA-256 of its params (which reads them all to the host once).
    process_index, process_count: which shards this call writes (default
      ``jax.process_index()`` of ``jax.process_count()``); e.g. to split
      the work over independent single-process jobs.

  Returns:
    ``{"written": [...], "skipped": [...]}``: this process's shard numbers.

  Raises:
    ManifestMismatchError: ``directory`` holds targets of another run.
    ValueError, TypeError: bad arguments, before the teacher runs.
  """
  fields = Fields() if fields is None else fields
  me = jax.process_index() if process_index is None else process_index
  procs = jax.process_count() if process_count is None else process_count
  if not 0 <= me < procs:
    raise ValueError(f"process_index must lie in [0, {procs}), got {me}.")
  examples = _examples(data)
  local = _local_mesh(mesh)
  bucket_temperature = _check_sizes(len(examples), shard_size, batch_size,
                                    local.devices.size, bucket_temperature)
  padding = vocab._check_padding(teacher_vocab_padding)  # pylint: disable=protected-access
  vdtype = _value_dtype(value_dtype)
  reduce = _reducer(k, padding, bucket_temperature, fields)
  manifest = _manifest(teacher, examples, fields, reduce, k, padding,
                       value_dtype, bucket_temperature, shard_size,
                       batch_size, teacher_id)
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  _check_or_write_manifest(directory, manifest)
  run = {"batch_size": batch_size, "reduce": reduce, "vdtype": vdtype,
         "idtype": np.dtype(manifest["index_dtype"]).newbyteorder("<"),
         "sharding": NamedSharding(local, P(mesh_lib.DATA)),
         "teacher": jax.device_put(teacher, NamedSharding(local, P()))}
  done = {"written": [], "skipped": []}
  for s in range(me, manifest["num_shards"], procs):
    path = directory / _shard_name(s, manifest["num_shards"])
    for leftover in directory.glob(f".{path.name}.tmp-*"):
      leftover.unlink()  # A killed run's half-written shard.
    if path.exists() and _num_records(path) == (
        manifest["records_per_shard"][s]):
      done["skipped"].append(s)
      continue
    lo = s * shard_size
    _write_shard(path, examples, lo, lo + manifest["records_per_shard"][s],
                 run)
    done["written"].append(s)
  return done


# -- reading ----------------------------------------------------------------


class TargetsSource:
  """The stored targets, by example index: a grain random-access source.

  ``source[i]`` is example ``i``'s ``{"topk_values": [*pos, k] float32,
  "topk_indices": [*pos, k] int32}`` (and ``"topk_tail": [*pos] float32``
  when written with a ``bucket_temperature``).

  Raises:
    FileNotFoundError: a shard is missing (the writing run has not
      finished: run :func:`write_targets` again).
  """

  def __init__(self, directory: str | os.PathLike):
    import grain  # pylint: disable=g-import-not-at-top
    self.directory = pathlib.Path(directory)
    self.manifest = m = read_manifest(directory)
    paths = [self.directory / _shard_name(s, m["num_shards"])
             for s in range(m["num_shards"])]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
      raise FileNotFoundError(
          f"{directory} lacks {len(missing)} of its {m['num_shards']} shards "
          f"({', '.join(missing[:3])}...): the run writing them has not "
          "finished; call kdjax.offline.write_targets again to complete it.")
    self._source = grain.sources.ArrayRecordDataSource([str(p) for p in paths])
    if len(self._source) != m["num_examples"]:
      raise ValueError(f"{directory}'s shards hold {len(self._source)} "
                       f"records, its manifest {m['num_examples']}.")
    pos = tuple(m["position_shape"])
    self._shapes = (pos + (m["k"],), pos)
    self._vdtype = _value_dtype(m["value_dtype"])
    self._idtype = np.dtype(m["index_dtype"]).newbyteorder("<")
    self.fields = ("topk_values", "topk_indices") + (
        ("topk_tail",) if m["bucket_temperature"] is not None else ())

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i: int) -> dict:
    return self.decode(self._source[i])

  def decode(self, record: bytes) -> dict:
    """One record's bytes -> its arrays (float32 values, int32 indices)."""
    shape, pos = self._shapes
    count = math.prod(shape)
    vbytes = count * self._vdtype.itemsize
    ibytes = count * self._idtype.itemsize
    out = {
        "topk_values": np.frombuffer(record, self._vdtype, count)
        .astype(np.float32).reshape(shape),
        "topk_indices": np.frombuffer(record, self._idtype, count, vbytes)
        .astype(np.int32).reshape(shape)}
    if "topk_tail" in self.fields:
      out["topk_tail"] = np.frombuffer(
          record, "<f4", math.prod(pos), vbytes + ibytes).astype(
              np.float32).reshape(pos)
    return out


class _Joined:
  """Example ``i`` of the data with example ``i``'s targets added."""

  def __init__(self, examples, targets: TargetsSource):
    self._examples, self._targets = examples, targets

  def __len__(self):
    return len(self._examples)

  def __getitem__(self, i):
    example = dict(self._examples[i])
    clash = sorted(set(example) & set(self._targets.fields))
    if clash:
      raise ValueError(f"the data's examples already hold {clash}, which "
                       "the offline targets would replace.")
    return {**example, **self._targets[i]}


def dataset(data, directory: str | os.PathLike) -> Any:
  """``grain.MapDataset`` of ``data``'s examples joined with their targets.

  Example ``i`` is ``data[i]`` plus :class:`TargetsSource` ``(directory)[i]``
  (aligned by index: shuffle and batch the joined dataset, never the data
  alone). Train with ``fit(state, None, ds.shuffle(seed).batch(B), spec=
  StepSpec("topk", fields=Fields(..., extra=("topk_values",
  "topk_indices"))))`` (``"topk_tail"`` too for ``tail="bucket"``), or the
  ``"chunked_topk"`` objective.

  Raises:
    ValueError: ``data`` has another number of examples than the targets.
  """
  import grain  # pylint: disable=g-import-not-at-top
  examples = _examples(data)
  targets = TargetsSource(directory)
  if len(examples) != len(targets):
    raise ValueError(f"data has {len(examples)} examples, the targets in "
                     f"{directory} {len(targets)}: they are aligned by "
                     "index, so they must come from the same dataset.")
  return grain.MapDataset.source(_Joined(examples, targets))
