"""Deprecated name of :mod:`kdjax.paper.constraints`, kept for one release.

``import kdjax.constraints`` gives the :mod:`kdjax.paper.constraints` module
itself.
"""
import sys

from kdjax.paper import constraints as _constraints

sys.modules[__name__] = _constraints
