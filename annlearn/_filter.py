"""Filtered search: the ``allowed=`` argument of ``kneighbors``, checked once
and turned into what the kernels read.

What the user gives (:func:`check_allowed`), in the id space of the index
(column ``j`` of ``kneighbors_graph`` is id ``j``):

- an array of ids, one filter for every query;
- a 1-d boolean mask over the id space (``_graph_n_columns()`` entries), one
  filter for every query;
- a 2-d boolean array or a scipy sparse matrix of shape
  ``(n_queries, _graph_n_columns())``, one row per query (stored non-zero
  entries of a sparse matrix allow their column).

What a kernel reads (:class:`FilterBlock`): for a block of queries, one bit
per row of the store (a row *position*, not an id), packed into uint64 words,
so that "is this code allowed?" is one load, shift and mask. One filter for
every query is one bitmap (n_samples / 8 bytes) whatever the number of
queries; per-query filters are turned into bitmaps one block of queries at a
time (:meth:`Filter.blocks`), so that memory stays bounded by the block,
never n_queries x n_samples.

A query whose filter allows fewer than ``n_neighbors`` ids of the index is
an error naming it (results are never padded in annlearn). Ids of a mask or
a sparse row that are not in the index (gaps left by ``remove`` or by user
ids) are simply absent, as their columns in ``kneighbors_graph`` are; ids
given as an array must all be in the index.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

__all__ = [
    "Filter",
    "FilterBlock",
    "canonical_allowed",
    "check_allowed",
    "unknown_ids_error",
]

# Bytes of the boolean (n_queries, n_samples) image of a block of per-query
# filters, from which the block's bitmaps are packed (an eighth of it).
_BLOCK_BYTES = 32 << 20


def _pack(mask: np.ndarray) -> np.ndarray:
    """Boolean rows (b, n) -> uint64 words (b, ceil(n / 64)): bit ``j % 64``
    of word ``j // 64`` is ``mask[:, j]`` (the kernels' layout)."""
    n_words = (mask.shape[1] + 63) // 64
    packed = np.packbits(mask, axis=1, bitorder="little")
    out = np.zeros((mask.shape[0], 8 * n_words), dtype=np.uint8)
    out[:, : packed.shape[1]] = packed
    return out.view("<u8").astype(np.uint64, copy=False)


class FilterBlock:
    """The filter of a block of queries over the rows of one store.

    Parameters
    ----------
    mask : ndarray of shape (1 or n_queries, n_rows), bool
        Allowed rows (positions of the store); one row for every query when
        ``per_query`` is False.
    counts : ndarray of shape (n_queries,), int64
        Allowed rows per query.
    """

    __slots__ = ("mask", "counts", "_bitmap", "_slot_bitmap")

    def __init__(self, mask: np.ndarray, counts: np.ndarray) -> None:
        self.mask = mask
        self.counts = counts
        self._bitmap = None
        self._slot_bitmap = None

    @property
    def shared(self) -> bool:
        """One filter for every query of the block."""
        return self.mask.shape[0] == 1

    def bitmap(self) -> np.ndarray:
        """uint64 words (1 or n_queries, ceil(n_rows / 64)) for the kernels."""
        if self._bitmap is None:
            self._bitmap = _pack(self.mask)
        return self._bitmap

    def take(self, queries: np.ndarray) -> FilterBlock:
        """The filter of these queries of the block (an index array)."""
        mask = self.mask if self.shared else self.mask[queries]
        block = FilterBlock(mask, self.counts[queries])
        if self.shared:
            block._bitmap, block._slot_bitmap = self._bitmap, self._slot_bitmap
        return block

    def rows(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The allowed rows of these queries as lists: ``(indptr, rows)``,
        query ``i``'s rows ``rows[indptr[i]:indptr[i + 1]]`` (increasing);
        a single list (``indptr`` of two entries) for a shared filter."""
        if self.shared:
            rows = np.flatnonzero(self.mask[0])
            return np.array([0, len(rows)], dtype=np.int64), rows.astype(np.int64)
        which, rows = np.nonzero(self.mask[queries])
        indptr = np.zeros(len(queries) + 1, dtype=np.int64)
        np.cumsum(np.bincount(which, minlength=len(queries)), out=indptr[1:])
        return indptr, rows.astype(np.int64)

    def slot_bitmap(self, slots: np.ndarray, n_slots: int) -> np.ndarray:
        """The filter in another layout: row ``p`` of the store is bit
        ``slots[p]`` of ``n_slots`` (a multiple of 32), as uint32 words
        (the 4-bit fast scan's blocks of 32 codes, one word per block)."""
        if self._slot_bitmap is None:
            image = np.zeros((self.mask.shape[0], n_slots), dtype=bool)
            image[:, slots] = self.mask
            words = np.packbits(image, axis=1, bitorder="little")
            words = words.view("<u4").astype(np.uint32, copy=False)
            self._slot_bitmap = np.ascontiguousarray(words)
        return self._slot_bitmap


class Filter:
    """A checked ``allowed=`` argument, resolved against one store's ids.

    Built by :func:`check_allowed`; :meth:`blocks` yields the
    :class:`FilterBlock` of consecutive blocks of queries.
    """

    def __init__(self, kind, data, positions_of, n_rows, n_queries, counts):
        self.kind = kind  # "shared" (data: bool over rows), "dense", "sparse"
        self.data = data
        self.positions_of = positions_of  # column -> row position, -1: none
        self.n_rows = n_rows
        self.n_queries = n_queries
        self.counts = counts
        # Row p holds id p (the default ids): columns are rows, no gather.
        self.identity = len(positions_of) == n_rows and bool(
            np.array_equal(positions_of, np.arange(n_rows))
        )

    @property
    def shared(self) -> bool:
        return self.kind == "shared"

    def allows(self, queries: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Whether query ``queries[i]`` allows row ``rows[i]`` (bool array)."""
        if self.shared:
            return self.data[rows]
        columns = self._ids_by_position()[rows]
        if self.kind == "dense":
            return self.data[queries, columns]
        return np.asarray(self.data[queries, columns] != 0).ravel()

    def block_size(self, per_query: bool = False) -> int:
        """Queries per block: all of them for a shared filter (unless
        ``per_query``: it becomes one per query), else as many as keep the
        block's boolean image within ``_BLOCK_BYTES``."""
        if self.shared and not per_query:
            return max(self.n_queries, 1)
        return max(1, _BLOCK_BYTES // max(self.n_rows, 1))

    def block(self, start: int, stop: int, exclude=None) -> FilterBlock:
        """The filter of queries ``start:stop``; ``exclude`` (one row per
        query, or None) removes each query's own row (``X=None``)."""
        n = stop - start
        if self.shared and exclude is None:
            return FilterBlock(self.data[None, :], self.counts[start:stop])
        if self.kind == "shared":
            mask = np.repeat(self.data[None, :], n, axis=0)
        elif self.kind == "dense":
            mask = self.data[start:stop]
            if not self.identity:
                mask = mask[:, self._ids_by_position()]
            elif exclude is not None:
                mask = mask.copy()  # the user's array is not to be changed
            # Default ids (row p is id p): the block is a view, no copy.
            mask = np.ascontiguousarray(mask)
        else:
            sub = self.data[start:stop].tocoo()
            rows = self.positions_of[sub.col]
            keep = (rows >= 0) & (sub.data != 0)
            mask = np.zeros((n, self.n_rows), dtype=bool)
            mask[sub.row[keep], rows[keep]] = True
        counts = self.counts[start:stop].copy()
        if exclude is not None:
            queries = np.arange(n)
            counts -= mask[queries, exclude]
            mask[queries, exclude] = False
        return FilterBlock(mask, counts)

    def _ids_by_position(self) -> np.ndarray:
        columns = np.flatnonzero(self.positions_of >= 0)
        ids = np.empty(self.n_rows, dtype=np.int64)
        ids[self.positions_of[columns]] = columns
        return ids


def _positions_of(ids: np.ndarray, n_columns: int) -> np.ndarray:
    positions = np.full(n_columns, -1, dtype=np.int64)
    positions[ids] = np.arange(len(ids))
    return positions


def canonical_allowed(allowed, n_columns: int, n_queries: int) -> tuple[str, object]:
    """The form of an ``allowed`` argument over ``n_columns`` ids, checked
    without the ids themselves: ``("sparse", csr_matrix)``, ``("mask",
    1-d bool)``, ``("ids", 1-d integers)`` (not yet checked to be in the
    index: :func:`unknown_ids_error`) or ``("dense", 2-d bool)``.

    Raises TypeError for a filter of the wrong kind or dtype and ValueError
    for a wrong shape, each naming ``allowed``.
    """
    expected = (
        "allowed must be an array of ids, a boolean mask of shape "
        f"({n_columns},) over the ids, or a boolean array or sparse matrix of "
        f"shape (n_queries, {n_columns}) = ({n_queries}, {n_columns}) with one "
        "row per query"
    )
    if sparse.issparse(allowed):
        if allowed.shape != (n_queries, n_columns):
            raise ValueError(
                f"{expected}; got a sparse matrix of shape {allowed.shape}."
            )
        matrix = sparse.csr_matrix(allowed)
        matrix.sum_duplicates()
        return "sparse", matrix
    try:
        array = np.asarray(allowed)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{expected}; got {type(allowed).__name__}.") from exc
    if array.ndim == 1 and array.size == 0:
        array = array.astype(np.int64)
    if array.ndim == 1 and array.dtype == bool:
        if len(array) != n_columns:
            raise ValueError(
                f"{expected}; got a boolean mask of {len(array)} entries, not "
                f"{n_columns} (one per id, up to the largest id in the index)."
            )
        return "mask", array
    if array.ndim == 1 and np.issubdtype(array.dtype, np.integer):
        return "ids", array
    if array.ndim == 2 and array.dtype == bool:
        if array.shape != (n_queries, n_columns):
            raise ValueError(f"{expected}; got a boolean array of shape {array.shape}.")
        return "dense", array
    if array.ndim in (1, 2):
        raise TypeError(
            f"{expected}; got a {array.ndim}-d array of dtype {array.dtype} "
            "(ids must be integers, masks boolean)."
        )
    raise ValueError(f"{expected}; got an array of {array.ndim} dimensions.")


def unknown_ids_error(unknown: np.ndarray) -> ValueError:
    """The error for ids of an ``allowed`` array that are not in the index."""
    unknown = np.unique(unknown)
    shown = ", ".join(map(str, unknown[:10]))
    return ValueError(
        f"allowed holds {len(unknown)} ids that are not in the index: "
        f"{shown}{', ...' if len(unknown) > 10 else ''}."
    )


def check_allowed(
    allowed, ids: np.ndarray, n_queries: int, n_columns: int | None = None
) -> Filter:
    """Check the ``allowed`` argument of ``kneighbors`` against the ids of
    the store searched and the number of queries; a :class:`Filter`.

    ``n_columns`` is the width of the id space (by default the store's
    largest id + 1; a shard of a larger index is given the index's): mask
    entries of ids the store does not hold are ignored, ids given as an
    array must all be in it. Raises as :func:`canonical_allowed`, and
    ValueError for unknown ids.
    """
    if n_columns is None:
        n_columns = int(ids.max()) + 1 if len(ids) else 0
    n_rows = len(ids)
    positions_of = _positions_of(ids, n_columns)
    kind, data = canonical_allowed(allowed, n_columns, n_queries)
    if kind == "sparse":
        coo = data.tocoo()
        rows = positions_of[coo.col]
        keep = (rows >= 0) & (coo.data != 0)
        counts = np.bincount(coo.row[keep], minlength=n_queries).astype(np.int64)
        return Filter("sparse", data, positions_of, n_rows, n_queries, counts)
    if kind == "dense":
        counts = np.zeros(n_queries, dtype=np.int64)
        step = max(1, _BLOCK_BYTES // max(n_rows, 1))
        identity = n_columns == n_rows and np.array_equal(ids, np.arange(n_rows))
        for start in range(0, n_queries, step):
            block = data[start : start + step]
            counts[start : start + step] = (block if identity else block[:, ids]).sum(1)
        return Filter("dense", data, positions_of, n_rows, n_queries, counts)
    if kind == "mask":
        mask = data[ids]
    else:
        unknown = data[(data < 0) | (data >= n_columns)]
        inside = data[(data >= 0) & (data < n_columns)]
        unknown = np.concatenate([unknown, inside[positions_of[inside] < 0]])
        if len(unknown):
            raise unknown_ids_error(unknown)
        mask = np.zeros(n_rows, dtype=bool)
        mask[positions_of[data]] = True
    counts = np.full(n_queries, int(mask.sum()), dtype=np.int64)
    return Filter("shared", mask, positions_of, n_rows, n_queries, counts)


def check_enough(counts: np.ndarray, n_neighbors: int, *, query_is_train: bool):
    """Raise ValueError naming the queries whose filter allows fewer than
    ``n_neighbors`` ids (``counts``: allowed ids per query, the query's own
    id already left out when ``query_is_train``)."""
    short = np.flatnonzero(counts < n_neighbors)
    if not len(short):
        return
    first = int(short[0])
    others = f" (and {len(short) - 1} other queries)" if len(short) > 1 else ""
    own = " other than the query's own" if query_is_train else ""
    raise ValueError(
        f"allowed lets query {first}{others} choose from {int(counts[first])} "
        f"ids{own} in the index, fewer than n_neighbors={n_neighbors}: "
        "results are never padded; allow more ids or ask for fewer neighbours."
    )
