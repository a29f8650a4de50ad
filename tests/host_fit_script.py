"""A host-data distillation run for the SIGKILL test (tests/test_host_fit.py).

  python tests/host_fit_script.py WORKDIR KIND EPOCHS SLEEP

KIND is the host source: ``iter`` (a grain IterDataset: its iterator state
is checkpointed) or ``fn`` (a function epoch -> list of batches: resumed by
replaying the epoch's order). SLEEP slows each example in the pipeline so
that a kill lands mid-epoch. Prints ``DONE <params sha256> <step>``.
"""

import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import grain  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import kdjax  # noqa: E402
from kdjax.paper import models  # noqa: E402
from kdjax.paper.provenance import params_sha256  # noqa: E402

BATCH, NUM, STEPS = 32, 256, 8


class Source:
  """Random-access examples (what grain.MapDataset.source expects)."""

  def __init__(self):
    rs = np.random.RandomState(0)
    self.images = rs.randint(0, 256, (NUM, 8, 8)).astype(np.uint8)
    self.labels = rs.randint(0, 10, (NUM,)).astype(np.int32)

  def __len__(self):
    return NUM

  def __getitem__(self, i):
    return {"image": self.images[i], "label": self.labels[i]}


def make_run():
  teacher_net = models.MLP((48,))
  student_net = models.MLP((16,), hidden_dropout=0.3)
  teacher = kdjax.Teacher.from_linen(teacher_net, {
      "params": models.init_params(teacher_net, jax.random.key(1), (1, 8, 8))})
  student = kdjax.Student.from_linen(student_net, {
      "params": models.init_params(student_net, jax.random.key(2), (1, 8, 8))})
  state = kdjax.TrainState.create(student, tx=optax.adam(1e-2),
                                  temperature=4.0, alpha=0.1)
  return state, teacher


def source(kind, sleep):
  slow = lambda x: (time.sleep(sleep), x)[1]
  base = grain.MapDataset.source(Source()).seed(3)
  if kind == "iter":
    return (base.shuffle().map(slow).batch(BATCH, drop_remainder=True)
            .repeat(None).to_iter_dataset())
  def epoch_batches(epoch):
    order = np.random.RandomState(epoch).permutation(NUM)
    src = Source()
    return [{"image": src.images[order[i:i + BATCH]],
             "label": src.labels[order[i:i + BATCH]]}
            for i in range(0, NUM, BATCH)]

  def fn(epoch):
    for b in epoch_batches(epoch):
      yield slow(b)
  return lambda epoch: list(fn(epoch))


def main():
  workdir, kind, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
  sleep = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
  state, teacher = make_run()
  state, _ = kdjax.fit(state, teacher, source(kind, sleep), epochs=epochs,
                       rng=jax.random.key(0), workdir=workdir,
                       steps_per_epoch=STEPS, block_steps=2,
                       checkpoint_every_steps=4, progress=False)
  print("DONE", params_sha256(state.params), int(state.step), flush=True)


if __name__ == "__main__":
  main()
