"""The optimiser factory shared by the experiments and the benchmarks.

``make_optimizer(opt, total_steps)`` builds Nesterov SGD or Adam with a
linear warm-up and a cosine decay from a config mapping (an
``ml_collections.ConfigDict`` or a dict) with the keys ``name`` (``"sgd"``
or ``"adam"``), ``lr``, ``momentum`` (SGD), and optionally
``warmup_fraction``, ``final_lr_fraction`` and ``clip_norm``; the paper's
max-norm constraint (:mod:`kdjax.paper.constraints`) is chained last when
``max_sq_norm`` is given. Everything is optax:

.. math::
  \\eta_t = \\begin{cases} \\eta\\, t / t_w & t < t_w \\\\
  \\eta_f + (\\eta - \\eta_f)\\,\\tfrac12\\big(1 + \\cos(\\pi
  \\tfrac{t - t_w}{T - t_w})\\big) & t \\ge t_w \\end{cases}

with :math:`t_w` the warm-up steps, :math:`T` the total steps and
:math:`\\eta_f` the final learning rate.

>>> from kdjax import optim
>>> tx = optim.make_optimizer({"name": "sgd", "lr": 0.1, "momentum": 0.9}, 100)
>>> type(tx).__name__
'GradientTransformationExtraArgs'
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import optax

from kdjax.paper import constraints

__all__ = ["make_optimizer"]


def make_optimizer(opt: Mapping[str, Any], total_steps: int, *,
                   max_sq_norm: Optional[float] = None):
  """Nesterov SGD or Adam with linear warm-up and cosine decay (see above).

  Raises:
    ValueError: an optimizer name other than ``"sgd"`` or ``"adam"``.
  """
  get = opt.get
  name, lr = opt["name"], opt["lr"]
  warmup = int(get("warmup_fraction", 0.0) * total_steps)
  schedule = optax.warmup_cosine_decay_schedule(
      0.0 if warmup else lr, lr, max(warmup, 1), max(total_steps, 2),
      end_value=lr * get("final_lr_fraction", 0.0))
  if name == "sgd":
    base = optax.sgd(schedule, momentum=opt["momentum"], nesterov=True)
  elif name == "adam":
    base = optax.adam(schedule)
  else:
    raise ValueError(
        f"optimizer name must be 'sgd' or 'adam', got {name!r}.")
  parts = []
  if get("clip_norm", 0.0):
    parts.append(optax.clip_by_global_norm(opt["clip_norm"]))
  parts.append(base)
  if max_sq_norm:
    parts.append(constraints.max_norm(max_sq_norm))
  return optax.chain(*parts)
