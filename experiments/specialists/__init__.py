"""The paper's Section 5 (specialist models) on a 100-class MNIST task.

* :mod:`experiments.specialists.data`: pairs of MNIST digits side by side,
  class ``10 * left + right`` (100 classes, many of them confusable: every
  class shares a digit with 18 others); fixed pairs per split
  (``make_pairs``) and pairs drawn afresh each epoch (``FreshPairs``).
* :mod:`experiments.specialists.regime`: the paper's regime (a
  capacity-limited generalist on fresh pairs, specialists as big as it,
  compute- and parameter-matched controls); ``configs/regime_cpu.py``,
  ``configs/regime_gpu.py``.
* :mod:`experiments.specialists.pipeline`: the first, data-starved run on
  20k fixed pairs (``configs/quick.py``).
* :mod:`experiments.specialists.report`: results.json to tables and a plot.
"""
