"""Deprecated name of :mod:`kdjax.paper.data`, kept for one release.

``import kdjax.data`` gives the :mod:`kdjax.paper.data` module itself.
"""
import sys

from kdjax.paper import data as _data

sys.modules[__name__] = _data
