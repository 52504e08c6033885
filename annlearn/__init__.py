"""annlearn: approximate nearest-neighbour search as scikit-learn estimators.

Exact search (:class:`FlatNeighbors`) and, built on the same kernels,
approximate indexes, all with the scikit-learn API: ``fit``,
``kneighbors``, ``kneighbors_graph`` and ``transform`` as
:class:`sklearn.neighbors.KNeighborsTransformer`.
"""

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
