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

``save``/``load`` wrap joblib for files annlearn writes itself: ``save``
writes a temporary file in the target's directory, flushes it to disk and
renames it over the target (atomic on POSIX and Windows), so a crash or an
error mid-save leaves the previous file intact; ``load`` turns a truncated or
foreign file into a ``ValueError`` naming the file.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import struct
import tempfile
import zlib

import joblib
import numpy as np

from annlearn._version import __version__

__all__ = ["FORMAT_VERSION", "PersistenceMixin", "load", "save"]

# Version of the data layout written by this annlearn.
# 1: the first layout.
# 2: FlatNeighbors also stores its principal-component bound
#    (``_store["bound"]``, None for brute force).
FORMAT_VERSION = 2


class PersistenceMixin:
    """Versioned ``__getstate__``/``__setstate__`` for annlearn estimators.

    Subclasses list their derived attributes in ``_derived_attributes``,
    rebuild them in ``_derive_tables``, check their arrays in
    ``_check_state`` and bring older layouts up to date in
    ``_upgrade_state``.
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
        if "n_samples_fit_" in state:
            # States written before layouts were versioned are layout 1.
            state = self._upgrade_state(state, 1 if layout is None else layout)
        super().__setstate__(state)
        if "n_samples_fit_" in state:
            self._check_state()
            self._derive_tables()

    def _upgrade_state(self, state: dict, layout: int) -> dict:
        """A fitted state written with data layout ``layout``, brought to
        ``FORMAT_VERSION``."""
        return state

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


def save(estimator, path, *, compress=0) -> None:
    """Write an annlearn estimator to ``path`` atomically, in joblib's format.

    The file is first written in full to a temporary file next to ``path``,
    flushed to disk, then renamed over ``path``: readers see the old file or
    the new one, never a partial one, and a failure leaves ``path`` as it
    was. Read it with :func:`load` (or ``joblib.load``).

    Parameters
    ----------
    estimator : FlatNeighbors or IVFPQNeighbors
        The estimator, fitted or not.
    path : str or path-like
        Destination file.
    compress : int, default=0
        joblib's compression level; 0 keeps the arrays raw so that ``load``
        can memory-map them.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> from annlearn import FlatNeighbors, load, save
    >>> index = FlatNeighbors(n_neighbors=1).fit(np.eye(3))
    >>> path = os.path.join(tempfile.mkdtemp(), "index.joblib")
    >>> save(index, path)
    >>> load(path, mmap_mode="r").kneighbors([[0, 1, 0]], return_distance=False)
    array([[1]])
    """
    if not isinstance(estimator, PersistenceMixin):
        raise TypeError(
            f"save writes annlearn estimators, got {type(estimator).__name__}."
        )
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(
        prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory
    )
    try:
        with os.fdopen(fd, "wb") as f:
            joblib.dump(estimator, f, compress=compress)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file readable by its owner only; give it the
        # permissions of the file it replaces, or the usual 0o644.
        mode = os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o644
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load(path, *, mmap_mode=None):
    """Read an annlearn estimator written by :func:`save` or ``joblib.dump``.

    Parameters
    ----------
    path : str or path-like
        The file.
    mmap_mode : {None, "r", "r+", "c"}, default=None
        As ``joblib.load``: ``"r"`` memory-maps the large arrays (codes,
        ids, vectors) read-only, so that loading costs little time and
        resident memory. ``add``/``remove`` on such an index build new
        arrays in memory and never write to the file.

    Returns
    -------
    estimator : FlatNeighbors or IVFPQNeighbors

    Raises
    ------
    ValueError
        If the file is truncated, not a joblib file, holds something else
        than an annlearn estimator, or its arrays are inconsistent (the
        message says which), or it was written with a newer data layout.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> from annlearn import FlatNeighbors, load, save
    >>> X = np.random.default_rng(0).standard_normal((100, 8), dtype=np.float32)
    >>> path = os.path.join(tempfile.mkdtemp(), "index.joblib")
    >>> save(FlatNeighbors(n_neighbors=3).fit(X), path)
    >>> index = load(path, mmap_mode="r")
    >>> index.kneighbors(X[:2], return_distance=False)
    array([[ 0, 65, 39],
           [ 1, 90, 10]])
    """
    path = os.fspath(path)
    try:
        obj = joblib.load(path, mmap_mode=mmap_mode)
    except (
        EOFError,
        pickle.UnpicklingError,
        struct.error,
        zlib.error,
        KeyError,
    ) as exc:
        raise ValueError(
            f"Could not read an annlearn estimator from {path!r}: the file is "
            f"truncated or not a joblib file ({type(exc).__name__}: {exc})."
        ) from exc
    except ValueError as exc:
        if "annlearn" in str(exc) or "Corrupted" in str(exc):
            raise  # our own state checks: already precise
        raise ValueError(
            f"Could not read an annlearn estimator from {path!r}: the file is "
            f"truncated or damaged (ValueError: {exc})."
        ) from exc
    if not isinstance(obj, PersistenceMixin):
        raise ValueError(
            f"{path!r} holds a {type(obj).__name__}, not an annlearn estimator."
        )
    return obj
