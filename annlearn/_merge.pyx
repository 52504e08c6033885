"""Merging the candidates of several parts of an index: a top-k per row.

A sharded index (``annlearn.dask``) asks every shard for its best candidates
and keeps, per query, the best of their union. ``best_columns`` is that
selection: per row, the columns of the ``width`` best candidates by
(distance, cell, id), the order in which one index ranks equal distances
(by the row of its lists: cell, then insertion order, the same as id order
for the default ids). Empty slots (id -1) rank last.

``rank_candidates`` ranks an IVF-PQ query's candidates from several shards
as one index ranks its own: by code distance, then the best of these by
exact distance, with the same tie rule.

Each row is a bounded max-heap of candidate indices (its root the current
worst kept, as ``_utils/_heap.pxd``, with the longer key), then sorted:
O(n_columns log width) per row, against the full sort of every row that
numpy would need for the same three keys. Threads split the rows.
"""

import numpy as np

from cython.parallel cimport parallel, prange
from libc.stdint cimport int32_t
from libc.stdlib cimport free, malloc

from annlearn._utils._typedefs cimport float32_t, id_t, intp_t


cdef struct Candidate:
    float32_t code   # code distance, the first ranking's key
    float32_t exact  # exact distance, the second's (the code one without)
    id_t id          # -1: an empty slot
    int32_t cell


cdef inline bint _ranks_after(
    const Candidate* items, intp_t a, intp_t b, bint exact
) noexcept nogil:
    """True if item ``a`` ranks after item ``b``: by the distance (code or
    exact), then cell, then id, then place in ``items``; empty slots last."""
    cdef const Candidate* x = &items[a]
    cdef const Candidate* y = &items[b]
    cdef float32_t dx, dy
    if (x.id < 0) != (y.id < 0):
        return x.id < 0
    if x.id >= 0:
        dx = x.exact if exact else x.code
        dy = y.exact if exact else y.code
        if dx != dy:
            return dx > dy
        if x.cell != y.cell:
            return x.cell > y.cell
        if x.id != y.id:
            return x.id > y.id
    return a > b


cdef inline void _sift(
    const Candidate* items, intp_t* heap, intp_t size, intp_t start, intp_t item,
    bint exact,
) noexcept nogil:
    """Place ``item`` at ``start`` of the max-heap of item indices, sift it down."""
    cdef intp_t current = start, child
    while True:
        child = 2 * current + 1
        if child >= size:
            break
        if child + 1 < size and _ranks_after(items, heap[child + 1], heap[child], exact):
            child = child + 1
        if not _ranks_after(items, heap[child], item, exact):
            break
        heap[current] = heap[child]
        current = child
    heap[current] = item


cdef void _select(
    const Candidate* items, intp_t n_items, intp_t width, bint exact, intp_t* heap,
    bint ordered=True,
) noexcept nogil:
    """``heap[:width]``: the indices of the ``width`` best items, best first
    (in no particular order unless ``ordered``)."""
    cdef intp_t c, i, last, worst
    for c in range(width):
        heap[c] = c
    if width == n_items and not ordered:
        return
    for i in range(width // 2 - 1, -1, -1):
        _sift(items, heap, width, i, heap[i], exact)
    for c in range(width, n_items):
        if _ranks_after(items, heap[0], c, exact):
            _sift(items, heap, width, 0, c, exact)
    if not ordered:
        return
    for last in range(width - 1, -1, -1):
        worst = heap[0]
        if last:
            _sift(items, heap, last, 0, heap[last], exact)
        heap[last] = worst


def best_columns(
    const float32_t[:, ::1] dist,
    const id_t[:, ::1] ids,
    const int32_t[:, ::1] cells=None,
    intp_t width=1,
    int n_threads=1,
):
    """Per row, the columns of the ``width`` best candidates, best first.

    Parameters
    ----------
    dist : ndarray of shape (n_rows, n_columns), float32
        Candidate distances (any value where the id is -1).
    ids : ndarray of shape (n_rows, n_columns), int64
        Candidate ids, -1 for an empty slot.
    cells : ndarray of shape (n_rows, n_columns), int32, default=None
        Cell of each candidate, the second key; None: distance, then id.
    width : int, default=1
        Columns kept per row (at most ``n_columns``).
    n_threads : int, default=1
        OpenMP threads (over rows).

    Returns
    -------
    columns : ndarray of shape (n_rows, min(width, n_columns)), int64
        Ranked by (distance, cell, id), empty slots last (ties between
        empty slots by column).
    """
    cdef intp_t n_rows = dist.shape[0], n_columns = dist.shape[1], r
    if ids.shape[0] != n_rows or ids.shape[1] != n_columns or cells is not None and (
            cells.shape[0] != n_rows or cells.shape[1] != n_columns):
        raise ValueError(
            f"Expected ids and cells of the shape of dist, {(n_rows, n_columns)}."
        )
    if width < 0:
        raise ValueError(f"Expected width >= 0, got {width}.")
    width = min(width, n_columns)
    columns_arr = np.empty((n_rows, width), dtype=np.int64)
    if n_rows == 0 or width == 0:
        return columns_arr
    cdef id_t[:, ::1] columns = columns_arr
    cdef bint with_cells = cells is not None
    cdef intp_t c
    cdef Candidate* items = NULL
    cdef intp_t* heap = NULL
    cdef int failed = 0
    cdef int* failed_ptr = &failed
    with nogil, parallel(num_threads=<int>max(1, min(n_threads, n_rows // 256))):
        items = <Candidate*>malloc(n_columns * sizeof(Candidate))
        heap = <intp_t*>malloc(width * sizeof(intp_t))
        for r in prange(n_rows, schedule="static"):
            if items == NULL or heap == NULL:
                failed_ptr[0] = 1
                continue
            for c in range(n_columns):
                items[c].code = dist[r, c]
                items[c].id = ids[r, c]
                items[c].cell = cells[r, c] if with_cells else 0
            _select(items, n_columns, width, False, heap)
            for c in range(width):
                columns[r, c] = heap[c]
        free(items)
        free(heap)
    if failed:
        raise MemoryError("annlearn: could not allocate the merge buffers.")
    return columns_arr


cdef struct Source:
    # One part's candidates, rows of ``width`` columns.
    const float32_t* code
    const float32_t* exact  # NULL: not refined
    const id_t* ids
    const int32_t* cells
    intp_t width


def rank_candidates(list parts, intp_t n_candidates, intp_t n_neighbors, int n_threads=1):
    """Per row, the ``n_neighbors`` best of the candidates of several parts,
    ranked as one IVF-PQ index ranks its own: the ``n_candidates`` best by
    (code distance, cell, id), then, when the parts carry exact distances,
    these by (exact distance, cell, id).

    Parameters
    ----------
    parts : list of tuple
        Per part, ``(code, exact, ids, cells)`` of shape (n_rows, width)
        (widths may differ; float32, float32 or None, int64, int32), the
        same rows in every part; id -1 marks an empty slot. Either every
        part has exact distances or none.
    n_candidates : int
        Candidates kept by code distance.
    n_neighbors : int
        Neighbours returned.
    n_threads : int, default=1
        OpenMP threads (over rows).

    Returns
    -------
    dist : ndarray of shape (n_rows, n_neighbors), float32
        Exact distances (code distances without them), +inf for an empty slot.
    ids : ndarray of shape (n_rows, n_neighbors), int64
        -1 for an empty slot.
    """
    if not parts:
        raise ValueError("Expected at least one part.")
    if n_candidates < 1 or n_neighbors < 1:
        raise ValueError(
            f"Expected n_candidates >= 1 and n_neighbors >= 1, got {n_candidates} "
            f"and {n_neighbors}."
        )
    cdef intp_t n_parts = len(parts), n_rows = -1, n_items = 0, p
    cdef bint exact = parts[0][1] is not None
    # Every part's arrays stay referenced here while the kernel reads them.
    views = []
    for code, refined, ids, cells in parts:
        if (refined is not None) != exact:
            raise ValueError("Expected exact distances in every part or in none.")
        arrays = (
            np.ascontiguousarray(code, dtype=np.float32),
            None if refined is None else np.ascontiguousarray(refined, dtype=np.float32),
            np.ascontiguousarray(ids, dtype=np.int64),
            np.ascontiguousarray(cells, dtype=np.int32),
        )
        shape = arrays[0].shape
        if len(shape) != 2 or any(
            a is not None and a.shape != shape for a in arrays
        ) or n_rows >= 0 and shape[0] != n_rows:
            raise ValueError(
                "Expected every part's arrays of one shape (n_rows, width), "
                "with the same n_rows."
            )
        n_rows = shape[0]
        n_items += shape[1]
        views.append(arrays)
    dist_arr = np.full((n_rows, n_neighbors), np.inf, dtype=np.float32)
    ids_arr = np.full((n_rows, n_neighbors), -1, dtype=np.int64)
    if n_rows == 0 or n_items == 0:
        return dist_arr, ids_arr
    cdef float32_t[:, ::1] dist_out = dist_arr
    cdef id_t[:, ::1] ids_out = ids_arr
    cdef Source* sources = <Source*>malloc(n_parts * sizeof(Source))
    if sources == NULL:
        raise MemoryError("annlearn: could not allocate the merge buffers.")
    cdef const float32_t[:, ::1] fview
    cdef const id_t[:, ::1] iview
    cdef const int32_t[:, ::1] cview
    for p, arrays in enumerate(views):
        sources[p].width = arrays[0].shape[1]
        sources[p].code = sources[p].exact = NULL
        sources[p].ids = NULL
        sources[p].cells = NULL
        if sources[p].width == 0:
            continue
        fview = arrays[0]
        sources[p].code = &fview[0, 0]
        if exact:
            fview = arrays[1]
            sources[p].exact = &fview[0, 0]
        iview = arrays[2]
        sources[p].ids = &iview[0, 0]
        cview = arrays[3]
        sources[p].cells = &cview[0, 0]
    cdef intp_t kept = min(n_candidates, n_items)
    cdef intp_t shown = min(n_neighbors, kept)
    cdef intp_t r, c, j, at
    cdef Candidate* items = NULL
    cdef Candidate* best = NULL
    cdef intp_t* heap = NULL
    cdef int failed = 0
    cdef int* failed_ptr = &failed
    with nogil, parallel(num_threads=<int>max(1, min(n_threads, n_rows // 256))):
        items = <Candidate*>malloc((n_items + kept) * sizeof(Candidate))
        heap = <intp_t*>malloc(kept * sizeof(intp_t))
        for r in prange(n_rows, schedule="static"):
            if items == NULL or heap == NULL:
                failed_ptr[0] = 1
                continue
            at = 0
            for p in range(n_parts):
                for c in range(sources[p].width):
                    j = r * sources[p].width + c
                    items[at].code = sources[p].code[j]
                    items[at].exact = sources[p].exact[j] if exact else sources[p].code[j]
                    items[at].id = sources[p].ids[j]
                    items[at].cell = sources[p].cells[j]
                    at = at + 1
            # With exact distances, the kept set is ranked again: its order
            # by code distance does not matter.
            _select(items, n_items, kept, False, heap, not exact)
            if exact:
                best = items + n_items
                for c in range(kept):
                    best[c] = items[heap[c]]
                _select(best, kept, shown, True, heap)
            else:
                best = items
            for c in range(shown):
                if best[heap[c]].id >= 0:
                    dist_out[r, c] = best[heap[c]].exact
                    ids_out[r, c] = best[heap[c]].id
        free(items)
        free(heap)
    free(sources)
    if failed:
        raise MemoryError("annlearn: could not allocate the merge buffers.")
    return dist_arr, ids_arr
