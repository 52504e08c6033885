# Growable lists of the hits of a radius search: (query, row, distance).
#
# A radius search returns as many hits as there are, so its output cannot be
# preallocated: each thread appends to its own ``Hits`` (no locking), which
# doubles its arrays when full, and ``hits_collect`` joins the threads' lists
# afterwards, sorted by (query, row), into one CSR-like result. Memory is the
# size of the output plus the per-thread tiles of the search.
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy

import numpy as np

from annlearn._utils._typedefs cimport float32_t, id_t, intp_t


cdef struct Hits:
    id_t* queries
    id_t* rows
    float32_t* distances
    intp_t size
    intp_t capacity
    bint failed  # an allocation failed: the caller raises MemoryError


cdef inline void hits_append(
    Hits* h, id_t query, id_t row, float32_t distance
) noexcept nogil:
    cdef intp_t capacity
    cdef void* q
    cdef void* r
    cdef void* d
    if h.failed:
        return
    if h.size == h.capacity:
        capacity = 2 * h.capacity if h.capacity else 1024
        # realloc leaves the old block valid when it fails, so each array
        # is replaced only once it was moved.
        q = realloc(h.queries, capacity * sizeof(id_t))
        if q != NULL:
            h.queries = <id_t*> q
        r = realloc(h.rows, capacity * sizeof(id_t))
        if r != NULL:
            h.rows = <id_t*> r
        d = realloc(h.distances, capacity * sizeof(float32_t))
        if d != NULL:
            h.distances = <float32_t*> d
        if q == NULL or r == NULL or d == NULL:
            h.failed = 1
            return
        h.capacity = capacity
    h.queries[h.size] = query
    h.rows[h.size] = row
    h.distances[h.size] = distance
    h.size += 1


cdef inline void hits_free(Hits* hits, intp_t n) noexcept nogil:
    cdef intp_t t
    for t in range(n):
        free(hits[t].queries)
        free(hits[t].rows)
        free(hits[t].distances)


cdef inline object hits_collect(Hits* hits, intp_t n, intp_t n_queries):
    """``(indptr, rows, distances)`` of the ``n`` lists, sorted by (query,
    row); frees the lists. MemoryError if an append failed."""
    cdef intp_t t, total = 0, at = 0
    failed = False
    for t in range(n):
        total += hits[t].size
        failed = failed or hits[t].failed
    if failed:
        hits_free(hits, n)
        raise MemoryError("annlearn: could not grow the radius search results.")
    queries = np.empty(total, dtype=np.int64)
    rows = np.empty(total, dtype=np.int64)
    distances = np.empty(total, dtype=np.float32)
    cdef id_t[::1] q = queries
    cdef id_t[::1] r = rows
    cdef float32_t[::1] d = distances
    for t in range(n):
        if hits[t].size:
            memcpy(&q[at], hits[t].queries, hits[t].size * sizeof(id_t))
            memcpy(&r[at], hits[t].rows, hits[t].size * sizeof(id_t))
            memcpy(&d[at], hits[t].distances, hits[t].size * sizeof(float32_t))
            at += hits[t].size
    hits_free(hits, n)
    order = np.lexsort((rows, queries))
    indptr = np.zeros(n_queries + 1, dtype=np.int64)
    np.cumsum(np.bincount(queries, minlength=n_queries), out=indptr[1:])
    return indptr, rows[order], distances[order]
