"""Offline top-k teacher targets of a corpus (kdjax.offline; issue 22.3)."""

import functools
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest

import kdjax
from kdjax import offline
from kdjax.losses import topk

V, PAD, L, N, K = 13, 2, 6, 20, 4


class TokenNet(nn.Module):
  vocab: int = V
  width: int = 8

  @nn.compact
  def __call__(self, tokens, train=False):
    return nn.Dense(self.vocab)(nn.relu(nn.Embed(11, self.width)(tokens)))


@functools.cache
def _teacher(seed=0):
  net = TokenNet(V, 16)
  variables = net.init(jax.random.key(seed), jnp.zeros((1, L), jnp.int32))
  return kdjax.Teacher.from_linen(net, variables)


def _data():
  rs = np.random.RandomState(0)
  return {"tokens": rs.randint(0, 11, (N, L)).astype(np.int32),
          "targets": rs.randint(0, 11, (N, L)).astype(np.int32)}


FIELDS = kdjax.Fields(inputs="tokens", labels="targets")


def _write(d, **kw):
  args = {"k": K, "shard_size": 8, "batch_size": 4, "fields": FIELDS,
          **kw}
  return offline.write_targets(_teacher(), _data(), d, **args)


def _live(k=K, padding=0, bucket=None):
  logits = _teacher()(_data()["tokens"])
  values, indices = topk.topk_targets(logits, k,
                                      teacher_vocab_padding=padding)
  tail = None if bucket is None else topk.tail_logit(
      logits, indices, bucket, teacher_vocab_padding=padding)
  return np.asarray(values), np.asarray(indices), tail


def _read(d):
  source = offline.TargetsSource(d)
  rows = [source[i] for i in range(len(source))]
  return {n: np.stack([r[n] for r in rows]) for n in rows[0]}


def test_stored_targets_equal_live_topk_exactly(tmp_path):
  done = _write(tmp_path, teacher_vocab_padding=PAD, bucket_temperature=2.0)
  assert done == {"written": [0, 1, 2], "skipped": []}
  got = _read(tmp_path)
  values, indices, tail = _live(padding=PAD, bucket=2.0)
  np.testing.assert_array_equal(got["topk_values"], values)
  np.testing.assert_array_equal(got["topk_indices"], indices)
  np.testing.assert_array_equal(got["topk_tail"], np.asarray(tail))
  assert got["topk_indices"].dtype == np.int32
  assert got["topk_indices"].max() < V - PAD
  m = offline.read_manifest(tmp_path)
  assert (m["k"], m["vocab_size"], m["teacher_vocab_size"],
          m["teacher_vocab_padding"], m["records_per_shard"],
          m["position_shape"]) == (K, V - PAD, V, PAD, [8, 8, 4], [L])
  assert m["teacher"].startswith("sha256:")


def test_bytes_per_token_as_stated(tmp_path):
  _write(tmp_path, value_dtype="bfloat16", bucket_temperature=1.0)
  assert offline.bytes_per_token(
      K, vocab_size=V, value_dtype="bfloat16", bucket=True) == K * 4 + 4
  assert offline.bytes_per_token(128, vocab_size=32_000,
                                 value_dtype="bfloat16") == 512
  assert offline.bytes_per_token(128, vocab_size=65_537) == 1024
  import grain  # pylint: disable=g-import-not-at-top
  paths = sorted(str(p) for p in tmp_path.glob("shard-*.array_record"))
  records = grain.sources.ArrayRecordDataSource(paths)
  assert len(records) == N
  assert {len(records[i]) for i in range(N)} == {L * (K * 4 + 4)}
  assert offline.read_manifest(tmp_path)["bytes_per_token"] == K * 4 + 4
  got = _read(tmp_path)
  values, indices, _ = _live()
  # bfloat16 values: the live ones rounded to nearest; indices exact.
  np.testing.assert_array_equal(
      got["topk_values"],
      values.astype(ml_dtypes.bfloat16).astype(np.float32))
  np.testing.assert_array_equal(got["topk_indices"], indices)


def test_resume_skips_finished_shards_and_redoes_half_written(tmp_path):
  _write(tmp_path)
  shards = sorted(tmp_path.glob("shard-*.array_record"))
  assert len(shards) == 3
  mtimes = [p.stat().st_mtime_ns for p in shards]
  # A killed run: shard 1 was being written (a temporary file), not renamed.
  shards[1].rename(tmp_path / f".{shards[1].name}.tmp-999")
  (tmp_path / f".{shards[1].name}.tmp-999").write_bytes(b"half")
  assert _write(tmp_path) == {"written": [1], "skipped": [0, 2]}
  assert [p.stat().st_mtime_ns for p in (shards[0], shards[2])] == [
      mtimes[0], mtimes[2]]
  assert not list(tmp_path.glob(".*tmp*"))
  np.testing.assert_array_equal(_read(tmp_path)["topk_indices"], _live()[1])
  # Finished: nothing recomputed.
  assert _write(tmp_path) == {"written": [], "skipped": [0, 1, 2]}


def test_mismatched_manifest_refused(tmp_path):
  _write(tmp_path)
  before = (tmp_path / "manifest.json").read_text()
  with pytest.raises(offline.ManifestMismatchError, match=r"k: 4 there, 3"):
    _write(tmp_path, k=3)
  other = _teacher(1)
  with pytest.raises(offline.ManifestMismatchError, match="teacher:"):
    offline.write_targets(other, _data(), tmp_path, k=K, shard_size=8,
                          batch_size=4, fields=FIELDS)
  assert (tmp_path / "manifest.json").read_text() == before
  assert json.loads(before)["version"] == offline.VERSION


def test_processes_write_round_robin_shards(tmp_path):
  assert _write(tmp_path, process_index=1, process_count=2) == {
      "written": [1], "skipped": []}
  with pytest.raises(FileNotFoundError, match="has not finished"):
    offline.TargetsSource(tmp_path)
  assert _write(tmp_path, process_index=0, process_count=2) == {
      "written": [0, 2], "skipped": []}
  np.testing.assert_array_equal(_read(tmp_path)["topk_values"], _live()[0])


def test_all_devices_data_parallel(tmp_path):
  mesh = kdjax.mesh.make_mesh()
  assert mesh.devices.size == 8
  with pytest.raises(ValueError, match="multiple of this process's 8"):
    _write(tmp_path, mesh=mesh)
  _write(tmp_path, mesh=mesh, batch_size=8)
  got = _read(tmp_path)
  values, indices, _ = _live()
  np.testing.assert_array_equal(got["topk_values"], values)
  np.testing.assert_array_equal(got["topk_indices"], indices)


def test_reader_checks_alignment(tmp_path):
  _write(tmp_path)
  with pytest.raises(ValueError, match="data has 19 examples"):
    offline.dataset({n: a[:19] for n, a in _data().items()}, tmp_path)
  with pytest.raises(FileNotFoundError, match="no offline targets"):
    offline.TargetsSource(tmp_path / "nothing")


def test_fit_from_reader_equals_fit_from_live_targets(tmp_path):
  _write(tmp_path)
  net = TokenNet(V, 8)
  student = kdjax.Student.from_linen(
      net, net.init(jax.random.key(2), jnp.zeros((1, L), jnp.int32)))
  fields = kdjax.Fields(inputs="tokens", labels="targets",
                        extra=("topk_values", "topk_indices"))
  spec = kdjax.StepSpec("topk", fields=fields)

  def run(data):
    state = kdjax.TrainState.create(student, tx=optax.sgd(0.5),
                                    temperature=2.0)
    state, history = kdjax.fit(state, None, data, epochs=1,
                               rng=jax.random.key(0), spec=spec,
                               progress=False)
    return state.params, history[-1]["loss"]

  from_disk = offline.dataset(_data(), tmp_path).batch(4)
  values, indices, _ = _live()
  live = [{**{n: a[i:i + 4] for n, a in _data().items()},
           "topk_values": values[i:i + 4], "topk_indices": indices[i:i + 4]}
          for i in range(0, N, 4)]
  params, loss = run(from_disk)
  params_live, loss_live = run(live)
  assert loss == pytest.approx(loss_live, rel=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6,
                                                       atol=1e-7),
               params, params_live)
  assert not np.allclose(params["Dense_0"]["kernel"],
                         student.params["Dense_0"]["kernel"])


_KILLED_RUN = r"""
import os, sys
import numpy as np, jax.numpy as jnp
import kdjax
from kdjax import offline

w = np.random.RandomState(0).randn(11, 13).astype(np.float32)
teacher = kdjax.Teacher.from_fn(lambda w, x: jnp.take(w, x, axis=0), w)
tokens = np.random.RandomState(1).randint(0, 11, (20, 6)).astype(np.int32)

class Dying:  # Killed (no cleanup at all) reading example 12, in shard 1.
  def __len__(self):
    return 20
  def __getitem__(self, i):
    if i == 12:
      os._exit(3)
    return {"tokens": tokens[i]}

offline.write_targets(teacher, Dying(), sys.argv[1], k=4, shard_size=8,
                      batch_size=4, fields=kdjax.Fields(inputs="tokens"))
"""


@pytest.mark.integration
def test_killed_run_resumes_without_recomputing(tmp_path):
  proc = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(tmp_path)],
                        capture_output=True, text=True, timeout=300,
                        env={**os.environ,
                             "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 3, proc.stderr
  finished = sorted(p.name for p in tmp_path.glob("shard-*"))
  assert finished == ["shard-00000-of-00003.array_record"]
  assert len(list(tmp_path.glob(".shard-00001-of-00003*.tmp-*"))) == 1
  mtime = (tmp_path / finished[0]).stat().st_mtime_ns
  w = np.random.RandomState(0).randn(11, 13).astype(np.float32)
  teacher = kdjax.Teacher.from_fn(lambda w, x: jnp.take(w, x, axis=0), w)
  tokens = np.random.RandomState(1).randint(0, 11, (20, 6)).astype(np.int32)
  done = offline.write_targets(teacher, {"tokens": tokens}, tmp_path, k=4,
                               shard_size=8, batch_size=4,
                               fields=kdjax.Fields(inputs="tokens"))
  assert done == {"written": [1, 2], "skipped": [0]}
  assert (tmp_path / finished[0]).stat().st_mtime_ns == mtime
  assert not list(tmp_path.glob(".*tmp*"))
  got = _read(tmp_path)
  values, indices = topk.topk_targets(w[tokens], 4)
  np.testing.assert_array_equal(got["topk_values"], np.asarray(values))
  np.testing.assert_array_equal(got["topk_indices"], np.asarray(indices))


_PROCESS = r"""
import sys
import numpy as np, jax.numpy as jnp
from kdjax import distributed
port, pid, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
distributed.initialize(f"localhost:{port}", 2, pid)
import jax
import kdjax
from kdjax import offline
assert jax.process_count() == 2 and len(jax.local_devices()) == 2
w = np.random.RandomState(0).randn(11, 13).astype(np.float32)
teacher = kdjax.Teacher.from_fn(lambda w, x: jnp.take(w, x, axis=0), w)
tokens = np.random.RandomState(1).randint(0, 11, (20, 6)).astype(np.int32)
done = offline.write_targets(teacher, {"tokens": tokens}, out, k=4,
                             shard_size=6, batch_size=4,
                             fields=kdjax.Fields(inputs="tokens"))
print("DONE", done, flush=True)
"""


def _free_port():
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.integration
def test_two_processes_write_their_own_shards(tmp_path):
  env = {k: v for k, v in os.environ.items()
         if k.lower() not in ("http_proxy", "https_proxy", "all_proxy",
                              "grpc_proxy")}
  env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-c", _PROCESS, str(port), str(i), str(tmp_path)],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  try:
    outs = [p.communicate(timeout=300)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  assert [p.returncode for p in procs] == [0, 0], outs
  assert "DONE {'written': [0, 2], 'skipped': []}" in outs[0], outs[0]
  assert "DONE {'written': [1, 3], 'skipped': []}" in outs[1], outs[1]
  w = np.random.RandomState(0).randn(11, 13).astype(np.float32)
  tokens = np.random.RandomState(1).randint(0, 11, (20, 6)).astype(np.int32)
  values, indices = topk.topk_targets(w[tokens], 4)
  got = _read(tmp_path)
  np.testing.assert_array_equal(got["topk_values"], np.asarray(values))
  np.testing.assert_array_equal(got["topk_indices"], np.asarray(indices))


class HeadLM(nn.Module):
  """Tokens -> logits through a named head (for the chunked objective)."""

  @nn.compact
  def __call__(self, tokens, train=False):
    h = jnp.tanh(nn.Embed(11, 8)(tokens))
    return nn.Dense(V - PAD, name="head")(h)


@pytest.mark.integration  # ~20 s on the shared CPU (the chunked compile).
def test_chunked_topk_bucket_trains_from_reader(tmp_path):
  _write(tmp_path, teacher_vocab_padding=PAD, bucket_temperature=2.0)
  batch = offline.dataset(_data(), tmp_path).batch(8)[0]
  assert sorted(batch) == ["targets", "tokens", "topk_indices", "topk_tail",
                           "topk_values"]
  net = HeadLM()
  variables = net.init(jax.random.key(3), jnp.zeros((1, L), jnp.int32))
  state = kdjax.TrainState.create(
      kdjax.Student.from_linen(net, variables, head="head"),
      tx=optax.sgd(0.5), temperature=2.0)
  fields = kdjax.Fields(inputs="tokens", labels="targets",
                        extra=offline.TargetsSource(tmp_path).fields)
  step = jax.jit(kdjax.make_train_step(
      kdjax.objectives.chunked(topk=True, tail="bucket", chunk_size=16),
      fields=fields))
  _, m = step(state, None, batch, jax.random.key(0))
  values, indices, tail = _live(padding=PAD, bucket=2.0)
  z = net.apply(variables, batch["tokens"])
  want = topk.topk_distillation_loss(z, values[:8], indices[:8], 2.0,
                                     tail="bucket", tail_logit=tail[:8])
  np.testing.assert_allclose(float(m["loss"]), float(jnp.mean(want)),
                             rtol=1e-5)
