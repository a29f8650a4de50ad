"""The divergence family by name in the train step (issue #14)."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import kdjax
from kdjax import losses, objectives, train
from kdjax.losses import topk


class TokenNet(nn.Module):
  width: int = 8

  @nn.compact
  def __call__(self, tokens, train=False):
    return nn.Dense(13)(nn.relu(nn.Embed(13, self.width)(tokens)))


@functools.cache
def _models():
  t_net, s_net = TokenNet(16), TokenNet(8)
  zeros = jnp.zeros((1, 6), jnp.int32)
  teacher = kdjax.Teacher.from_linen(t_net, t_net.init(jax.random.key(0),
                                                       zeros))
  student = kdjax.Student.from_linen(s_net, s_net.init(jax.random.key(1),
                                                       zeros))
  return teacher, student


def _batch():
  rs = np.random.RandomState(0)
  mask = (np.arange(6)[None] < rs.randint(1, 7, (8, 1))).astype(np.float32)
  tokens = rs.randint(0, 13, (8, 6)).astype(np.int32)
  return {"tokens": tokens, "targets": np.where(mask > 0, tokens, -1),
          "mask": mask}


FIELDS = kdjax.Fields(inputs="tokens", labels="targets", weights="mask")


def _weighted(per, w):
  return float(np.sum(np.asarray(per) * w) / np.sum(w))


@pytest.mark.parametrize("name, loss", [
    ("reverse_kl", lambda s, t: losses.reverse_distillation_loss(s, t, 3.0)),
    ("jsd", lambda s, t: losses.generalized_jsd_loss(s, t, 3.0, beta=0.5)),
])
@pytest.mark.integration
def test_divergences_by_name(name, loss):
  teacher, student = _models()
  state = train.TrainState.create(student, tx=optax.sgd(0.1),
                                  temperature=3.0, alpha=0.5)
  batch = _batch()
  _, m = jax.jit(train.make_train_step(name, fields=FIELDS))(
      state, teacher, batch, jax.random.key(0))
  s = state.predict(batch["tokens"])
  t = teacher(batch["tokens"])
  np.testing.assert_allclose(float(m["loss"]),
                             _weighted(loss(s, t), batch["mask"]), rtol=1e-5)
  assert float(m["finite"]) == 1.0


@pytest.mark.integration
def test_jsd_at_another_beta_and_its_endpoint():
  teacher, student = _models()
  state = train.TrainState.create(student, tx=optax.sgd(0.1),
                                  temperature=2.0)
  batch = _batch()
  step = jax.jit(train.make_train_step(objectives.jsd(0.0), fields=FIELDS))
  _, m = step(state, teacher, batch, jax.random.key(0))
  s, t = state.predict(batch["tokens"]), teacher(batch["tokens"])
  # beta = 0 is the forward KL (normalised JSD), never a silent 0.
  np.testing.assert_allclose(
      float(m["loss"]),
      _weighted(losses.distillation_loss(s, t, 2.0), batch["mask"]),
      rtol=1e-4)
  assert float(m["loss"]) > 0


@pytest.mark.integration
def test_topk_by_name_runs_no_teacher():
  teacher, student = _models()
  state = train.TrainState.create(student, tx=optax.sgd(0.1),
                                  temperature=2.0)
  batch = _batch()
  values, indices = topk.topk_targets(teacher(batch["tokens"]), 13)
  batch = {**batch, "topk_values": np.asarray(values),
           "topk_indices": np.asarray(indices)}
  fields = kdjax.Fields(inputs="tokens", labels="targets", weights="mask",
                        extra=("topk_values", "topk_indices"))
  _, m = jax.jit(train.make_train_step("topk", fields=fields))(
      state, None, batch, jax.random.key(0))
  s, t = state.predict(batch["tokens"]), teacher(batch["tokens"])
  # k = V: exactly the forward KL.
  np.testing.assert_allclose(
      float(m["loss"]),
      _weighted(losses.distillation_loss(s, t, 2.0), batch["mask"]),
      rtol=1e-5)
  with pytest.raises(ValueError, match="topk_values"):
    train.make_train_step("topk", fields=FIELDS)(
        state, None, _batch(), jax.random.key(0))
