"""kdjax: knowledge distillation in JAX/Flax (Hinton, Vinyals & Dean, 2015)."""

from kdjax import losses
from kdjax.losses import (
    distillation_loss,
    hard_label_loss,
    kd_objective,
    logit_matching_loss,
    soft_target_cross_entropy,
    tempered_log_softmax,
    tempered_softmax,
)

__version__ = "0.1.0"
