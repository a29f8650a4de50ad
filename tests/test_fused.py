"""The fused chunked loss as an objective of fit (kdjax.fused, kdjax.heads).

Each hidden-state objective is checked against the logits objective it
stands for, on the same model (logits = hidden @ kernel + bias): loss,
metrics, gradients and params after a few steps, with padded positions
(garbage inputs and labels there), to float32 rounding. Tiny sizes.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import kdjax
from kdjax import heads, objectives
from kdjax import mesh as mesh_lib
from kdjax import step as train

B, L, F, V, K = 4, 6, 5, 13, 4
LR = 0.5
FIELDS = kdjax.Fields(inputs="x", labels="y", weights="mask")
TOPK = kdjax.Fields(inputs="x", labels="y", weights="mask",
                    extra=("topk_values", "topk_indices"))


class LM(nn.Module):
  """``x [B, L, F] -> logits [B, L, vocab]`` through a named head."""
  hidden: int = 8
  vocab: int = V

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    h = jnp.tanh(nn.Dense(self.hidden)(x))
    return nn.Dense(self.vocab, name="head")(h)


def _models(vocab=V, hidden=8, bias_fill=None):
  s_net, t_net = LM(hidden, vocab), LM(12, vocab)
  x0 = jnp.zeros((1, L, F))
  s_vars = s_net.init(jax.random.key(1), x0)
  t_vars = t_net.init(jax.random.key(2), x0)
  if bias_fill is not None:  # A vocabulary column masked with -inf.
    for v in (s_vars, t_vars):
      v["params"]["head"]["bias"] = v["params"]["head"]["bias"].at[
          bias_fill].set(-jnp.inf)
  return s_net, s_vars, t_net, t_vars


def _batch(seed=0, vocab=V, garbage=True):
  rs = np.random.RandomState(seed)
  x = rs.normal(size=(B, L, F)).astype(np.float32)
  mask = np.ones((B, L), np.float32)
  mask[0, 4:] = 0
  mask[2, 1:] = 0
  mask[3, 5] = 0
  if garbage:  # Padding holds garbage: it must count for nothing.
    x[mask == 0] = 1e4 * rs.normal(size=x[mask == 0].shape)
  y = rs.randint(0, vocab, (B, L)).astype(np.int32)
  y[y == 3] = 4  # Class 3 is the -inf column of the masked-vocabulary test.
  y[mask == 0] = -1  # A padding label may be anything.
  return {"x": x, "y": y, "mask": mask}


def _with_topk(batch, t_net, t_vars, k=K):
  values, indices = jax.lax.top_k(t_net.apply(t_vars, batch["x"]), k)
  return {**batch, "topk_values": np.asarray(values),
          "topk_indices": np.asarray(indices)}


def _state(student, **kw):
  kw.setdefault("temperature", 2.0)
  return train.TrainState.create(student, tx=optax.sgd(LR), **kw)


def _run(objective, hidden: bool, batch, *, steps=3, fields=FIELDS,
         teacher=True, models=None, **state_kw):
  s_net, s_vars, t_net, t_vars = models or _models()
  head = "head" if hidden else None
  student = kdjax.Student.from_linen(s_net, s_vars, head=head)
  t = (kdjax.Teacher.from_linen(t_net, t_vars, head=head) if teacher
       else None)
  step = jax.jit(train.make_train_step(objective, fields=fields))
  state = _state(student, **state_kw)
  history = []
  for i in range(steps):
    state, m = step(state, t, batch, jax.random.key(i))
    history.append(jax.device_get(m))
  return state, history


def _close(a, b, rtol=2e-5, atol=2e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                               atol=atol)


_slow = pytest.mark.integration  # Two compiles each (30 s on a busy CPU).
PAIRS = [
    ("kd", objectives.chunked(hard_labels=True, chunk_size=5)),
    pytest.param("kd", "chunked_kd", marks=_slow),  # One chunk of 24 rows.
    pytest.param("soft", objectives.chunked(chunk_size=5), marks=_slow),
    pytest.param("reverse_kl", objectives.chunked("reverse_kl", chunk_size=7),
                 marks=_slow),
    pytest.param("jsd", objectives.chunked("jsd", chunk_size=5), marks=_slow),
    pytest.param(objectives.with_hard_labels("jsd"),
                 objectives.chunked("jsd", hard_labels=True, chunk_size=5),
                 marks=_slow),
    ("topk", objectives.chunked(topk=True, chunk_size=5)),
]


@pytest.mark.parametrize("logits_obj,hidden_obj", PAIRS)
def test_hidden_objective_equals_logits_objective(logits_obj, hidden_obj):
  obj = objectives.get(hidden_obj)
  topk = obj.fn.topk
  models = _models()
  batch = _with_topk(_batch(), *models[2:]) if topk else _batch()
  kw = {"models": models, "fields": TOPK if topk else FIELDS,
        "teacher": not topk,
        # A schedule: the step evaluates it, the chunked loss traces it.
        "temperature": optax.linear_schedule(1.5, 4.0, 3)}
  if "alpha" in obj.hparams:
    kw["alpha"] = 0.3
  if "beta" in obj.hparams:
    kw["hparams"] = {"beta": 0.3}
  ref, h_ref = _run(logits_obj, False, batch, steps=2, **kw)
  out, h_out = _run(hidden_obj, True, batch, steps=2, **kw)
  for m_ref, m_out in zip(h_ref, h_out):
    assert m_out["loss"].dtype == np.float32 and np.isfinite(m_out["loss"])
    assert m_out["finite"] == 1.0
    for name in ("loss", "soft_loss", "hard_loss", "accuracy", "grad_norm",
                 "temperature"):
      if name in m_ref:
        np.testing.assert_allclose(m_out[name], m_ref[name], rtol=2e-5,
                                   atol=1e-6, err_msg=name)
    if "agreement" in m_ref:
      np.testing.assert_allclose(m_out["agreement"], m_ref["agreement"])
  _close(out.params, ref.params)
  assert int(out.step) == 2 and int(out.skipped) == 0


@pytest.mark.integration
def test_gradients_equal_and_padding_counts_nothing():
  """Step 1's gradient (SGD: (p0 - p1) / lr) equals the logits path's, and
  changing what padded positions hold changes nothing."""
  models = _models()
  p0 = models[1]["params"]
  grads = []
  for hidden, garbage in [(False, True), (True, True), (True, False)]:
    state, _ = _run("reverse_kl" if not hidden else
                    objectives.chunked("reverse_kl", chunk_size=5), hidden,
                    _batch(garbage=garbage), steps=1, models=models)
    grads.append(jax.tree.map(lambda a, b: (a - b) / LR, p0, state.params))
  assert float(optax.tree.norm(grads[0])) > 1e-3
  _close(grads[1], grads[0])
  _close(grads[2], grads[1], rtol=0, atol=0)


def test_masked_vocabulary_column_minus_inf_is_safe():
  models = _models(bias_fill=3)
  kw = dict(models=models, alpha=0.2, steps=2)
  ref, h_ref = _run("kd", False, _batch(), **kw)
  out, h_out = _run(objectives.chunked(hard_labels=True, chunk_size=5), True,
                    _batch(), **kw)
  assert all(m["finite"] == 1.0 for m in h_out)
  np.testing.assert_allclose([m["loss"] for m in h_out],
                             [m["loss"] for m in h_ref], rtol=2e-5)
  finite = jax.tree.map(lambda a: np.where(np.isfinite(a), a, 0), ref.params)
  _close(jax.tree.map(lambda a: np.where(np.isfinite(a), a, 0), out.params),
         finite)


@pytest.mark.integration
def test_bf16_hidden_states_give_a_float32_loss():
  batch = _batch()
  models = _models()
  f32, _ = _run("chunked_kd", True, batch, models=models, steps=1, alpha=0.5)
  student = kdjax.Student.from_linen(models[0], models[1], head="head")
  teacher = kdjax.Teacher.from_linen(models[2], models[3], head="head")
  step = jax.jit(train.make_train_step(
      "chunked_kd", fields=FIELDS,
      precision=kdjax.Precision(compute_dtype=jnp.bfloat16)))
  _, m = step(_state(student, alpha=0.5), teacher, batch, jax.random.key(0))
  _, m32 = _run("chunked_kd", True, batch, models=models, steps=1, alpha=0.5)
  assert m["loss"].dtype == jnp.float32 and m["soft_loss"].dtype == (
      jnp.float32)
  np.testing.assert_allclose(m["loss"], m32[0]["loss"], rtol=3e-2)
  del f32


def _np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_objective_matches_float64_reference_with_t_squared(divergence):
  """T^2 on every divergence, and the JSD's mixture in probability space."""
  rs = np.random.RandomState(3)
  n, d, t, beta = 9, 4, 3.0, 0.3
  hs, ht = rs.normal(size=(n, d)), rs.normal(size=(n, d))
  ws, wt = rs.normal(size=(d, V)), rs.normal(size=(d, V))
  bs = rs.normal(size=V)
  w = rs.uniform(size=n) * (rs.uniform(size=n) > 0.3)
  obj = objectives.chunked(divergence, chunk_size=4)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  total, terms = obj(heads.Hidden(f32(hs), f32(ws), f32(bs)),
                     heads.Hidden(f32(ht), f32(wt)), {}, f32(w),
                     **obj.select({"temperature": t, "beta": beta}))
  p, q = _np_softmax((ht @ wt) / t), _np_softmax((hs @ ws + bs) / t)
  kl = lambda a, b: np.sum(a * (np.log(a) - np.log(b)), -1)
  if divergence == "forward_kl":
    ell = t**2 * kl(p, q)
  elif divergence == "reverse_kl":
    ell = t**2 * kl(q, p)
  else:
    m = beta * p + (1 - beta) * q
    ell = t**2 * (beta * kl(p, m) + (1 - beta) * kl(q, m)) / (
        beta * (1 - beta))
  np.testing.assert_allclose(float(total), np.sum(w * ell), rtol=1e-5)
  np.testing.assert_allclose(float(terms["soft_loss"]), np.sum(w * ell),
                             rtol=1e-5)


@pytest.mark.integration
def test_nnx_student_and_teacher_with_a_head():
  class Net(nnx.Module):

    def __init__(self, hidden, rngs):
      self.body = nnx.Linear(F, hidden, rngs=rngs)
      self.lm_head = nnx.Linear(hidden, V, rngs=rngs)

    def __call__(self, x):
      return self.lm_head(jnp.tanh(self.body(x)))

  s, t = Net(8, nnx.Rngs(0)), Net(12, nnx.Rngs(1))
  batch = _batch()
  out = {}
  for obj, head in [("kd", None), ("chunked_kd", "lm_head")]:
    state = _state(kdjax.Student.from_nnx(s, head=head), alpha=0.4)
    teacher = kdjax.Teacher.from_nnx(t, head=head)
    step = jax.jit(train.make_train_step(obj, fields=FIELDS))
    for i in range(2):
      state, m = step(state, teacher, batch, jax.random.key(i))
    out[obj] = (state, m)
  np.testing.assert_allclose(out["chunked_kd"][1]["loss"],
                             out["kd"][1]["loss"], rtol=2e-5)
  _close(out["chunked_kd"][0].params, out["kd"][0].params)
  # The exported module is the plain model: its logits, no Hidden.
  model = out["chunked_kd"][0].export()
  assert model(jnp.zeros((1, L, F))).shape == (1, L, V)


def test_head_capture_and_its_errors():
  s_net, s_vars, _, _ = _models()
  x = jnp.ones((2, L, F))
  out, _ = kdjax.Student.from_linen(s_net, s_vars, head="head")(x)
  assert isinstance(out, heads.Hidden) and out.shape == (2, L, V)
  np.testing.assert_allclose(out.logits(), s_net.apply(s_vars, x), atol=1e-6)
  state = _state(kdjax.Student.from_linen(s_net, s_vars, head="head"))
  assert state.predict(x).shape == (2, L, V)  # predict gives logits.
  with pytest.raises(ValueError, match="never called"):
    kdjax.Student.from_linen(s_net, s_vars, head="nope")(x)

  class Capped(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return 30 * jnp.tanh(nn.Dense(V, name="head")(x) / 30)

  c_vars = Capped().init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="last operation"):
    kdjax.Student.from_linen(Capped(), c_vars, head="head")(x)

  class Tied(nn.Module):
    @nn.compact
    def __call__(self, tokens, train=False):
      embed = nn.Embed(V, 4, name="embed")
      return embed.attend(nn.Dense(4)(embed(tokens)))

  tokens = jnp.arange(6).reshape(1, 6)
  t_vars = Tied().init(jax.random.key(0), tokens)
  tied = kdjax.Teacher.from_linen(Tied(), t_vars, head="embed")(tokens)
  np.testing.assert_allclose(tied.logits(), Tied().apply(t_vars, tokens),
                             atol=1e-6)


def test_bad_combinations_are_refused_before_compiling():
  s_net, s_vars, t_net, t_vars = _models()
  batch = _batch()
  plain = kdjax.Student.from_linen(s_net, s_vars)
  hidden = kdjax.Student.from_linen(s_net, s_vars, head="head")
  teacher = kdjax.Teacher.from_linen(t_net, t_vars, head="head")
  step = train.make_train_step("chunked_soft", fields=FIELDS)
  with pytest.raises(ValueError, match="student returns logits.*head="):
    jax.eval_shape(step, _state(plain), teacher, batch, jax.random.key(0))
  with pytest.raises(ValueError, match="teacher returns logits"):
    jax.eval_shape(step, _state(hidden), kdjax.Teacher.from_linen(
        t_net, t_vars), batch, jax.random.key(0))
  cached = kdjax.Fields(inputs="x", labels="y", weights="mask")
  with pytest.raises(ValueError, match="not cached logits"):
    jax.eval_shape(train.make_train_step("chunked_soft", fields=cached),
                   _state(hidden), None,
                   {**batch, "teacher_logits": np.zeros((B, L, V))},
                   jax.random.key(0))
  with pytest.raises(ValueError, match="with_hard_labels|hard_labels=True"):
    objectives.with_hard_labels("chunked_soft")
  with pytest.raises(ValueError, match="top-k"):
    objectives.chunked("jsd", topk=True)
  # A logits objective takes a student built with a head (its logits).
  logits_step = train.make_train_step("soft", fields=FIELDS)
  _, m = jax.eval_shape(logits_step, _state(hidden), teacher, batch,
                        jax.random.key(0))
  assert m["loss"].shape == ()


def test_nonfinite_guard_skips_a_step():
  batch = _batch()
  batch["x"][1, 2, 0] = np.nan  # A real (weight 1) position.
  state, history = _run("chunked_kd", True, batch, steps=1, alpha=0.5)
  assert history[0]["finite"] == 0.0 and int(state.skipped) == 1
  _close(state.params, _models()[1]["params"], rtol=0, atol=0)


@pytest.mark.integration
def test_sweep_over_temperature_and_beta_under_vmap():
  s_net, s_vars, t_net, t_vars = _models()
  student = kdjax.Student.from_linen(s_net, s_vars, head="head")
  teacher = kdjax.Teacher.from_linen(t_net, t_vars, head="head")
  obj = objectives.chunked("jsd", chunk_size=5)
  members = [(1.0, 0.2), (4.0, 0.7)]
  tx = optax.sgd(LR)  # One optimizer: the members' static fields match.
  states = [train.TrainState.create(student, tx=tx, temperature=t,
                                    hparams={"beta": b})
            for t, b in members]
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *states)
  step = train.make_train_step(obj, fields=FIELDS)
  batch = _batch()
  _, m = jax.jit(jax.vmap(step, in_axes=(0, None, None, None)))(
      stacked, teacher, batch, jax.random.key(0))
  for i, s in enumerate(states):
    _, solo = jax.jit(step)(s, teacher, batch, jax.random.key(0))
    np.testing.assert_allclose(m["loss"][i], solo["loss"], rtol=2e-5)
  assert m["loss"][0] != m["loss"][1]


@pytest.mark.integration
@pytest.mark.parametrize("vocab,hidden,spec", [
    (64, 16, P(None, "fsdp")),   # Sharded along the vocabulary.
    (129, 16, P("fsdp")),        # V odd: sharded along the hidden axis.
])
def test_fsdp_sharded_head_equals_one_device(vocab, hidden, spec, tmp_path):
  models = _models(vocab=vocab, hidden=hidden)
  s_net, s_vars, t_net, t_vars = models
  rs = np.random.RandomState(0)
  n = 16
  data = {"x": rs.normal(size=(n, L, F)).astype(np.float32),
          "y": rs.randint(0, vocab, (n, L)).astype(np.int32),
          "mask": (rs.uniform(size=(n, L)) > 0.25).astype(np.float32)}
  student = kdjax.Student.from_linen(s_net, s_vars, head="head")
  teacher = kdjax.Teacher.from_linen(t_net, t_vars, head="head")
  out = {}
  for name, mesh in [("one", mesh_lib.make_mesh(devices=jax.devices()[:1])),
                     ("fsdp", mesh_lib.make_mesh(fsdp=8))]:
    out[name] = kdjax.fit(
        _state(student, alpha=0.3), teacher, data, epochs=1, batch_size=8,
        rng=jax.random.key(0), mesh=mesh, progress=False,
        spec=kdjax.StepSpec(objective=objectives.chunked(
            hard_labels=True, chunk_size=32), fields=FIELDS))
  state, history = out["fsdp"]
  assert state.params["head"]["kernel"].sharding.spec == spec
  np.testing.assert_allclose(history[-1]["loss"], out["one"][1][-1]["loss"],
                             rtol=2e-5)
  _close(state.params, out["one"][0].params)


@pytest.mark.integration
def test_fit_checkpoints_and_resumes_a_chunked_run(tmp_path):
  s_net, s_vars, t_net, t_vars = _models()
  student = kdjax.Student.from_linen(s_net, s_vars, head="head")
  teacher = kdjax.Teacher.from_linen(t_net, t_vars, head="head")
  rs = np.random.RandomState(1)
  data = {"x": rs.normal(size=(8, L, F)).astype(np.float32),
          "y": rs.randint(0, V, (8, L)).astype(np.int32),
          "mask": (rs.uniform(size=(8, L)) > 0.25).astype(np.float32)}
  spec = kdjax.StepSpec(objective="chunked_kd", fields=FIELDS)
  kw = dict(batch_size=4, rng=jax.random.key(0), progress=False, spec=spec)
  whole, _ = kdjax.fit(_state(student, alpha=0.3), teacher, data, epochs=2,
                       **kw)
  kdjax.fit(_state(student, alpha=0.3), teacher, data, epochs=1,
            checkpoint=tmp_path, **kw)
  resumed, _ = kdjax.fit(_state(student, alpha=0.3), teacher, data,
                         epochs=2, checkpoint=tmp_path, **kw)
  assert int(resumed.step) == 4
  _close(resumed.params, whole.params, rtol=1e-6, atol=1e-7)
  assert "chunked_kd" in (tmp_path / "fit.json").read_text()



def test_readme_lm_step_tables_come_from_the_committed_jsons():
  import importlib.util  # pylint: disable=g-import-not-at-top
  import pathlib  # pylint: disable=g-import-not-at-top
  root = pathlib.Path(__file__).resolve().parents[1]
  spec = importlib.util.spec_from_file_location(
      "bench_report", root / "benchmarks" / "report.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  readme = (root / "README.md").read_text()
  assert module.lm_step_table() in readme
  assert module.lm_step_memory_table() in readme
