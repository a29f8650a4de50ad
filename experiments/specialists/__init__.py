"""The paper's Section 5 (specialist models) on a 100-class MNIST task.

* :mod:`experiments.specialists.data`: pairs of MNIST digits side by side,
  class ``10 * left + right`` (100 classes, many of them confusable: every
  class shares a digit with 18 others).
"""
