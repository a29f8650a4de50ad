"""The paper's apparatus: what Hinton, Vinyals & Dean's MNIST experiments
need beside the distillation core.

* :mod:`kdjax.paper.models`: the paper's MLPs (teacher ``784-1200-1200-10``,
  student ``784-800-800-10``), a small CNN, the linen adapters and the
  shipped teacher (:func:`~kdjax.paper.models.load_shipped_teacher`).
* :mod:`kdjax.paper.data`, :mod:`kdjax.paper.idx`: MNIST from IDX files or
  TFDS, its splits and transfer sets; the IDX codec.
* :mod:`kdjax.paper.constraints`: the max-norm weight constraint.
* :mod:`kdjax.paper.augment`: the ±2-pixel jitter.
* :mod:`kdjax.paper.optim`: the experiments' optimiser factory (Nesterov
  SGD or Adam, warm-up and cosine decay, max-norm chained last).
* :mod:`kdjax.paper.cli`: the command-line scaffolding of the
  ``python -m experiments.*`` entry points (a user's mistake is one line
  and exit status 2).
* :mod:`kdjax.paper.provenance`: where a number came from (parameter
  hashes, git commit, device, CPU, versions) for the results JSONs.

Why a subpackage of kdjax rather than ``experiments/common``: the notebook,
the examples, the benchmarks and a Colab user import the paper's MLPs, the
shipped teacher and the MNIST loader from an *installed* kdjax (``pip
install`` of a checkout or a wheel), and ``experiments/`` is not installed;
what is specific to one experiment (its configs, pipeline and report) stays
in ``experiments/``. The line is drawn by imports: the paper uses the core
(:mod:`kdjax.teacher`, :mod:`kdjax.checkpoint`, :mod:`kdjax.preprocess`,
:mod:`kdjax.records`, ...) and no core module imports ``kdjax.paper``
(``tests/test_layout.py`` checks it), so ``import kdjax`` does not load
it.

The old names ``kdjax.models``, ``kdjax.data``, ``kdjax.idx``,
``kdjax.constraints``, ``kdjax.augment``, ``kdjax.optim``, ``kdjax.cli``
and ``kdjax.provenance`` are deprecated aliases of these modules, kept for
one release.
"""

from kdjax.paper import (augment, cli, constraints, data, idx, models, optim,
                         provenance)

__all__ = ["augment", "cli", "constraints", "data", "idx", "models", "optim",
           "provenance"]
