"""Merging the candidates of several parts of an index: a top-k per row.

A sharded index (``annlearn.dask``) asks every shard for its best candidates
and keeps, per query, the best of their union. ``best_columns`` is that
selection: per row, the columns of the ``width`` best candidates by
(distance, cell, id), the order in which one index ranks equal distances
(by the row of its lists: cell, then insertion order, the same as id order
for the default ids). Empty slots (id -1) rank last.

Each row is a bounded max-heap of column indices (its root the current
worst kept, as ``_utils/_heap.pxd``, with the longer key), then sorted:
O(n_columns log width) per row, against the full sort of every row that
numpy would need for the same three keys. Threads split the rows.
"""

import numpy as np

from cython.parallel cimport parallel, prange
from libc.math cimport INFINITY
from libc.stdint cimport INT64_MAX, int32_t
from libc.stdlib cimport free, malloc

from annlearn._utils._typedefs cimport float32_t, id_t, intp_t


cdef struct Row:
    # One row's candidates, as the rule reads them.
    const float32_t* dist
    const id_t* ids
    const int32_t* cells  # NULL: no cell key


cdef inline bint _after(const Row* row, intp_t a, intp_t b) noexcept nogil:
    """True if column ``a`` ranks after column ``b``: by distance (+inf for
    an empty slot), then cell, then id (the largest for an empty slot)."""
    cdef float32_t da = INFINITY if row.ids[a] < 0 else row.dist[a]
    cdef float32_t db = INFINITY if row.ids[b] < 0 else row.dist[b]
    cdef id_t ia, ib
    if da != db:
        return da > db
    if row.cells != NULL and row.cells[a] != row.cells[b]:
        return row.cells[a] > row.cells[b]
    ia = INT64_MAX if row.ids[a] < 0 else row.ids[a]
    ib = INT64_MAX if row.ids[b] < 0 else row.ids[b]
    if ia != ib:
        return ia > ib
    return a > b


cdef inline void _sift_down(
    const Row* row, intp_t* heap, intp_t size, intp_t start, intp_t column
) noexcept nogil:
    """Place ``column`` at ``start`` of the max-heap and sift it down."""
    cdef intp_t current = start, child
    while True:
        child = 2 * current + 1
        if child >= size:
            break
        if child + 1 < size and _after(row, heap[child + 1], heap[child]):
            child = child + 1
        if not _after(row, heap[child], column):
            break
        heap[current] = heap[child]
        current = child
    heap[current] = column


cdef void _best_row(const float32_t* dist, const id_t* ids, const int32_t* cells,
                    intp_t n_columns, intp_t width, intp_t* heap,
                    id_t* out) noexcept nogil:
    """The ``width`` best columns of one row, best first, into ``out``."""
    cdef intp_t c, i, last
    cdef Row one
    cdef Row* row = &one
    one.dist = dist
    one.ids = ids
    one.cells = cells
    # The first ``width`` columns, heapified; then every other column that
    # ranks before the root replaces it.
    for c in range(width):
        heap[c] = c
    for i in range(width // 2 - 1, -1, -1):
        _sift_down(row, heap, width, i, heap[i])
    for c in range(width, n_columns):
        if _after(row, heap[0], c):
            _sift_down(row, heap, width, 0, c)
    # Heap sort: the root (worst) goes last.
    for last in range(width - 1, -1, -1):
        out[last] = heap[0]
        if last:
            _sift_down(row, heap, last, 0, heap[last])


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
    cdef intp_t* heap = NULL
    cdef int failed = 0
    cdef int* failed_ptr = &failed
    with nogil, parallel(num_threads=<int>max(1, min(n_threads, n_rows // 256))):
        heap = <intp_t*>malloc(width * sizeof(intp_t))
        for r in prange(n_rows, schedule="static"):
            if heap == NULL:
                failed_ptr[0] = 1
                continue
            _best_row(&dist[r, 0], &ids[r, 0], &cells[r, 0] if with_cells else NULL,
                      n_columns, width, heap, &columns[r, 0])
        free(heap)
    if failed:
        raise MemoryError("annlearn: could not allocate the merge buffers.")
    return columns_arr
