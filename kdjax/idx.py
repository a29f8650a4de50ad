"""Deprecated name of :mod:`kdjax.paper.idx`, kept for one release.

``import kdjax.idx`` gives the :mod:`kdjax.paper.idx` module itself.
"""
import sys

from kdjax.paper import idx as _idx

sys.modules[__name__] = _idx
