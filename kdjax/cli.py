"""Deprecated name of :mod:`kdjax.paper.cli`, kept for one release.

``import kdjax.cli`` gives the :mod:`kdjax.paper.cli` module itself.
"""
import sys

from kdjax.paper import cli as _cli

sys.modules[__name__] = _cli
