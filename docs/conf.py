"""Sphinx configuration: the kdjax API reference from its docstrings.

  make docs   # = sphinx-build -W --keep-going -b html docs docs/_build/html

Docstrings are Google style (napoleon); ``.. math::`` is rendered by MathJax
(loaded by the browser, so the build itself needs no network).
"""

import pathlib
import sys

# Import kdjax from this checkout, also without an editable install.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

project = "kdjax"
author = "kdjax authors"
copyright = "the kdjax authors (Apache License 2.0)"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]

# Google docstrings only.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
}
autodoc_member_order = "bysource"
# Signatures stay short; the types go to the parameter descriptions.
autodoc_typehints = "description"

exclude_patterns = ["_build"]
html_theme = "alabaster"
