"""Trains the shipped MNIST teacher on CPU (the paper's recipe, short budget).

  python -m experiments.mnist.main \
      --config=experiments/mnist/configs/teacher_cpu.py --workdir=runs/teacher_cpu

784-1200-1200-10 with dropout 0.2/0.5, max-norm (squared length <= 15),
±2-pixel jitter, Nesterov SGD 0.1 with cosine decay, batch 100, on the 50k
training split. Expected wall time: about 53 minutes for 250 epochs on the 2-core CPU
(measured while other jobs shared it; 7-15 s per epoch). The parameters are written to
WORKDIR/teacher.msgpack with a .json beside it; the committed copy lives in
experiments/mnist/teacher/.
"""

from experiments.mnist.configs import default


def get_config():
  c = default.get_config()
  c.rows = ()
  c.teacher.epochs = 250
  c.teacher.eval_every = 25
  c.teacher.save_to = "teacher.msgpack"
  return c
