"""§4 on MNIST at the paper's scale, for one GPU: ten 800-800 nets.

  python -m experiments.mnist.ensemble \
      --config=experiments/mnist/configs/ensemble_gpu.py \
      --workdir=runs/ensemble_gpu

Also run by experiments/mnist/gpu_session.sh (RUNS="... ensemble") when an
accelerator is lent. The protocol is experiments/mnist/ensemble.py's; the
CPU config (ensemble_cpu.py) is the same at a smaller scale.

* Members: 10 MLPs 784-800-800-10 (the paper's student size), seeds 0-9,
  60 epochs, regime (jitter / dropout) chosen on validation from 3
  candidates by 3-member ensembles.
* Convergence check by doubling the epochs: the control at budget 2 is
  seeds 0-4 of the members' recipe trained 120 epochs; the JSON's
  ``control_60ep`` (members 0-4) against ``control_120ep`` says whether a
  member was still improving.
* T in {2, 4, 8} x alpha in {0.1, 0.5} on validation (seed 0); distilled
  at 60 and 120 epochs, 5 seeds paired with members 0-4; the coverage arm
  with the members on 25k of the 50k training images.

Expected wall time: not yet measured on a GPU (no accelerator was lent to
the session that wrote it). About 135 800-800 net-trainings of 60 epochs'
worth (with the 10-net teacher's forward passes in the students' steps);
on the 2-core CPU this is a day: use ensemble_cpu.py there.
"""

from experiments.mnist.configs import ensemble_cpu


def get_config():
  c = ensemble_cpu.get_config()
  e = c.ensemble
  e.width = 800
  e.epochs = 60
  e.regimes = ((2, 0.0, 0.0), (2, 0.2, 0.5), (0, 0.2, 0.5))
  e.regime_members = 3
  e.grid_temperatures = (2.0, 4.0, 8.0)
  e.grid_alphas = (0.1, 0.5)
  e.seeds = (0, 1, 2, 3, 4)
  e.coverage.part = 25_000
  e.bootstrap_samples = 5000
  return c
