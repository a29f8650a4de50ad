"""A tiny resumable distillation run, used by test_fit.py as a subprocess.

  python tests/fit_script.py WORKDIR EPOCHS [SLEEP_PER_EPOCH]

Prints ``DONE <params_sha256> <step>`` at the end.
"""
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from kdjax import preprocess  # noqa: E402
from kdjax import trainer as fit_lib  # noqa: E402
from kdjax.paper.provenance import params_sha256  # noqa: E402
from kdjax.teacher import Teacher  # noqa: E402
from kdjax.train import TrainState  # noqa: E402


class Net(nn.Module):
  width: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, *, train=False):
    x = preprocess.scale_pixels(x).reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.width)(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return nn.Dense(10, name="logits")(x)


def make_run():
  teacher_net, student_net = Net(48), Net(16, dropout=0.3)
  teacher = Teacher.from_linen(
      teacher_net, teacher_net.init(jax.random.key(1), jnp.zeros((1, 8, 8))))
  params = student_net.init(jax.random.key(2), jnp.zeros((1, 8, 8)))["params"]
  apply = lambda p, x, train, rng: student_net.apply(
      {"params": p}, x, train=train, rngs={"dropout": rng})
  state = TrainState.create(apply_fn=apply, params=params,
                            tx=optax.adam(1e-2), temperature=4.0, alpha=0.1)
  rs = np.random.RandomState(0)
  data = {"image": rs.randint(0, 256, (256, 8, 8)).astype(np.uint8),
          "label": rs.randint(0, 10, (256,)).astype(np.int32)}
  return state, teacher, data


def main():
  workdir, epochs = sys.argv[1], int(sys.argv[2])
  pause = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
  state, teacher, data = make_run()

  def eval_fn(_):
    time.sleep(pause)
    return {}

  state, _ = fit_lib.fit(state, teacher, data, epochs=epochs, batch_size=32,
                         rng=jax.random.key(0), workdir=workdir,
                         run_config={"script": "fit_script"},
                         eval_fn=eval_fn, eval_every=1, progress=False)
  print("DONE", params_sha256(state.params), int(state.step), flush=True)


if __name__ == "__main__":
  main()
