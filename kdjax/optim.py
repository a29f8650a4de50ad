"""Deprecated name of :mod:`kdjax.paper.optim`, kept for one release.

``import kdjax.optim`` gives the :mod:`kdjax.paper.optim` module itself.
"""
import sys

from kdjax.paper import optim as _optim

sys.modules[__name__] = _optim
