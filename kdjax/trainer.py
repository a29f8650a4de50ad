"""Deprecated name of :mod:`kdjax.fitting` (:func:`kdjax.fit`), kept for one
cycle.

``import kdjax.trainer`` gives the :mod:`kdjax.fitting` module itself.
"""
import sys

from kdjax import fitting as _fitting

sys.modules[__name__] = _fitting
