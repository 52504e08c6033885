"""annlearn: approximate nearest-neighbour search as scikit-learn estimators.

Exact search (:class:`FlatNeighbors`) and, built on the same kernels,
approximate indexes, all with the scikit-learn API: ``fit``,
``kneighbors``, ``kneighbors_graph`` and ``transform`` as
:class:`sklearn.neighbors.KNeighborsTransformer`.
"""


def _check_build():
    """Raise a clear ImportError if a ``.pyx`` here has no compiled module."""
    import glob
    import importlib.machinery
    import os

    root = os.path.dirname(os.path.abspath(__file__))
    missing = [
        os.path.relpath(source, root)
        for source in glob.glob(os.path.join(root, "**", "*.pyx"), recursive=True)
        if not any(
            os.path.exists(source[: -len(".pyx")] + suffix)
            for suffix in importlib.machinery.EXTENSION_SUFFIXES
        )
    ]
    if missing:
        raise ImportError(
            f"annlearn was imported from {root}, where its compiled modules "
            f"are missing ({', '.join(sorted(missing))} not built). This is a "
            "source folder: 'python -m annlearn' or 'import annlearn' run from "
            "the root of a source checkout finds it before the installed "
            "package. Run from another directory, or build the modules into "
            "the checkout with: pip install -e ."
        )


# Checked before the imports below, whose failure would otherwise only say
# "cannot import name '_flat_search' from partially initialized module".
_check_build()

from annlearn._flat import FlatNeighbors
from annlearn._ivfpq import IVFPQNeighbors
from annlearn._persistence import load, save
from annlearn._show_versions import show_versions
from annlearn._version import __version__

__all__ = [
    "FlatNeighbors",
    "IVFPQNeighbors",
    "load",
    "save",
    "show_versions",
    "__version__",
]
