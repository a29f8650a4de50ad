"""The epoch forms: the one home of kdjax's training loops.

* :mod:`kdjax.loop.device`: device-resident data; a whole epoch in one
  ``lax.scan`` (:func:`make_epoch_fn`), the same epoch as a loop of jitted
  steps (:func:`make_stepwise_epoch_fn`), and many epochs of a plain step in
  one scan (:func:`scan_epochs`, used by the specialists).
* :mod:`kdjax.loop.host`: host sources of batches, prefetch, jitted blocks
  of steps over host batches (:class:`HostRunner`).
* :mod:`kdjax.loop.summary`: the one metric summary of an epoch and its
  non-finite report.

:func:`kdjax.fit` (:mod:`kdjax.fitting`), :mod:`kdjax.sweep` and
:mod:`kdjax.specialists` all run through these.
"""

from kdjax.loop import device, host, summary
from kdjax.loop.device import (batch_order, epoch_key, make_epoch_fn,
                               make_stepwise_epoch_fn, scan_epochs)
from kdjax.loop.host import HostRunner, HostSource, Prefetcher, SourceError
from kdjax.loop.summary import (mean_metrics, nonfinite_diagnostics,
                                nonfinite_message, summarise)

__all__ = ["device", "host", "summary", "batch_order", "epoch_key",
           "make_epoch_fn", "make_stepwise_epoch_fn", "scan_epochs",
           "HostRunner", "HostSource", "Prefetcher", "SourceError",
           "mean_metrics", "nonfinite_diagnostics", "nonfinite_message",
           "summarise"]
