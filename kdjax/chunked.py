"""Deprecated name of :mod:`kdjax.losses.chunked`, kept for one release.

``import kdjax.chunked`` gives the :mod:`kdjax.losses.chunked` module itself.
"""
import sys

from kdjax.losses import chunked as _chunked

sys.modules[__name__] = _chunked
