"""Deprecated name of :mod:`kdjax.paper.provenance`, kept for one release.

``import kdjax.provenance`` gives the :mod:`kdjax.paper.provenance` module
itself.
"""
import sys

from kdjax.paper import provenance as _provenance

sys.modules[__name__] = _provenance
