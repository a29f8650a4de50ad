"""Deprecated name of :mod:`kdjax.paper.models`, kept for one release.

``import kdjax.models`` gives the :mod:`kdjax.paper.models` module itself.
"""
import sys

from kdjax.paper import models as _models

sys.modules[__name__] = _models
