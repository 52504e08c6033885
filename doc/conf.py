"""Sphinx configuration of annlearn's documentation (``make -C doc html``)."""

import annlearn

project = "annlearn"
copyright = "2026, the annlearn developers"
version = release = annlearn.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "numpydoc",
]
autosummary_generate = True
numpydoc_show_class_members = False
exclude_patterns = ["_build"]
html_theme = "alabaster"
