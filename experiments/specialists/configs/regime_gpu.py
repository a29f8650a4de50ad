"""Section 5 in the paper's regime with a CNN generalist, for an accelerator.

  python -m experiments.specialists.main \
      --config=experiments/specialists/configs/regime_gpu.py \
      --workdir=runs/specialists_regime_gpu

The CPU config (regime_cpu.py) with a small CNN generalist
(``kdjax.paper.models.CNN``: conv 16 -> conv 32 -> dense 64, about 0.21M
parameters on 28x56 pairs; capacity limited on purpose), more fresh pairs
for everyone, and the three candidate families (rows/columns, spectral
clusters with 10 and 20 subsets). Specialists are the same CNN with
``k + 1`` outputs. experiments/mnist/gpu_session.sh runs it after the
paper config when SPECIALISTS_S (seconds) is set. Not yet run on an
accelerator (none was lent when it was written): its time is unmeasured.
"""

from experiments.specialists.configs import regime_cpu


def get_config():
  c = regime_cpu.get_config()
  c.generalist.model.kind = "cnn"
  c.generalist.model.features = (16, 32)
  c.generalist.model.dense = 64
  c.generalist.pairs_per_epoch = 100_000
  c.generalist.epochs = 20
  c.generalist.batch_size = 256
  c.generalist.lr = 1e-3
  c.specialists.families = ("rows_columns", "spectral_10", "spectral_20")
  c.specialists.pairs_per_epoch = 20_000
  c.specialists.epochs = 5
  c.specialists.batch_size = 256
  c.specialists.lr = 3e-4
  c.combine.num_steps = 250
  c.control.wide = True
  return c
