"""Deprecated: the epoch forms moved to :mod:`kdjax.loop` (kept one cycle).

``run_host_batches`` is gone: :func:`kdjax.fit` streams host batches
(:mod:`kdjax.loop.host`).
"""
from kdjax.loop.device import (batch_order, epoch_key,  # noqa: F401
                               make_epoch_fn, make_stepwise_epoch_fn,
                               scan_epochs)
from kdjax.loop.summary import mean_metrics, nonfinite_diagnostics  # noqa: F401
