"""Trains the shipped MNIST teacher on CPU (the paper's recipe, less dropout).

  python -m experiments.mnist.main \\
      --config=experiments/mnist/configs/teacher_cpu.py \\
      --workdir=runs/teacher_cpu

784-1200-1200-10 with max-norm (squared length <= 15), ±2-pixel jitter and
dropout 0.1 on the input, 0.25 hidden; Nesterov SGD 0.1 with cosine decay,
batch 100, 200 epochs on the 50k training split. Expected wall time: about
16 minutes on the 2-core CPU (4.5-5 s per epoch). The parameters are written
to WORKDIR/teacher.msgpack with a .json beside it; the committed copy lives
in experiments/mnist/teacher/.

Why not the paper's dropout (0.2 input, 0.5 hidden): at a CPU budget it
underfits. On the validation split (experiments/mnist/results/tuning_cpu.json)
the paper's rates gave 151 errors after 80 epochs and 117 after 250; at 100
epochs, no dropout gave 89 and 0.1/0.25 gave 82, and 0.1/0.25 for 200 epochs
is what is shipped. configs/default.py keeps the paper's rates for the
long GPU run.
"""

from experiments.mnist.configs import default


def get_config():
  c = default.get_config()
  c.rows = ()
  c.teacher.epochs = 200
  c.teacher.input_dropout = 0.1
  c.teacher.hidden_dropout = 0.25
  c.teacher.eval_every = 10
  c.teacher.save_to = "teacher.msgpack"
  return c
