"""BatchNorm CNN teacher -> smaller BatchNorm CNN student on MNIST, flax.linen.

  python -m examples.bn_cnn_linen --out examples/results/bn_cnn_linen_cpu.json

The models are ordinary linen modules with ``nn.BatchNorm``; kdjax sees them
through ``kdjax.Student.from_linen(module, variables)``, which keeps the
``batch_stats`` collection in ``TrainState.model_state``: updated in training
(``mutable=["batch_stats"]``), read in evaluation, checkpointed, never in the
optimizer. The trained teacher becomes ``kdjax.Teacher.from_linen``, always
run in inference mode. Takes about 6-8 minutes on 2 CPU cores (``--tiny``:
seconds). The protocol is in ``examples/bn_common.py``.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

import kdjax
from examples import bn_common


class BNCNN(nn.Module):
  """``(conv3x3 -> BatchNorm -> relu -> avgpool2) x len(features) -> dense``."""
  features: Sequence[int]
  dense: int
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = bn_common.pixels(x)
    for f in self.features:
      x = nn.Conv(f, (3, 3), padding="SAME")(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      x = nn.avg_pool(nn.relu(x), (2, 2), strides=(2, 2))
    x = nn.relu(nn.Dense(self.dense)(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.num_classes, name="logits")(x)


TEACHER = BNCNN(features=(32, 64), dense=128)
STUDENT = BNCNN(features=(8, 16), dense=32)


def _student(module, seed: int) -> kdjax.Student:
  variables = module.init(jax.random.key(seed), jnp.zeros((1, 28, 28)))
  return kdjax.Student.from_linen(module, variables)


def main(argv=None) -> dict:
  args = bn_common.parse_args(
      argv, default_out="examples/results/bn_cnn_linen_cpu.json")
  return bn_common.run(
      args, framework="flax.linen",
      make_teacher=lambda seed: _student(TEACHER, 1000 + seed),
      make_student=lambda seed: _student(STUDENT, seed),
      to_teacher=lambda state: kdjax.Teacher.from_linen(TEACHER,
                                                        state.export()),
      description={"teacher": "BNCNN(features=(32, 64), dense=128)",
                   "student": "BNCNN(features=(8, 16), dense=32)"})


if __name__ == "__main__":
  main()
