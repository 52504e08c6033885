"""A weak, checksummed reference to the array an index was fitted on.

An index that keeps only codes (IVF-PQ without ``refine_factor``) cannot find
the exact neighbours that ``score`` compares with, and keeping a copy of the
vectors would defeat the compression. It keeps instead a weak reference to
the caller's array and the CRC-32 of that array as validated at ``fit``:
``score`` works while the array is alive and unchanged, and says so clearly
otherwise, never from overwritten data.
"""

from __future__ import annotations

import weakref
import zlib
from collections.abc import Callable

import numpy as np

__all__ = ["FitSource", "checksum"]


def checksum(X: np.ndarray) -> int:
    """CRC-32 of a C-contiguous array's bytes."""
    return zlib.crc32(memoryview(X).cast("B"))


class FitSource:
    """What ``fit`` was given: the array (weakly), its ids and checksum.

    Parameters
    ----------
    get : callable
        Returns the array, or None once it was garbage-collected.
    ids : ndarray of int64
        The ids the rows were indexed under.
    shape : tuple
        The array's shape at ``fit``.
    crc : int
        :func:`checksum` of the array validated as float32 at ``fit``.
    """

    def __init__(self, get: Callable, ids: np.ndarray, shape, crc: int) -> None:
        self.get, self.ids, self.shape, self.crc = get, ids, shape, crc

    @classmethod
    def of(cls, X, ids: np.ndarray, crc: int) -> FitSource | None:
        """A reference to X, or None if X cannot be referenced (a list).

        A view (``fit(X[:n])``) dies with the call that made it, so for a view
        of a contiguous array the reference is to that array, and the view is
        rebuilt from it on demand: no copy either way.
        """
        owner = X
        while isinstance(owner, np.ndarray) and isinstance(owner.base, np.ndarray):
            owner = owner.base
        if owner is not X and owner.flags.c_contiguous:
            start = owner.__array_interface__["data"][0]
            offset = X.__array_interface__["data"][0] - start
            shape, dtype, strides = X.shape, X.dtype, X.strides
            ref = weakref.ref(owner)

            def view():
                base = ref()
                if base is None:
                    return None
                return np.ndarray(
                    shape, dtype, buffer=base, offset=offset, strides=strides
                )

            return cls(view, ids, shape, crc)
        try:
            return cls(weakref.ref(X), ids, getattr(X, "shape", None), crc)
        except TypeError:
            return None

    def array(self):
        """The array, or None if it is gone or no longer has its shape."""
        X = self.get()
        if X is None or getattr(X, "shape", None) != self.shape:
            return None
        return X

    @staticmethod
    def validated(source: FitSource | None, validate: Callable) -> np.ndarray:
        """The array of ``source`` validated by ``validate``, if it is alive
        and unchanged since ``fit``; a ValueError saying which otherwise."""
        X = None if source is None else source.array()
        if X is None:
            raise ValueError(
                "score needs the indexed vectors to find the exact neighbours, "
                "but this index does not store them (refine_factor=None) and the "
                "array given to fit is gone, could not be referenced (a list), "
                "or the index changed since (add/remove). Keep the array given "
                "to fit alive, or set refine_factor to store the vectors."
            )
        Xv = validate(X)
        if checksum(Xv) != source.crc:
            raise ValueError(
                "score needs the indexed vectors to find the exact neighbours, "
                "but the array given to fit was modified since (its checksum "
                "changed), so it no longer holds the indexed vectors. Do not "
                "overwrite it while scoring, or set refine_factor to store the "
                "vectors."
            )
        return Xv
