"""§4 on MNIST: ten 800-800 nets, their ensemble, and the ensemble distilled.

  python -m experiments.mnist.ensemble \
      --config=experiments/mnist/configs/ensemble_cpu.py \
      --workdir=runs/ensemble_cpu

Trains 10 members (800-800 MLPs on hard labels, the student-alone recipe of
configs/quick.py: Nesterov SGD lr 0.1, 12 epochs) as one vmapped program
differing only by seed, combines them (mean of logits; arithmetic mean of
probabilities), picks the distillation temperature and alpha on the
validation split (seed 0, a 2 x 2 grid trained as one vmapped program),
then distils the mean-logits ensemble into 3 seeds of one 800-800 net at a
member's budget. The student-alone row is members 0-2 (same recipe and
budget; the distilled seeds start from the same initialisations).

Measured wall time: 1700 s (28 min) on the project's 2-core CPU while it
was shared with other runs (load average 10-13; this job got 32% of the
CPU, 549 s of user time: results/ensemble_cpu.json); on an idle machine
that is roughly 5-10 minutes (not measured). 17 net-trainings of 12 epochs:
10 members, 4 grid points, 3 distilled seeds.
"""

import ml_collections

from experiments.mnist.configs import quick


def get_config():
  c = quick.get_config()
  c.rows = ()  # The MNIST table's rows are not run by ensemble.py.
  c.ensemble = ml_collections.ConfigDict()
  c.ensemble.num_members = 10
  c.ensemble.width = 800
  c.ensemble.epochs = 12  # = quick.py's student.alone.epochs
  # The members' optimizer is quick.py's student.alone.optimizer; the
  # distilled net uses the same one (same budget, same optimizer).
  c.ensemble.grid_temperatures = (4.0, 20.0)
  c.ensemble.grid_alphas = (0.1, 0.7)
  c.ensemble.grid_seed = 0
  c.ensemble.distill_seeds = (0, 1, 2)
  # student_alone: these members (same recipe and budget as one member).
  c.ensemble.alone_members = (0, 1, 2)
  return c
