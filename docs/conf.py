"""Sphinx configuration of the optaxclip API reference (``make docs``)."""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the package of this checkout, not an installed copy
sys.path.insert(0, str(ROOT / "docs" / "_ext"))

import optaxclip  # noqa: E402

project = "optaxclip"
author = "The optaxclip authors"
copyright = "The optaxclip authors"
version = release = optaxclip.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",  # Google-style Args: / Returns: / Raises: sections
    "public_api",  # one entry per name in optaxclip.__all__
]

exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path: list[str] = []

autodoc_member_order = "bysource"
autodoc_typehints = "signature"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

# The docstring examples run as doctests through pytest (`make docs` and `make test`),
# not sphinx.ext.doctest: they compare floats with pytest's NUMBER option, which
# sphinx.ext.doctest does not have.
