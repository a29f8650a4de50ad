"""Deprecated name of :mod:`kdjax.step` (the train step), kept for one cycle.

``import kdjax.train`` gives the :mod:`kdjax.step` module itself.
"""
import sys

from kdjax import step as _step

sys.modules[__name__] = _step
