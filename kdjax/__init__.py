"""kdjax: knowledge distillation in JAX/Flax (Hinton, Vinyals & Dean, 2015).

Modules, one concern each:

* :mod:`kdjax.losses`: tempered softmax, distillation (forward KL), reverse
  KL, generalised JSD, logit-matching and the full KD objective (pure
  functions, per-example values).
* :mod:`kdjax.topk`: top-k teacher targets (a compact cache for large
  vocabularies) and the loss trained from them.
* :mod:`kdjax.chunked`: the distillation loss from hidden states over chunks
  of positions, without materialising ``[N, V]`` logits.
* :mod:`kdjax.vocab`: a teacher whose vocabulary is the student's plus
  padding columns (dropped, the teacher renormalised; opt-in).
* :mod:`kdjax.teacher`: the frozen :class:`Teacher` pytree and ensembles.
* :mod:`kdjax.student`: :class:`Student`, a model with model state
  (linen, NNX or a pure function).
* :mod:`kdjax.fields`: :class:`Fields`, which batch fields are inputs,
  labels, weights and cached teacher logits.
* :mod:`kdjax.objectives`: the objective registry (``kd``, ``soft``, ...);
  each objective declares the hyperparameters it reads.
* :mod:`kdjax.hparams`: the state's hyperparameters (``temperature``,
  ``alpha``, ``beta``, ...: numbers or schedules) and their records.
* :mod:`kdjax.options`: the option types :class:`StepSpec`,
  :class:`Precision`, :class:`Checkpointing`, :class:`Evaluation` and
  :class:`Loop`.
* :mod:`kdjax.step`: :class:`TrainState` and the train step (jit, pmap,
  sharded jit).
* :mod:`kdjax.accumulate`: exact gradient accumulation over micro-batches
  (``StepSpec(accumulate=k)``).
* :mod:`kdjax.precision`, :mod:`kdjax.preprocess`: mixed precision, the
  pixel-scaling rule.
* :mod:`kdjax.loop`: the epoch forms (a whole-epoch scan, a loop of jitted
  steps, jitted blocks over host batches) and the epoch's metric summary.
* :mod:`kdjax.cache`: the teacher-logit cache.
* :mod:`kdjax.sweep`: vmapped sweeps over seeds and hyperparameters.
* :mod:`kdjax.specialists`: the paper's specialist models (Section 5):
  confusable clusters, specialist data and initialisation, vmapped
  training, the dustbin correction and the eq. 5 combination.
* :mod:`kdjax.fitting`: :func:`kdjax.fit`, the resumable run (progress,
  metrics, checkpoints, evaluation).
* :mod:`kdjax.mesh`: where ``fit`` puts things on a device mesh (data
  parallel by default, FSDP, several hosts).
* :mod:`kdjax.checkpoint`: orbax checkpoints with fallback.
* :mod:`kdjax.models`, :mod:`kdjax.constraints`, :mod:`kdjax.augment`: the
  paper's MLPs, the max-norm constraint, ±2-pixel jitter.
* :mod:`kdjax.data`: MNIST from IDX files or TFDS, splits, transfer sets.
* :mod:`kdjax.validate`: fail-fast checks of configs, batch sizes, models
  and labels (before anything compiles).
* :mod:`kdjax.cli`: command-line entry points (a user's mistake is one line
  and exit status 2).

``kdjax.train``, ``kdjax.trainer``, ``kdjax.loops`` and ``kdjax.hostdata``
are the deprecated names of :mod:`kdjax.step`, :mod:`kdjax.fitting` and
:mod:`kdjax.loop`, kept for one release.
"""

from kdjax import (accumulate, augment, cache, chunked, constraints,
                   evaluate, fields, fitting, hparams, loop, losses, mesh,
                   models, objectives, optim, options, precision, preprocess,
                   specialists, step, sweep, topk, validate, vocab)
from kdjax import hostdata, loops, train, trainer  # noqa: F401  (old names)
from kdjax.fields import Fields
from kdjax.fitting import fit
from kdjax.options import Checkpointing, Evaluation, Loop, Precision, StepSpec
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
from kdjax.student import Student
from kdjax.teacher import Teacher, ensemble
from kdjax.step import TrainState, make_train_step

__all__ = [
    # Modules.
    "accumulate", "augment", "cache", "chunked", "constraints", "evaluate",
    "fields", "fitting", "hparams", "loop", "losses", "mesh", "models",
    "objectives", "optim", "options", "precision", "preprocess",
    "specialists", "step", "sweep", "topk", "validate", "vocab",
    # The losses.
    "distillation_loss", "generalized_jsd_loss", "hard_label_loss",
    "kd_objective", "logit_matching_loss", "reverse_distillation_loss",
    "soft_target_cross_entropy", "tempered_log_softmax", "tempered_softmax",
    # Student, teacher, batch fields, train state and step, the outer loop.
    "Fields", "Student", "Teacher", "ensemble", "TrainState",
    "make_train_step", "fit",
    # The option types of the step and of fit.
    "StepSpec", "Precision", "Checkpointing", "Evaluation", "Loop",
]

__version__ = "0.1.0"
