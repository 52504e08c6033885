"""Pickle / joblib state of annlearn's estimators.

The state is plain numpy arrays and Python scalars, so ``pickle`` and
``joblib.dump`` work as for any scikit-learn estimator, and
``joblib.load(path, mmap_mode="r")`` memory-maps the large arrays (codes,
ids, vectors), which the kernels read through ``const`` memoryviews.

On top of scikit-learn's own ``_sklearn_version`` the state records:

- ``_annlearn_version``: the annlearn release that wrote it (information);
- ``_annlearn_format``: the version of the data layout. A reader refuses a
  layout newer than it knows, with a message saying so; older layouts are
  read (upgraded in ``__setstate__``) as long as annlearn supports them.

Tables derived from the fitted quantizers are not stored: they are rebuilt
on load (``_derive_tables``), which keeps files small and cannot disagree
with the quantizers. The arrays of the index are checked for consistency on
load (shapes, dtypes, list offsets: cheap checks that do not read the
memory-mapped data), so that a tampered or truncated state fails with a clear
error instead of reading out of bounds.
"""

from __future__ import annotations

import numpy as np

from annlearn._version import __version__

__all__ = ["FORMAT_VERSION", "PersistenceMixin"]

# Version of the data layout written by this annlearn.
FORMAT_VERSION = 1


class PersistenceMixin:
    """Versioned ``__getstate__``/``__setstate__`` for annlearn estimators.

    Subclasses list their derived attributes in ``_derived_attributes``,
    rebuild them in ``_derive_tables`` and check their arrays in
    ``_check_state``.
    """

    _derived_attributes: tuple[str, ...] = ()
    # Process-local helpers (weak references, caches), never saved.
    _transient_attributes: tuple[str, ...] = ("_fit_source", "_exact_ref")

    def __getstate__(self):
        # A copy: object.__getstate__ may return the instance __dict__ itself.
        state = dict(super().__getstate__())
        for name in self._derived_attributes + self._transient_attributes:
            state.pop(name, None)
        state["_annlearn_version"] = __version__
        state["_annlearn_format"] = FORMAT_VERSION
        return state

    def __setstate__(self, state):
        state = dict(state)
        layout = state.pop("_annlearn_format", None)
        written_by = state.pop("_annlearn_version", "unknown")
        if layout is not None and layout > FORMAT_VERSION:
            raise ValueError(
                f"This {type(self).__name__} was saved by annlearn {written_by} "
                f"with data layout version {layout}; annlearn {__version__} reads "
                f"layouts up to version {FORMAT_VERSION}. Upgrade annlearn to "
                "load it."
            )
        super().__setstate__(state)
        if "n_samples_fit_" in state:
            self._check_state()
            self._derive_tables()

    def _derive_tables(self) -> None:
        """Rebuild the attributes listed in ``_derived_attributes``."""

    def _check_state(self) -> None:
        """Raise ValueError if the fitted arrays are inconsistent."""


def check_array_state(
    owner: str, name: str, array, *, dtype, ndim: int, shape=None
) -> None:
    """Check one array of a loaded state: type, dtype, dimensions, shape."""
    if not isinstance(array, np.ndarray):
        raise ValueError(
            f"Corrupted {owner} state: {name} should be a numpy array, got "
            f"{type(array).__name__}."
        )
    if array.dtype != dtype or array.ndim != ndim:
        raise ValueError(
            f"Corrupted {owner} state: {name} should be a {ndim}-d {np.dtype(dtype)} "
            f"array, got {array.ndim}-d {array.dtype}."
        )
    if shape is not None:
        for axis, expected in enumerate(shape):
            if expected is not None and array.shape[axis] != expected:
                raise ValueError(
                    f"Corrupted {owner} state: {name} has shape {array.shape}, "
                    f"expected {tuple('any' if s is None else s for s in shape)}."
                )
