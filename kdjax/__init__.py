"""kdjax: knowledge distillation in JAX/Flax (Hinton, Vinyals & Dean, 2015).

Modules, one concern each:

* :mod:`kdjax.losses`: tempered softmax, distillation (forward KL), reverse
  KL, generalised JSD, logit-matching and the full KD objective (pure
  functions, per-example values).
* :mod:`kdjax.topk`: top-k teacher targets (a compact cache for large
  vocabularies) and the loss trained from them.
* :mod:`kdjax.chunked`: the distillation loss from hidden states over chunks
  of positions, without materialising ``[N, V]`` logits.
* :mod:`kdjax.teacher`: the frozen :class:`Teacher` pytree and ensembles.
* :mod:`kdjax.train`: :class:`TrainState` and the train step (jit, pmap,
  sharded jit).
* :mod:`kdjax.loops`: on-device ``lax.scan`` epochs and the host-batch loop.
* :mod:`kdjax.cache`: the teacher-logit cache.
* :mod:`kdjax.sweep`: vmapped sweeps over seeds, temperatures and alphas.
* :mod:`kdjax.trainer`: :func:`kdjax.fit`, the resumable outer loop (progress, metrics, checkpoints).
* :mod:`kdjax.checkpoint`: orbax checkpoints with fallback.
* :mod:`kdjax.models`, :mod:`kdjax.constraints`, :mod:`kdjax.augment`: the
  paper's MLPs, the max-norm constraint, ±2-pixel jitter.
* :mod:`kdjax.data`: MNIST from IDX files or TFDS, splits, transfer sets.
* :mod:`kdjax.validate`: fail-fast checks of configs, batch sizes, models
  and labels (before anything compiles).
"""

from kdjax import (augment, cache, chunked, constraints, losses, loops, models,
                   sweep, topk, train, validate)
from kdjax.trainer import fit
from kdjax.losses import (
    distillation_loss,
    generalized_jsd_loss,
    hard_label_loss,
    kd_objective,
    logit_matching_loss,
    reverse_distillation_loss,
    soft_target_cross_entropy,
    tempered_log_softmax,
    tempered_softmax,
)
from kdjax.teacher import Teacher, ensemble
from kdjax.train import TrainState, make_train_step

__version__ = "0.1.0"
