"""Section 5 in the paper's regime on the 100-class MNIST pairs, CPU.

  python -m experiments.specialists.main \
      --config=experiments/specialists/configs/regime_cpu.py \
      --workdir=runs/specialists_regime

A 64-unit MLP generalist (deliberately small: 107k parameters for 100
classes) trained on pairs drawn afresh every epoch from the training
split's images; 20 dustbin specialists as big as the generalist (the
chosen family's), the §6 soft specialists, a compute-matched generalist
and a wide (parameter- and compute-matched) one; 3 seeds, every choice on
the validation pairs with seed 0. See experiments/specialists/regime.py.
Time: 1501 s (25 minutes) on the 2-core CPU while it was shared with
other jobs (load average 20-38; results/regime_cpu.json), so under 30
minutes on the idle machine (not measured idle). The CI test runs a tiny
version (tests/test_specialists_regime.py).
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.pipeline = "regime"
  c.data_dir = ""  # "" -> $KDJAX_DATA_DIR
  c.num_val = 10_000
  c.split_seed = 0
  c.pair_seed = 0
  c.val_pairs = 10_000
  c.test_pairs = 10_000
  c.seeds = (0, 1, 2)  # the first seed chooses every setting
  c.cpu_note = ""  # free text recorded in the JSON (e.g. a shared CPU)

  c.generalist = ml_collections.ConfigDict()
  c.generalist.model = ml_collections.ConfigDict()
  c.generalist.model.kind = "mlp"
  c.generalist.model.hidden = (64,)
  c.generalist.model.features = (16, 32)  # cnn only
  c.generalist.model.dense = 64  # cnn only
  c.generalist.pairs_per_epoch = 50_000  # drawn afresh each epoch
  c.generalist.epochs = 6
  c.generalist.batch_size = 128
  c.generalist.lr = 3e-3

  c.specialists = ml_collections.ConfigDict()
  # Candidate families, chosen on validation (seed 0): the overlapping
  # rows/columns (a*, *b) and spectral clusters of the co-predictions.
  c.specialists.families = ("rows_columns", "spectral_20")
  c.specialists.cluster_seed = 0
  c.specialists.fraction_in_subset = 0.5
  c.specialists.pairs_per_epoch = 8_000  # fresh, half from the subset
  c.specialists.epochs = 2
  c.specialists.batch_size = 128
  c.specialists.lr = 1e-3

  c.combine = ml_collections.ConfigDict()
  c.combine.top_n = (1, 2)
  c.combine.num_steps = 100
  c.combine.learning_rate = 1.0

  c.soft = ml_collections.ConfigDict()
  c.soft.temperatures = (2.0, 5.0)

  c.control = ml_collections.ConfigDict()
  c.control.wide = True
  return c
