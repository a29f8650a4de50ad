"""The distillation losses: pure functions, one module per family.

* :mod:`kdjax.losses.divergences`: the tempered softmax, the forward KL
  (:func:`distillation_loss`), the reverse KL, the generalised JSD,
  logit matching, the hard-label cross-entropy and the full KD objective
  (:func:`kd_objective`); per-example values, float32 or wider, ``T^2``
  included.
* :mod:`kdjax.losses.topk`: top-k teacher targets (a compact cache for
  large vocabularies) and the loss trained from them.
* :mod:`kdjax.losses.chunked`: the distillation loss from hidden states
  over chunks of positions, without materialising ``[N, V]`` logits.

Every public name of the three modules is also a name of this package
(``kdjax.losses.distillation_loss``, ``kdjax.losses.topk_targets``,
``kdjax.losses.chunked_distillation_loss``); their documentation is with
their modules.

>>> import jax.numpy as jnp
>>> from kdjax import losses
>>> z = jnp.array([[2.0, 0.0, -1.0]])
>>> float(losses.distillation_loss(z, z, temperature=4.0)[0])
0.0
"""

from kdjax.losses import chunked, divergences, topk
from kdjax.losses.chunked import (DIVERGENCES, chunked_distillation_loss,
                                  chunked_sums)
from kdjax.losses.divergences import (
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
from kdjax.losses.topk import (
    cache_bytes,
    check_indices,
    tail_logit,
    topk_cache,
    topk_distillation_loss,
    topk_targets,
)

__all__ = [
    # The modules, one per family.
    "divergences", "topk", "chunked",
    # kdjax.losses.divergences.
    "tempered_softmax", "tempered_log_softmax", "soft_target_cross_entropy",
    "distillation_loss", "reverse_distillation_loss", "generalized_jsd_loss",
    "logit_matching_loss", "hard_label_loss", "kd_objective",
    # kdjax.losses.topk.
    "topk_targets", "tail_logit", "topk_cache", "cache_bytes",
    "topk_distillation_loss", "check_indices",
    # kdjax.losses.chunked.
    "chunked_distillation_loss", "chunked_sums", "DIVERGENCES",
]
