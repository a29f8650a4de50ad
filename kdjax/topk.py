"""Deprecated name of :mod:`kdjax.losses.topk`, kept for one release.

``import kdjax.topk`` gives the :mod:`kdjax.losses.topk` module itself.
"""
import sys

from kdjax.losses import topk as _topk

sys.modules[__name__] = _topk
