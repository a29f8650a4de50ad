"""The table's student rows at a longer budget on the CPU (shipped teacher).

  python -m experiments.mnist.main \
      --config=experiments/mnist/configs/table_cpu.py --workdir=runs/table_cpu

Student alone and distilled at T=20 (the paper's rows), the same two on
±2-pixel jittered images (distilled from the teacher queried online on the
shifted images), omit-3 and only-7-and-8; 40 epochs each (only 7 and 8:
100), 3 seeds, last-epoch numbers. Expected wall time: about 21 minutes
(1275 s, results/table_cpu.json) on the 2-core CPU this project is
developed on. The recipe (alpha, optimiser)
is the one chosen on the validation split in
experiments/mnist/results/tuning_cpu.json.
"""

from experiments.mnist.configs import quick


def get_config():
  c = quick.get_config()
  c.rows = ("student_alone", "distilled_T20", "student_alone_jitter",
            "distilled_T20_jitter", "omit3", "only78")
  c.student.alone.epochs = 40
  c.student.distill.epochs = 40
  c.omit3.epochs = 40
  c.only78.epochs = 100
  return c
