"""kdjax: knowledge distillation in JAX/Flax (Hinton, Vinyals & Dean, 2015).

The core, read top-down (one concern per module):

* :mod:`kdjax.losses`: the losses, pure functions with per-example values,
  one module per family:

  * :mod:`kdjax.losses.divergences`: tempered softmax, distillation
    (forward KL), reverse KL, generalised JSD, logit matching, hard labels
    and the full KD objective;
  * :mod:`kdjax.losses.topk`: top-k teacher targets (a compact cache for
    large vocabularies) and the loss trained from them;
  * :mod:`kdjax.losses.chunked`: the loss from hidden states over chunks of
    positions, without materialising ``[N, V]`` logits.

* :mod:`kdjax.vocab`: a teacher whose vocabulary is the student's plus
  padding columns (dropped and the teacher renormalised; opt-in).
* :mod:`kdjax.offline`: a teacher's top-k targets of a whole corpus,
  written once to ArrayRecord shards (resumable, every process) and read
  back next to the data by example index.
* :mod:`kdjax.objectives`: the objective registry (``kd``, ``soft``, ...);
  each objective declares the hyperparameters it reads.
  :mod:`kdjax.hparams`: the state's hyperparameters (``temperature``,
  ``alpha``, ``beta``, ...: numbers or schedules) and their records.
* :mod:`kdjax.student`, :mod:`kdjax.teacher`: :class:`Student`, a model with
  model state (linen, NNX or a pure function); the frozen :class:`Teacher`
  pytree and ensembles. :mod:`kdjax.fields`: :class:`Fields`, which batch
  fields are inputs, labels, weights and cached teacher logits.
* The step: :mod:`kdjax.options` (the option types :class:`StepSpec`,
  :class:`Precision`, :class:`Checkpointing`, :class:`Evaluation`,
  :class:`Loop`), :mod:`kdjax.step` (:class:`TrainState` and the train
  step: jit, pmap, sharded jit), :mod:`kdjax.accumulate` (exact gradient
  accumulation over micro-batches, ``StepSpec(accumulate=k)``),
  :mod:`kdjax.precision` (mixed precision),
  :mod:`kdjax.preprocess` (the pixel-scaling rule).
* The fit and its loop: :mod:`kdjax.fitting` (:func:`kdjax.fit`, the
  resumable run), :mod:`kdjax.loop` (the epoch forms: a whole-epoch scan, a
  loop of jitted steps, jitted blocks over host batches; the epoch's metric
  summary), :mod:`kdjax.records` (what ``fit.json`` records of callables),
  :mod:`kdjax.progress` (progress bar, metric logs), :mod:`kdjax.cache`
  (the teacher-logit cache), :mod:`kdjax.evaluate`, :mod:`kdjax.sweep`
  (vmapped sweeps over seeds and hyperparameters), :mod:`kdjax.specialists`
  (the paper's Section 5 as pure functions: confusable clusters, specialist
  data and initialisation, the dustbin correction and the eq. 5
  combination).
* Checkpoints, meshes, validation: :mod:`kdjax.checkpoint` (orbax
  checkpoints with fallback), :mod:`kdjax.mesh` (where ``fit`` puts things
  on a device mesh: data parallel by default, FSDP, several hosts),
  :mod:`kdjax.distributed` (multi-host training), :mod:`kdjax.validate`
  (fail-fast checks of configs, batch sizes, models and labels, before
  anything compiles).

The paper's apparatus, :mod:`kdjax.paper` (not imported by ``import kdjax``
or by any core module): the MLPs and the shipped teacher, MNIST and IDX,
max-norm, jitter, the experiments' optimiser, the CLI scaffolding and
provenance.

Deprecated names, kept for one release: ``kdjax.train``, ``kdjax.trainer``,
``kdjax.loops`` and ``kdjax.hostdata`` (:mod:`kdjax.step`,
:mod:`kdjax.fitting`, :mod:`kdjax.loop`); ``kdjax.topk`` and
``kdjax.chunked`` (:mod:`kdjax.losses.topk`, :mod:`kdjax.losses.chunked`);
``kdjax.models``, ``kdjax.data``, ``kdjax.idx``, ``kdjax.constraints``,
``kdjax.augment``, ``kdjax.optim``, ``kdjax.cli`` and ``kdjax.provenance``
(the modules of :mod:`kdjax.paper`). The moved ones load on first use.
"""

import importlib as _importlib

from kdjax import (accumulate, cache, checkpoint, distributed, evaluate,
                   fields, fitting, hparams, loop, losses, mesh, objectives,
                   offline, options, precision, preprocess, progress, records,
                   specialists, step, sweep, validate, vocab)
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
    # Modules of the core.
    "accumulate", "cache", "checkpoint", "distributed", "evaluate",
    "fields", "fitting", "hparams", "loop", "losses", "mesh", "objectives",
    "offline", "options", "precision", "preprocess", "progress", "records",
    "specialists", "step",
    "sweep", "validate", "vocab",
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

# Loaded on first use: the paper's subpackage and the deprecated names of
# the modules that moved (each a module kdjax/<name>.py that stands for its
# new home, see kdjax/paper/__init__.py and kdjax/losses/__init__.py).
_LAZY = ("paper", "topk", "chunked", "models", "data", "idx", "constraints",
         "augment", "optim", "cli", "provenance")


def __getattr__(name):
  if name in _LAZY:
    return _importlib.import_module(f"kdjax.{name}")
  raise AttributeError(f"module 'kdjax' has no attribute {name!r}")


__version__ = "0.1.0"
