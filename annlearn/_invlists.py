"""InvertedLists: the codes, ids and vectors of an IVF index, grouped by cell.

Layout: every array is sorted by cell, and ``offsets[c]:offsets[c + 1]`` is
the slice of cell ``c``, so the scan kernel reads one contiguous run of codes
per probed cell and the arrays memory-map as they are stored. An
``InvertedLists`` is never modified: ``add`` and ``remove`` return new lists,
which the estimator publishes with one assignment, so a search running in
another thread keeps a consistent snapshot.
"""

from __future__ import annotations

import numpy as np

from annlearn import _fastscan
from annlearn._persistence import check_array_state, check_ids_state
from annlearn._quantizers import ScalarQuantizer

__all__ = ["InvertedLists"]


class InvertedLists:
    """Per-cell lists of codes, ids and, optionally, the vectors.

    Parameters
    ----------
    offsets : ndarray of shape (nlist + 1,), int64
        List ``c`` holds rows ``offsets[c]:offsets[c + 1]``.
    codes : ndarray of shape (n, code_size), uint8
    ids : ndarray of shape (n,), int64
    vectors : ndarray of shape (n, n_features), or None
        Kept for exact re-ranking, as ``sq`` stores them: float32, float16
        or uint8 codes.
    sq : ScalarQuantizer, default=None
        How ``vectors`` are stored; None means float32 (or no vectors).
    """

    __slots__ = ("offsets", "codes", "ids", "vectors", "sq", "_packed", "_slots")

    def __init__(self, offsets, codes, ids, vectors=None, sq=None) -> None:
        self.offsets = offsets
        self.codes = codes
        self.ids = ids
        self.vectors = vectors
        if sq is None and vectors is not None:
            sq = ScalarQuantizer("float32")
        self.sq = sq
        self._packed = None
        self._slots = None

    def check_refinable(self, refine_factor) -> None:
        """Raise ValueError if ``refine_factor`` asks for re-ranking these
        lists cannot do (they keep no vectors)."""
        if refine_factor is not None and self.vectors is None:
            raise ValueError(
                "refine_factor is set but this index was fitted with "
                "refine_factor=None and keeps no vectors to re-rank: fit it "
                "again with refine_factor set."
            )

    def fastscan_slots(self) -> np.ndarray:
        """For every row, its slot ``32 * block + lane`` in the fast-scan
        layout of ``packed_codes`` (a filter over rows becomes one over
        slots, a 32-bit word per block)."""
        slots = self._slots
        if slots is None:
            # Two threads may both compute it; either result is the same.
            _, block_offsets = self.packed_codes()
            cells = self.cells()
            within = np.arange(len(self), dtype=np.int64) - self.offsets[cells]
            slots = self._slots = 32 * block_offsets[cells] + within
        return slots

    def refine(self, X, candidates, k: int, inner_product: bool, n_threads: int):
        """The ``k`` best ``candidates`` (rows, -1 for none) of each prepared
        query by exact distance to the stored vectors: ``_ivf.refine``."""
        return self.sq.refine(X, self.vectors, candidates, k, inner_product, n_threads)

    def exact_scores(self, X, candidates, inner_product: bool, n_threads: int):
        """The exact distance of every candidate (row, -1 for none; +inf
        there) of each prepared query, in place: ``_ivf.exact_scores``."""
        return self.sq.exact_scores(
            X, self.vectors, candidates, inner_product, n_threads
        )

    def decoded_vectors(self, positions=None) -> np.ndarray:
        """The float32 vectors stored at ``positions`` (all rows if None)."""
        stored = self.vectors if positions is None else self.vectors[positions]
        return np.ascontiguousarray(self.sq.decode(stored))

    def packed_codes(self) -> tuple[np.ndarray, np.ndarray]:
        """4-bit codes in the fast-scan layout of ``annlearn/_fastscan.h``
        (each list in blocks of 32 rows) and the first block of each list,
        packed on first use: ``(packed, block_offsets)``."""
        packed = self._packed
        if packed is None:
            # Two threads may both pack; either result is the same.
            packed = self._packed = _fastscan.pack_lists(self.codes, self.offsets)
        return packed

    @classmethod
    def from_cells(
        cls,
        nlist: int,
        cells: np.ndarray,
        codes: np.ndarray,
        ids: np.ndarray,
        vectors: np.ndarray | None = None,
        sq: ScalarQuantizer | None = None,
    ) -> InvertedLists:
        """Lists from the cell of every row (rows keep their order within a
        cell); ``vectors`` as ``sq`` stores them."""
        order = np.argsort(cells, kind="stable")
        offsets = np.zeros(nlist + 1, dtype=np.int64)
        np.cumsum(np.bincount(cells, minlength=nlist), out=offsets[1:])
        return cls(
            offsets,
            np.ascontiguousarray(codes[order]),
            np.ascontiguousarray(ids[order]),
            None if vectors is None else np.ascontiguousarray(vectors[order]),
            sq,
        )

    @property
    def nlist(self) -> int:
        return len(self.offsets) - 1

    def __len__(self) -> int:
        return len(self.ids)

    def sizes(self) -> np.ndarray:
        """Rows per cell, shape (nlist,)."""
        return np.diff(self.offsets)

    def cells(self) -> np.ndarray:
        """The cell of every row, shape (n,), int64."""
        return np.repeat(np.arange(self.nlist, dtype=np.int64), self.sizes())

    def cells_of(self, positions: np.ndarray) -> np.ndarray:
        """The cells of the rows at ``positions`` (each in ``[0, len(self))``)."""
        if len(self) <= 4 * np.size(positions):
            # Many positions for few rows: a row -> cell table and a gather
            # cost less than a binary search per position.
            return self.cells()[positions]
        return np.searchsorted(self.offsets, positions, side="right") - 1

    def add(
        self,
        cells: np.ndarray,
        codes: np.ndarray,
        ids: np.ndarray,
        vectors: np.ndarray | None = None,
    ) -> InvertedLists:
        """New lists holding these rows too (O(n) copy); ``vectors`` as
        ``self.sq`` stores them."""
        if (vectors is None) != (self.vectors is None):
            raise ValueError(
                "vectors must be given if and only if the lists keep them."
            )
        return InvertedLists.from_cells(
            self.nlist,
            np.concatenate([self.cells(), cells]),
            np.concatenate([self.codes, codes]),
            np.concatenate([self.ids, ids]),
            None if vectors is None else np.concatenate([self.vectors, vectors]),
            self.sq,
        )

    def remove(self, mask: np.ndarray) -> InvertedLists:
        """New lists without the rows where ``mask`` is True (O(n) copy)."""
        keep = ~mask
        offsets = np.zeros_like(self.offsets)
        np.cumsum(
            np.bincount(self.cells()[keep], minlength=self.nlist), out=offsets[1:]
        )
        return InvertedLists(
            offsets,
            np.ascontiguousarray(self.codes[keep]),
            self.ids[keep],
            None if self.vectors is None else np.ascontiguousarray(self.vectors[keep]),
            self.sq,
        )

    def imbalance_factor(self) -> float:
        """``nlist * sum(size**2) / n**2``: 1.0 for equal cells (FAISS's
        measure), the expected codes a probe scans relative to even cells."""
        sizes = self.sizes().astype(np.float64)
        n = sizes.sum()
        return float(self.nlist * (sizes**2).sum() / n**2) if n else 1.0

    @property
    def nbytes(self) -> int:
        arrays = (self.offsets, self.codes, self.ids, self.vectors)
        arrays += self._packed or ()
        arrays += (self._slots,)  # None until a filtered 4-bit search
        sq = 0 if self.sq is None else self.sq.nbytes
        return sq + sum(a.nbytes for a in arrays if a is not None)

    def to_state(self) -> dict:
        """The arrays, by the names the saved state uses."""
        return {
            "list_offsets": self.offsets,
            "codes": self.codes,
            "ids": self.ids,
            "vectors": self.vectors,
        }

    @classmethod
    def from_state(cls, state: dict, sq: ScalarQuantizer | None = None):
        """Lists of ``to_state``'s arrays, the vectors stored as ``sq``."""
        return cls(
            state["list_offsets"], state["codes"], state["ids"], state["vectors"], sq
        )

    @staticmethod
    def check_state(
        owner: str, state, *, n: int, nlist: int, code_size: int, ksub: int, d: int
    ) -> None:
        """Raise ValueError unless ``state`` (``to_state``'s dict, as loaded)
        holds consistent lists of ``n`` rows in ``nlist`` cells."""
        keys = {"list_offsets", "codes", "ids", "vectors"}
        if not isinstance(state, dict) or set(state) != keys:
            raise ValueError(f"Corrupted {owner} state: no inverted lists.")
        offsets = state["list_offsets"]
        check_array_state(
            owner, "list_offsets", offsets, dtype=np.int64, ndim=1, shape=(nlist + 1,)
        )
        if offsets[0] != 0 or offsets[-1] != n or np.any(np.diff(offsets) < 0):
            raise ValueError(
                f"Corrupted {owner} state: list_offsets must increase from 0 to "
                f"n_samples_fit_ = {n}."
            )
        codes = state["codes"]
        check_array_state(
            owner, "codes", codes, dtype=np.uint8, ndim=2, shape=(n, code_size)
        )
        if ksub < 256 and n and int(codes.max()) >= ksub:
            raise ValueError(
                f"Corrupted {owner} state: codes must be < 2**nbits = {ksub}."
            )
        check_ids_state(owner, state["ids"], n)
        if state["vectors"] is not None:
            # Its dtype is one ScalarQuantizer.check_state accepted.
            check_array_state(
                owner,
                "vectors",
                state["vectors"],
                dtype=getattr(state["vectors"], "dtype", np.float32),
                ndim=2,
                shape=(n, d),
            )
