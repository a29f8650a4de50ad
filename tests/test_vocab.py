"""Teacher vocabularies larger than the student's (kdjax.vocab's rule).

The rule: the teacher's last ``P`` columns (declared padding) are dropped
and its distribution renormalised over the student's ``V_s`` classes. Each
path (the divergences of kdjax.losses, kdjax.topk, kdjax.chunked, fit's
teacher) is checked against a float64 NumPy reference of that rule, with
padding columns that carry real mass (so that renormalising matters), and
every other mismatch must be refused naming both sizes.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kdjax
from kdjax import chunked, losses, topk, validate, vocab

VS, P = 7, 3  # student classes, teacher padding columns
T = 4.0


def _logits(seed=0, rows=5, pad_shift=1.5):
  """Student ``[rows, VS]`` and teacher ``[rows, VS + P]`` logits; the
  padding columns are shifted up so they hold ~half the teacher's mass."""
  rs = np.random.RandomState(seed)
  z = rs.randn(rows, VS).astype(np.float32) * 2
  v = rs.randn(rows, VS + P).astype(np.float32) * 2
  v[:, VS:] += pad_shift
  return z, v


# float64 references of the rule ----------------------------------------------


def _softmax(x, t=1.0):
  x = np.asarray(x, np.float64) / t
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def _kl(p, q):
  ratio = np.where(p > 0, np.log(np.where(p > 0, p, 1.0)) -
                   np.log(np.where(p > 0, q, 1.0)), 0.0)
  return np.sum(p * ratio, -1)


def _ref(name, z, v, t=T, beta=0.3, labels=None, alpha=0.4):
  p = _softmax(np.asarray(v, np.float64)[..., :VS], t)  # renormalised
  q = _softmax(z, t)
  if name == "forward":
    return t * t * _kl(p, q)
  if name == "reverse":
    return t * t * _kl(q, p)
  if name == "jsd":
    m = beta * p + (1 - beta) * q
    return t * t * (_kl(p, m) / (1 - beta) + _kl(q, m) / beta)
  if name == "soft_ce":
    return -np.sum(p * np.log(q), -1)
  if name == "logit_matching":
    d = np.asarray(z, np.float64) - np.asarray(v, np.float64)[..., :VS]
    d = d - d.mean(-1, keepdims=True)
    return 0.5 * np.sum(d * d, -1) / VS
  if name == "kd":
    ce = -np.log(_softmax(z)[np.arange(len(labels)), labels])
    return alpha * ce + (1 - alpha) * t * t * _kl(p, q)
  raise KeyError(name)


LABELS = np.array([0, 3, 6, 2, 1])
LOSSES = {
    "forward": lambda z, v, **kw: losses.distillation_loss(z, v, T, **kw),
    "reverse": lambda z, v, **kw: losses.reverse_distillation_loss(
        z, v, T, **kw),
    "jsd": lambda z, v, **kw: losses.generalized_jsd_loss(z, v, T, beta=0.3,
                                                          **kw),
    "soft_ce": lambda z, v, **kw: losses.soft_target_cross_entropy(
        z, v, T, **kw),
    "logit_matching": lambda z, v, **kw: losses.logit_matching_loss(z, v,
                                                                    **kw),
    "kd": lambda z, v, **kw: losses.kd_objective(
        z, v, LABELS, temperature=T, alpha=0.4, **kw),
}


# ----------------------------------------------------------------------------
# The divergences.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_padding_is_dropped_and_the_teacher_renormalised(name):
  z, v = _logits()
  got = LOSSES[name](z, v, teacher_vocab_padding=P)
  want = _ref(name, z, v, labels=LABELS)
  assert got.dtype == jnp.float32 and got.shape == (5,)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
  # The padding holds real mass here: keeping it would change the target.
  eps = np.asarray(vocab.padding_mass(v, VS, T), np.float64)
  p = _softmax(v, T)
  np.testing.assert_allclose(eps, p[:, VS:].sum(-1), rtol=1e-5)
  assert eps.min() > 0.2


def test_the_forward_gradient_is_t_times_q_minus_renormalised_p():
  z, v = _logits()
  g = jax.grad(lambda z: jnp.sum(losses.distillation_loss(
      z, v, T, teacher_vocab_padding=P)))(jnp.asarray(z))
  want = T * (_softmax(z, T) - _softmax(v[:, :VS], T))
  np.testing.assert_allclose(g, want, atol=2e-6)
  np.testing.assert_allclose(np.sum(g, -1), 0.0, atol=2e-6)


@pytest.mark.parametrize("t", [1.0, 20.0])
def test_t_squared_on_the_padded_path(t):
  z, v = _logits(pad_shift=0.0)
  got = losses.distillation_loss(z, v, t, teacher_vocab_padding=P)
  kl = _kl(_softmax(v[:, :VS], t), _softmax(z, t))
  np.testing.assert_allclose(got, t * t * kl, rtol=5e-4, atol=1e-7)
  if t > 1:
    assert np.all(np.abs(np.asarray(got) - kl) > 0.5 * t * t * kl)


def test_bf16_inputs_give_float32_losses():
  z, v = _logits()
  zb, vb = jnp.asarray(z, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16)
  for name in ("forward", "reverse", "jsd", "kd"):
    got = LOSSES[name](zb, vb, teacher_vocab_padding=P)
    assert got.dtype == jnp.float32, name
    want = _ref(name, np.asarray(zb, np.float64), np.asarray(vb, np.float64),
                labels=LABELS)  # the bf16 values, exactly, in float64
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)


@pytest.mark.integration
def test_minus_inf_and_masked_logits_stay_finite():
  z, v = _logits()
  v[:, VS:] = -np.inf  # padding masked the usual way
  v[0, 2] = -np.inf    # a masked real class of the teacher
  z[0, 2] = -np.inf    # and of the student, at the same class
  where = np.ones(VS, bool)
  where[5] = False
  for name in ("forward", "reverse", "jsd", "kd", "soft_ce"):
    fn = lambda z, name=name: jnp.sum(LOSSES[name](
        z, v, teacher_vocab_padding=P, where=where))
    value, g = jax.value_and_grad(fn)(jnp.asarray(z))
    assert np.isfinite(value), name
    assert np.all(np.isfinite(g)), name
  # With every padding column at -inf the rule changes nothing.
  z2, v2 = _logits()
  v2[:, VS:] = -np.inf
  np.testing.assert_allclose(
      losses.distillation_loss(z2, v2, T, teacher_vocab_padding=P),
      _ref("forward", z2, v2), rtol=2e-5)


def test_align_vocab_is_the_slice_and_refuses_every_other_mismatch():
  z, v = _logits()
  np.testing.assert_array_equal(vocab.align_vocab(v, VS, padding=P),
                                v[:, :VS])
  cases = [
      (dict(), r"teacher_logits have 10 classes and the student 7: if the "
       r"teacher's last 3 columns are vocabulary padding .* pass "
       r"teacher_vocab_padding=3"),
      (dict(teacher_vocab_padding=2), r"10 classes and the student 7: "
       r"teacher_vocab_padding=2 accounts for 2 of the 3 extra columns"),
      (dict(teacher_vocab_padding=True), r"must be an int >= 0"),
  ]
  for kw, match in cases:
    with pytest.raises(ValueError, match=match) as e:
      losses.distillation_loss(z, v, T, **kw)
    assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match=r"teacher_logits have 7 classes and "
                     r"the student 10: a teacher with fewer classes"):
    losses.distillation_loss(v, z, T)
  with pytest.raises(ValueError, match=r"7 classes and the student 7: "
                     r"teacher_vocab_padding=3"):
    losses.distillation_loss(z, z, T, teacher_vocab_padding=3)
  with pytest.raises(ValueError, match="same shape"):  # not a class axis
    losses.distillation_loss(z, v[:4], T, teacher_vocab_padding=P)


def test_the_check_runs_at_trace_time_before_compiling():
  z, v = _logits()
  spec = jax.ShapeDtypeStruct
  with pytest.raises(ValueError, match="teacher_vocab_padding=3"):
    jax.eval_shape(functools.partial(losses.distillation_loss,
                                     temperature=T),
                   spec((8, 4, VS), jnp.float32),
                   spec((8, 4, VS + P), jnp.bfloat16))
  out = jax.eval_shape(functools.partial(
      losses.distillation_loss, temperature=T, teacher_vocab_padding=P),
                       spec((8, 4, VS), jnp.float32),
                       spec((8, 4, VS + P), jnp.bfloat16))
  assert out.shape == (8, 4) and out.dtype == jnp.float32


# ----------------------------------------------------------------------------
# Top-k targets.
# ----------------------------------------------------------------------------


def test_topk_cache_of_a_padded_teacher_holds_student_classes():
  z, v = _logits()
  values, indices = topk.topk_targets(v, 4, teacher_vocab_padding=P)
  assert np.asarray(indices).max() < VS
  want_v, want_i = topk.topk_targets(v[:, :VS], 4)
  np.testing.assert_array_equal(indices, want_i)
  np.testing.assert_array_equal(values, want_v)
  cache = topk.topk_cache(v, 4, chunk_size=2, bucket_temperature=T,
                          teacher_vocab_padding=P)
  np.testing.assert_array_equal(cache["indices"], want_i)
  # The tail: the student's classes outside the top k, no padding mass.
  e = np.exp(np.asarray(v, np.float64)[:, :VS] / T)
  tail = e.sum(-1) - np.take_along_axis(e, np.asarray(want_i), -1).sum(-1)
  np.testing.assert_allclose(np.exp(cache["tail_logit"] / T), tail,
                             rtol=1e-5)


def test_topk_losses_follow_the_rule_against_float64():
  z, v = _logits()
  # k = V_s: the renormalised top-k loss is the full padded-rule loss.
  values, indices = topk.topk_targets(v, VS, teacher_vocab_padding=P)
  np.testing.assert_allclose(
      topk.topk_distillation_loss(z, values, indices, T),
      _ref("forward", z, v), rtol=2e-5, atol=2e-6)
  # k = 3, bucket mode at T: a KL over 3 classes + 1 bucket, in float64.
  k = 3
  values, indices = topk.topk_targets(v, k, teacher_vocab_padding=P)
  tl = topk.tail_logit(v, indices, T, teacher_vocab_padding=P)
  got = topk.topk_distillation_loss(z, values, indices, T, tail="bucket",
                                    tail_logit=tl)
  p, q = _softmax(v[:, :VS], T), _softmax(z, T)
  idx = np.asarray(indices)
  pb = np.concatenate([np.take_along_axis(p, idx, -1),
                       1 - np.take_along_axis(p, idx, -1).sum(-1,
                                                              keepdims=True)],
                      -1)
  qb = np.concatenate([np.take_along_axis(q, idx, -1),
                       1 - np.take_along_axis(q, idx, -1).sum(-1,
                                                              keepdims=True)],
                      -1)
  np.testing.assert_allclose(got, T * T * _kl(pb, qb), rtol=2e-5, atol=2e-6)
  assert got.dtype == jnp.float32


def test_a_topk_index_outside_the_students_classes_is_refused_or_nan():
  z, v = _logits()
  values, indices = topk.topk_targets(v, 4)  # padding NOT dropped
  bad = np.asarray(indices).max()
  assert bad >= VS
  with pytest.raises(ValueError, match=rf"topk_indices hold class {bad}, but "
                     rf"the student has {VS} classes .* "
                     r"teacher_vocab_padding=P") as e:
    topk.topk_distillation_loss(z, values, indices, T)
  assert "\n" not in str(e.value)
  loss = jax.jit(topk.topk_distillation_loss, static_argnums=3)
  out = np.asarray(loss(z, values, indices, T))
  rows = (np.asarray(indices) >= VS).any(-1)
  assert np.isnan(out[rows]).all() and np.isfinite(out[~rows]).all()
  good_v, good_i = topk.topk_targets(v, 4, teacher_vocab_padding=P)
  neg = np.asarray(good_i).copy()
  neg[0, 0] = -1  # would wrap around to class V - 1 without the rule
  out = np.asarray(loss(z, good_v, neg, T))
  assert np.isnan(out[0]) and np.isfinite(out[1:]).all()
  # Padding positions (where=False) may hold any index.
  ok = topk.topk_distillation_loss(z, values, indices, T,
                                   where=~rows)
  assert np.all(np.asarray(ok)[rows] == 0) and np.isfinite(ok).all()


# ----------------------------------------------------------------------------
# The chunked path.
# ----------------------------------------------------------------------------


def _heads(seed=0, n=10, d=4):
  rs = np.random.RandomState(seed)
  h_s = rs.randn(n, d).astype(np.float32)
  w_s = rs.randn(d, VS).astype(np.float32)
  h_t = rs.randn(n, d).astype(np.float32)
  w_t = rs.randn(d, VS + P).astype(np.float32)
  b_t = np.zeros(VS + P, np.float32)
  b_t[VS:] = 2.0  # padding with real mass
  weights = (rs.rand(n) > 0.3).astype(np.float32)
  return h_s, w_s, (h_t, w_t, b_t), weights


@pytest.mark.integration
@pytest.mark.parametrize("chunk_size", [3, None])
def test_chunked_drops_the_teacher_projections_padding_columns(chunk_size):
  h_s, w_s, teacher, weights = _heads()
  kw = dict(temperature=T, weights=weights, chunk_size=chunk_size)

  def loss(h, w):
    return chunked.chunked_distillation_loss(
        h, w, teacher=teacher, teacher_vocab_padding=P, **kw)

  value, (g_h, g_w) = jax.value_and_grad(loss, argnums=(0, 1))(h_s, w_s)
  z = h_s.astype(np.float64) @ w_s
  v = teacher[0].astype(np.float64) @ teacher[1] + teacher[2]
  per = _ref("forward", z, v)
  np.testing.assert_allclose(value, np.sum(weights * per) / weights.sum(),
                             rtol=2e-5)
  sliced = (teacher[0], teacher[1][:, :VS], teacher[2][:VS])
  want = jax.value_and_grad(
      lambda h, w: chunked.chunked_distillation_loss(h, w, teacher=sliced,
                                                     **kw),
      argnums=(0, 1))(h_s, w_s)
  np.testing.assert_allclose(value, want[0], rtol=1e-6)
  np.testing.assert_allclose(g_h, want[1][0], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(g_w, want[1][1], rtol=1e-5, atol=1e-7)
  assert value.dtype == jnp.float32


def test_chunked_refuses_other_mismatches_naming_both_sizes():
  h_s, w_s, teacher, _ = _heads()
  with pytest.raises(ValueError, match=r"the teacher's W_t columns have 10 "
                     r"classes and the student 7: .*teacher_vocab_padding=3"):
    chunked.chunked_distillation_loss(h_s, w_s, temperature=T,
                                      teacher=teacher)
  with pytest.raises(ValueError, match=r"have 7 classes and the student 10: "
                     r"a teacher with fewer classes"):
    chunked.chunked_distillation_loss(
        h_s, teacher[1], temperature=T, teacher=(h_s, w_s))
  values, indices = topk.topk_targets(
      h_s @ teacher[1] + teacher[2], 2)  # padding not dropped
  with pytest.raises(ValueError, match="topk_indices hold class"):
    chunked.chunked_distillation_loss(h_s, w_s, temperature=T,
                                      topk=(values, indices))
  with pytest.raises(ValueError, match="a top-k cache is built with the "
                     "padding dropped"):
    chunked.chunked_distillation_loss(h_s, w_s, temperature=T,
                                      topk=(values, indices),
                                      teacher_vocab_padding=P)


# ----------------------------------------------------------------------------
# fit's teacher.
# ----------------------------------------------------------------------------


class Net(nn.Module):
  """A linear classifier of ``classes`` outputs on flattened inputs."""
  classes: int

  @nn.compact
  def __call__(self, x, train=False):
    del train
    return nn.Dense(self.classes)(x.reshape(x.shape[0], -1))


def test_fit_names_the_fix_and_the_aligned_teacher_passes_its_checks():
  student_net, teacher_net = Net(VS), Net(VS + P)
  x = jnp.zeros((1, 8, 8))
  student = kdjax.Student.from_linen(student_net,
                                     student_net.init(jax.random.key(0), x))
  teacher = kdjax.Teacher.from_linen(teacher_net,
                                     teacher_net.init(jax.random.key(1), x))
  state = kdjax.TrainState.create(student, tx=optax.sgd(0.1),
                                  temperature=T, alpha=0.0)
  data = {"image": np.random.RandomState(0).rand(16, 8, 8).astype(np.float32),
          "label": np.zeros(16, np.int32)}
  spec = kdjax.StepSpec("kd")
  with pytest.raises(ValueError, match=r"teacher has 10 classes .* the "
                     r"student 7 .*kdjax.vocab.aligned_teacher\(teacher, 7, "
                     r"padding=3\)"):
    kdjax.fit(state, teacher, data, epochs=1, batch_size=8,
              rng=jax.random.key(0), spec=spec, progress=False)
  aligned = vocab.aligned_teacher(teacher, VS, padding=P)
  assert validate.check_inputs(state, aligned, data, spec)[1] == VS
  images = jnp.asarray(data["image"][:2])
  np.testing.assert_array_equal(aligned(images), teacher(images)[:, :VS])
  with pytest.raises(ValueError, match="teacher_vocab_padding=2 accounts"):
    validate.check_inputs(state, vocab.aligned_teacher(teacher, VS,
                                                       padding=2), data,
                          spec)


def test_fit_refuses_a_topk_cache_of_padded_classes_before_compiling(
    monkeypatch):
  net = Net(VS)
  x = jnp.zeros((1, 64))
  state = kdjax.TrainState.create(
      kdjax.Student.from_linen(net, net.init(jax.random.key(0), x)),
      tx=optax.sgd(0.1), temperature=T)
  _, v = _logits(rows=16)
  fields = kdjax.Fields(extra=("topk_values", "topk_indices"), labels=None,
                        weights="w")
  w = np.ones(16, np.float32)
  data = {"image": np.zeros((16, 64), np.float32), "w": w}
  spec = kdjax.StepSpec("topk", fields=fields)
  jit_calls = []
  real = jax.jit
  monkeypatch.setattr(jax, "jit", lambda *a, **k: jit_calls.append(a) or
                      real(*a, **k))
  values, indices = topk.topk_targets(v, 4)  # padding not dropped
  bad = {**data, "topk_values": np.asarray(values),
         "topk_indices": np.asarray(indices)}
  with pytest.raises(ValueError, match=rf"topk_indices hold class \d+, but "
                     rf"the student has {VS} classes"):
    kdjax.fit(state, None, bad, epochs=1, batch_size=8,
              rng=jax.random.key(0), spec=spec, progress=False)
  assert not jit_calls
  # Rows of weight 0 (padding) may hold anything.
  rows = (np.asarray(indices) >= VS).any(-1)
  validate.check_inputs(state, None, {**bad, "w": np.where(rows, 0.0, w)},
                        spec)
  values, indices = topk.topk_targets(v, 4, teacher_vocab_padding=P)
  assert validate.check_inputs(state, None, {
      **data, "topk_values": np.asarray(values),
      "topk_indices": np.asarray(indices)}, spec)[1] == VS
