"""Deprecated name of :mod:`kdjax.paper.augment`, kept for one release.

``import kdjax.augment`` gives the :mod:`kdjax.paper.augment` module itself.
"""
import sys

from kdjax.paper import augment as _augment

sys.modules[__name__] = _augment
