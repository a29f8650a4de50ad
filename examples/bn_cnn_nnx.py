"""BatchNorm CNN teacher -> smaller BatchNorm CNN student on MNIST, flax.nnx.

  python -m examples.bn_cnn_nnx --out examples/results/bn_cnn_nnx_cpu.json

The models are ordinary ``nnx.Module``s with ``nnx.BatchNorm``, built with
their own ``nnx.Rngs``; the user never calls ``nnx.split``.
``kdjax.Student.from_nnx(model)`` splits a clone once into its graph, its
params and its other state (the batch statistics); the compiled step merges
them, runs the module in training mode and splits the updated statistics
back into ``TrainState.model_state``. ``state.export()`` returns the trained
module (eval mode), which ``kdjax.Teacher.from_nnx`` snapshots as the
frozen teacher. About 6-8 minutes on 2 CPU cores (``--tiny``: seconds). The
protocol is in ``examples/bn_common.py``.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
from flax import nnx

import kdjax
from examples import bn_common


class BNCNN(nnx.Module):
  """``(conv3x3 -> BatchNorm -> relu -> avgpool2) x len(features) -> dense``."""

  def __init__(self, features: Sequence[int], dense: int, *,
               rngs: nnx.Rngs, num_classes: int = 10):
    chans = [1, *features]
    self.convs = nnx.List([nnx.Conv(a, b, (3, 3), padding="SAME", rngs=rngs)
                           for a, b in zip(chans[:-1], chans[1:])])
    self.norms = nnx.List([nnx.BatchNorm(b, momentum=0.9, rngs=rngs)
                           for b in features])
    side = 28 // 2 ** len(features)
    self.hidden = nnx.Linear(side * side * features[-1], dense, rngs=rngs)
    self.logits = nnx.Linear(dense, num_classes, rngs=rngs)

  def __call__(self, x):
    x = bn_common.pixels(x)
    for conv, norm in zip(self.convs, self.norms):
      x = nn.avg_pool(nnx.relu(norm(conv(x))), (2, 2), strides=(2, 2))
    x = nnx.relu(self.hidden(x.reshape(x.shape[0], -1)))
    return self.logits(x)


def main(argv=None) -> dict:
  args = bn_common.parse_args(
      argv, default_out="examples/results/bn_cnn_nnx_cpu.json")
  return bn_common.run(
      args, framework="flax.nnx",
      make_teacher=lambda seed: kdjax.Student.from_nnx(
          BNCNN((32, 64), 128, rngs=nnx.Rngs(1000 + seed))),
      make_student=lambda seed: kdjax.Student.from_nnx(
          BNCNN((8, 16), 32, rngs=nnx.Rngs(seed))),
      to_teacher=lambda state: kdjax.Teacher.from_nnx(state.export()),
      description={"teacher": "BNCNN((32, 64), 128) (nnx)",
                   "student": "BNCNN((8, 16), 32) (nnx)"})


if __name__ == "__main__":
  main()
