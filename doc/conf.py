"""Sphinx configuration of annlearn's documentation (``make -C doc html``)."""

import annlearn

project = "annlearn"
copyright = "2026, the annlearn developers"
version = release = annlearn.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.intersphinx",
    "numpydoc",
]
autosummary_generate = True
numpydoc_show_class_members = False
exclude_patterns = ["_build"]
html_theme = "alabaster"
intersphinx_mapping = {
    "python": ("https://docs.python.org/3", None),
    "numpy": ("https://numpy.org/doc/stable/", None),
    "sklearn": ("https://scikit-learn.org/stable/", None),
}
# Offline builds (CI has no network beyond the package registries).
intersphinx_disabled_reftypes = ["*"]
