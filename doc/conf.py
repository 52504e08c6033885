"""Sphinx configuration of annlearn's documentation (``make -C doc html``).

The examples/ scripts become a gallery (sphinx-gallery, when installed): they
are run and their output and plots shown; ``-D plot_gallery=0`` renders them
without running them (what the test suite does, to stay fast). The user
guide's figures are drawn at build time by ``figures/*.py`` (matplotlib's
plot directive), and the benchmark page reads the runs published by
``benchmarks/bench_*.py --publish`` in ``_static/benchmarks/``
(``_ext/annlearn_benchmarks.py``).
"""

import importlib.util
import os
import sys

import annlearn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "_ext"))

project = "annlearn"
copyright = "2026, the annlearn developers"
version = release = annlearn.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "numpydoc",
    # The user guide's figures, drawn at build time by doc/figures/*.py.
    "matplotlib.sphinxext.plot_directive",
    # The benchmark page: doc/_static/benchmarks/*-latest.json.
    "annlearn_benchmarks",
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
plot_include_source = False
plot_html_show_source_link = False
plot_html_show_formats = False
plot_formats = [("png", 110)]
plot_rcparams = {"savefig.bbox": "tight"}
html_static_path = ["_static"]
autosummary_generate = True
numpydoc_show_class_members = False
exclude_patterns = ["_build", "auto_examples/*.ipynb", "figures"]
html_theme = "alabaster"
