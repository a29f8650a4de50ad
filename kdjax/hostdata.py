"""Deprecated name of :mod:`kdjax.loop.host` (host batches), kept for one
cycle.

``import kdjax.hostdata`` gives the :mod:`kdjax.loop.host` module itself.
"""
import sys

from kdjax.loop import host as _host

sys.modules[__name__] = _host
