"""Sphinx configuration of annlearn's documentation (``make -C doc html``).

The examples/ scripts become a gallery (sphinx-gallery, when installed): they
are run and their output and plots shown. ``-D plot_gallery=0`` renders them
without running them (what the test suite does, to stay fast).
"""

import importlib.util

import annlearn

project = "annlearn"
copyright = "2026, the annlearn developers"
version = release = annlearn.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "numpydoc",
]
if importlib.util.find_spec("sphinx_gallery") is not None:
    extensions.append("sphinx_gallery.gen_gallery")
    sphinx_gallery_conf = {
        "examples_dirs": "../examples",
        "gallery_dirs": "auto_examples",
        "filename_pattern": r"/plot_",
        "ignore_pattern": r"(__init__|_data)\.py",
        "download_all_examples": False,
    }
autosummary_generate = True
numpydoc_show_class_members = False
exclude_patterns = ["_build", "auto_examples/*.ipynb"]
html_theme = "alabaster"
