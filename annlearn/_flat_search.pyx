"""Exact k-nearest-neighbour search: blocked GEMM fused with top-k heaps.

Design
------
For a block of queries X[xs:xe] and a block of database rows Y[ys:ye] one
GEMM gives every inner product x.y. The ranking score is then

- L2 metrics:      ||y||^2 - 2 x.y   (||x||^2 is the same for every y of one
                                      query, so it is left out of the ranking)
- inner products:  -x.y              (cosine uses unit-norm rows)

and each score is offered to the query's bounded max-heap, whose root is the
k-th best so far: most candidates are rejected by one comparison. The GEMM
writes into a per-thread buffer of x_chunk * y_chunk floats, so memory is
O(threads * block), never n_queries * n_database.

Two ways to share the work between threads (scikit-learn's
PairwiseDistancesReduction names):

parallel_on_X (batches)
    Query chunks are split between threads. Each thread's heaps are rows of the
    output arrays: no synchronisation, no merge.

parallel_on_Y (a few queries: latency)
    The database is cut into one contiguous range per thread. The queries are
    taken one block of x_chunk at a time: each thread keeps its own heaps for
    the block's queries, and these are merged per query row before the next
    block (the heap's id tie-break makes the merge order irrelevant). The
    heaps thus take n_threads * x_chunk * k entries, never n_threads *
    n_queries * k.

    ::

        queries  ──┬── thread 0: Y[0      : n/2] ──> heaps_0 ─┐
                   └── thread 1: Y[n/2    : n  ] ──> heaps_1 ─┴─ merge ──> out

Each thread issues its own single-threaded sgemm: the caller caps BLAS at one
thread for the duration of the call (``annlearn._threads.blas_single_thread``)
so that n OpenMP threads never start n x m BLAS threads.

Finalisation re-computes the exact distance of the k winners directly from
the vectors (sum of squared differences, accumulated in float64): the
||x||^2 + ||y||^2 - 2 x.y form loses precision by cancellation when x and y
are close, the winners are re-sorted on the exact values, and the returned
distances are accurate to float32 rounding.

With a ``bound`` (``annlearn/_pca_bound.py``) the same loops run the GEMM on
short projections of the queries and the database, whose scores bound the
exact ones from below; ``_offer_row`` then computes the exact score (a
dot product on the full vectors) only of the candidates whose bound may beat
the query's current k-th best. Heaps, finalisation and results are those of
brute force.

Radius search (``flat_radius``) runs the same GEMM blocks, one (query block,
database block) tile per task, and screens each score against the query's
limit instead of a heap root; every survivor gets its exact distance (float64,
as in finalisation) and is kept when within the radius, in the thread's own
growable list (``_utils/_hits.pxd``).
"""

import os

import numpy as np

cimport cython
from cython.parallel cimport parallel, prange
from libc.math cimport sqrt
from libc.stdint cimport INT64_MAX, uint64_t
from libc.stdlib cimport calloc, free

from annlearn._utils._blas cimport gemm_abt
from annlearn._utils._packed_gemm cimport (
    ANNLEARN_ISA_AVX512,
    annlearn_dot_rows,
    annlearn_gemm_mr,
    annlearn_gemm_nr,
    annlearn_isa,
    annlearn_pack_panels,
    annlearn_pack_rows,
    annlearn_packed_gemm_abt,
    annlearn_packed_gemm_available,
    annlearn_packed_size,
)
from annlearn._utils._heap cimport heap_greater, heap_init, heap_push, heap_sort
from annlearn._utils._hits cimport Hits, hits_append, hits_collect, hits_free
from annlearn._utils._openmp_helpers cimport annlearn_omp_barrier, omp_get_thread_num
from annlearn._utils._typedefs cimport float32_t, float64_t, id_t, intp_t


cdef extern from "_simd.h" nogil:
    float annlearn_inner_product(const float* x, const float* y, Py_ssize_t d)
    float annlearn_l2sqr(const float* x, const float* y, Py_ssize_t d)
    double annlearn_l2sqr_f64(const float* x, const float* y, Py_ssize_t d)
    double annlearn_inner_product_f64(const float* x, const float* y, Py_ssize_t d)

# Metric codes understood by the kernel (the Python side maps names to these).
cpdef enum:
    METRIC_SQEUCLIDEAN = 0
    METRIC_EUCLIDEAN = 1
    METRIC_INNER_PRODUCT = 2
    METRIC_COSINE = 3

# Which GEMM computes the inner products of a block:
#
# - "packed": annlearn's packed GEMM with an AVX-512 or AVX2+FMA micro-kernel
#   (_utils/_packed_gemm.h), used when the CPU has either. It does not depend
#   on which kernel the BLAS library picked (OpenBLAS may be told by
#   OPENBLAS_CORETYPE to run its AVX2 kernel on an AVX-512 CPU), adds the
#   database norms in its epilogue, and keeps its output block in L2.
#   Blocks of fewer than PACKED_MIN_QUERIES queries are memory-bound: packing
#   the database block would only add traffic, so a row-dot kernel streams
#   the database rows directly instead.
# - "blas": sgemm from SciPy's BLAS, on CPUs with neither.
#
# ANNLEARN_GEMM=blas in the environment forces BLAS (for comparisons);
# ANNLEARN_ISA=avx2 forces the AVX2 kernels on an AVX-512 CPU.
PACKED_GEMM_AVAILABLE = bool(annlearn_packed_gemm_available())
DEFAULT_GEMM = (
    "packed"
    if PACKED_GEMM_AVAILABLE and os.environ.get("ANNLEARN_GEMM", "auto") != "blas"
    else "blas"
)

cdef enum:
    PACKED_MIN_QUERIES = 48
    # Work (multiply-adds) worth one more thread in the small loops.
    WORK_PER_THREAD = 1 << 18

# Default (query, database) block sizes per GEMM. Packed: a block of ~1000
# queries (a multiple of the 12-row micro-tile) is packed once and stays in L3
# while database blocks, packed per block, stream past it from L2: 256 rows
# fill 1 MiB of L2 with the AVX-512 kernel, 128 rows half that with AVX2.
# BLAS: a 512 x 2048 float32 output block (4 MiB). The block sizes that were
# compared are in benchmarks/README.md (bench_flat).
DEFAULT_CHUNKS = {
    "packed": (1020, 256) if annlearn_isa() == ANNLEARN_ISA_AVX512 else (1020, 128),
    "blas": (512, 2048),
}


cdef inline intp_t _imin(intp_t a, intp_t b) noexcept nogil:
    return a if a < b else b


cdef enum:
    # Candidates are screened SCREEN at a time: one vectorisable pass tells
    # whether any of them beats the heap's root, and only then are they
    # offered one by one. Almost every block of a long scan is rejected.
    SCREEN = 16


cdef struct Bound:
    # The scan computes lower bounds of the scores from short projected
    # vectors (annlearn/_pca_bound.py); a candidate whose bound may beat the
    # heap's root gets its exact score from the full vectors below.
    const float32_t* X          # full queries (n_queries, n_features)
    const float32_t* Y          # full database (n_database, n_features)
    const float32_t* Y_sqnorms  # their squared norms (L2 metrics)
    const float32_t* shift      # per query: bound <= root + shift[q] survives
    intp_t n_features
    bint l2


cdef inline float32_t _exact_score(
    const Bound* b, intp_t query, intp_t row
) noexcept nogil:
    """The score brute force ranks by: ||y||^2 - 2 x.y (L2) or -x.y."""
    cdef float32_t dot = annlearn_inner_product(
        b.X + query * b.n_features, b.Y + row * b.n_features, b.n_features)
    return b.Y_sqnorms[row] - 2.0 * dot if b.l2 else -dot


cdef inline int _is_allowed(const uint64_t* allowed, intp_t row) noexcept nogil:
    """Bit ``row`` of a filter bitmap (NULL: every row is allowed)."""
    return allowed == NULL or <int>((allowed[row >> 6] >> (row & 63)) & 1)


cdef inline void _offer_row(
    const float32_t* scores, intp_t n, intp_t first_id,
    intp_t k, float32_t* values, id_t* ids, const Bound* b, intp_t query,
    const uint64_t* allowed,
) noexcept nogil:
    """Offer ``scores[j]`` with id ``first_id + j`` to one query's heap.

    With a bound ``b``, ``scores`` are lower bounds: a candidate whose bound
    may beat the root (``<= root + shift``) is offered with its exact score.
    With a filter ``allowed`` (a bitmap over rows, or NULL), a row whose bit
    is clear fails the screen: it is never scored exactly nor offered.
    """
    cdef intp_t j0 = 0, j1, j
    cdef int hit
    cdef float32_t shift = 0.0 if b == NULL else b.shift[query], score
    cdef float32_t limit = values[0] + shift
    while j0 < n:
        j1 = _imin(j0 + SCREEN, n)
        hit = 0
        if allowed == NULL:
            for j in range(j0, j1):
                hit = hit | (scores[j] <= limit)
        else:
            for j in range(j0, j1):
                hit = hit | ((scores[j] <= limit) & _is_allowed(allowed, first_id + j))
        if hit:
            for j in range(j0, j1):
                # Ids arrive in increasing order, so "<=" lets heap_push
                # settle exact ties on the id.
                if scores[j] <= limit and _is_allowed(allowed, first_id + j):
                    score = scores[j] if b == NULL else _exact_score(
                        b, query, first_id + j)
                    if score <= values[0]:
                        heap_push(values, ids, k, score, <id_t>(first_id + j))
                        limit = values[0] + shift
        j0 = j1


cdef void _scan_block(
    const float32_t* X, intp_t n_features, intp_t xs, intp_t xe,
    const float32_t* Y, intp_t ys, intp_t ye,
    const float32_t* Y_sqnorms, bint l2,
    intp_t k, float32_t* heap_values, id_t* heap_ids,
    float32_t* buf, float32_t* packed_x, float32_t* packed_y, intp_t y_chunk,
    const Bound* bound, const uint64_t* allowed, intp_t allow_stride,
) noexcept nogil:
    """Offer every (x in X[xs:xe], y in Y[ys:ye]) score to the rows' heaps.

    ``heap_values``/``heap_ids`` point at the heap of query ``xs``; the heap
    of query ``xs + i`` starts ``i * k`` further. Heaps are not initialised
    here: a caller may scan several database ranges into the same heaps.
    ``packed_x``/``packed_y`` are the packing buffers of the packed GEMM, or
    NULL to use BLAS. With a ``bound``, X and Y are the projected vectors
    whose scores bound the exact ones from below (see ``Bound``). With a
    filter, query q offers only the rows set in its bitmap
    ``allowed + q * allow_stride`` (stride 0: one bitmap for every query).
    """
    cdef intp_t nx = xe - xs, ny, y0, y1, i, j
    cdef float32_t* row
    cdef float32_t* values
    cdef id_t* ids
    # alpha = -2 folds the factor of the L2 score into the GEMM.
    cdef float32_t alpha = -2.0 if l2 else -1.0
    # Packed GEMM for blocks of many queries; below PACKED_MIN_QUERIES the
    # work is memory-bound and the row-dot kernel streams Y directly.
    cdef bint packed = packed_x != NULL and nx >= PACKED_MIN_QUERIES
    cdef bint few = packed_x != NULL and not packed
    if packed:
        # The query block is packed once and reused for every database block.
        annlearn_pack_rows(X + xs * n_features, n_features, nx, n_features,
                           annlearn_gemm_mr(), packed_x)
    y0 = ys
    while y0 < ye:
        y1 = _imin(y0 + y_chunk, ye)
        ny = y1 - y0
        if packed:
            annlearn_pack_panels(Y + y0 * n_features, n_features, ny,
                                 n_features, packed_y)
            annlearn_packed_gemm_abt(nx, ny, n_features, alpha, packed_x,
                                     packed_y, Y_sqnorms + y0 if l2 else NULL,
                                     buf, ny)
        elif few:
            annlearn_dot_rows(nx, ny, n_features, alpha, X + xs * n_features,
                              n_features, Y + y0 * n_features, n_features,
                              buf, ny)
        else:
            gemm_abt(nx, ny, n_features, alpha, X + xs * n_features, n_features,
                     Y + y0 * n_features, n_features, <float32_t>0.0, buf, ny)
        for i in range(nx):
            row = buf + i * ny
            values = heap_values + i * k
            ids = heap_ids + i * k
            if l2 and not packed:
                # The GEMM wrote -2 x.y; adding ||y||^2 in place makes the
                # scan below the same for every metric. (The packed GEMM
                # adds it in its epilogue.)
                for j in range(ny):
                    row[j] = row[j] + Y_sqnorms[y0 + j]
            _offer_row(row, ny, y0, k, values, ids, bound, xs + i,
                       NULL if allowed == NULL else
                       allowed + (xs + i) * allow_stride)
        y0 = y1


cdef struct Workspace:
    # Every thread's GEMM buffers, slices of one numpy array: a task that
    # allocates through annlearn._utils._pool (annlearn.dask) reuses them.
    float32_t* base   # 64-byte aligned
    intp_t stride     # floats per thread
    intp_t packed_x   # offsets in a thread's slice, -1: BLAS, no packing
    intp_t packed_y


cdef inline intp_t _aligned(intp_t n_floats) noexcept nogil:
    """``n_floats`` rounded up to 64 bytes."""
    return (n_floats + 15) // 16 * 16


cdef object _workspace(
    Workspace* w, int n_threads, intp_t rows_x, intp_t rows_y, intp_t n_features,
    bint packed,
):
    """Fill ``w`` for ``n_threads`` threads scanning blocks of ``rows_x`` x
    ``rows_y``; returns the array that holds the buffers (keep it alive).
    np.empty touches no page: each thread first-touches its own slice."""
    cdef intp_t size = _aligned(rows_x * rows_y)
    w.packed_x = w.packed_y = -1
    if packed:
        w.packed_x = size
        size += _aligned(annlearn_packed_size(rows_x, n_features, annlearn_gemm_mr()))
        w.packed_y = size
        size += _aligned(annlearn_packed_size(rows_y, n_features, annlearn_gemm_nr()))
    w.stride = size
    array = np.empty(n_threads * size + 16, dtype=np.float32)
    cdef float32_t[::1] view = array
    w.base = <float32_t*>((<size_t>&view[0] + 63) & ~(<size_t>63))
    return array


cdef inline float32_t* _buffer(const Workspace* w, int thread, intp_t at) noexcept nogil:
    """Thread ``thread``'s buffer at offset ``at`` of its slice (NULL for -1)."""
    if at < 0:
        return NULL
    return w.base + thread * w.stride + at


cdef void _finalize_row(
    const float32_t* x, const float32_t* Y, intp_t n_features,
    intp_t k, float32_t* values, id_t* ids, int metric,
) noexcept nogil:
    """Turn one query's heap into sorted distances (see module docstring)."""
    cdef intp_t r, s
    cdef float32_t value
    cdef id_t value_id
    heap_sort(values, ids, k)
    # A slot still empty (only possible when scores overflowed to NaN) is
    # reported as id -1 at +inf rather than read out of bounds.
    while k > 0 and ids[k - 1] == INT64_MAX:
        ids[k - 1] = -1
        k = k - 1
    if metric == METRIC_SQEUCLIDEAN or metric == METRIC_EUCLIDEAN:
        for r in range(k):
            values[r] = <float32_t>annlearn_l2sqr_f64(x, Y + ids[r] * n_features,
                                                      n_features)
        # Insertion sort on the exact values (k is small, the order is
        # almost right already).
        for r in range(1, k):
            value = values[r]
            value_id = ids[r]
            s = r - 1
            while s >= 0 and heap_greater(values[s], ids[s], value, value_id):
                values[s + 1] = values[s]
                ids[s + 1] = ids[s]
                s = s - 1
            values[s + 1] = value
            ids[s + 1] = value_id
        if metric == METRIC_EUCLIDEAN:
            for r in range(k):
                values[r] = sqrt(values[r])
    elif metric == METRIC_COSINE:
        # score = -cos(x, y); distance = 1 - cos, clamped to [0, 2].
        for r in range(k):
            value = 1.0 + values[r]
            values[r] = 0.0 if value < 0.0 else (2.0 if value > 2.0 else value)
    # METRIC_INNER_PRODUCT: the distance is the score, -x.y.


def flat_kneighbors(
    const float32_t[:, ::1] X,
    const float32_t[:, ::1] Y,
    const float32_t[::1] Y_sqnorms,
    intp_t k,
    int metric,
    int n_threads,
    x_chunk=None,
    y_chunk=None,
    str strategy="auto",
    str gemm="auto",
    bound=None,
    allowed=None,
):
    """k nearest rows of ``Y`` for every row of ``X``, exactly.

    Parameters
    ----------
    X : ndarray of shape (n_queries, n_features), float32, C-contiguous
        Queries (unit-norm rows for cosine).
    Y : ndarray of shape (n_database, n_features), float32, C-contiguous
        Database (unit-norm rows for cosine). May be read-only (memmap).
    Y_sqnorms : ndarray of shape (n_database,), float32
        Squared norms of the rows of ``Y`` (read for the L2 metrics only).
    k : int
        Number of neighbours, ``1 <= k <= n_database``.
    metric : int
        One of the ``METRIC_*`` codes of this module.
    n_threads : int
        OpenMP threads (>= 1). The caller must cap BLAS at one thread.
    x_chunk, y_chunk : int, default=None
        Block sizes of the GEMM (defaults per GEMM in ``DEFAULT_CHUNKS``);
        results do not depend on them. ``parallel_on_Y`` keeps per-thread
        heaps for ``x_chunk`` queries at a time: ``n_threads * x_chunk * k``
        entries of 12 bytes.
    strategy : {"auto", "parallel_on_X", "parallel_on_Y"}
        How threads share the work; results do not depend on it.
    gemm : {"auto", "packed", "blas"}
        Which GEMM computes the inner products (see ``DEFAULT_GEMM``).
    bound : tuple (X_proj, Y_proj, Y_proj_sqnorms, shift), default=None
        Projected queries and database whose GEMM scores bound the exact
        scores from below, and the per-query float32 margin under which a
        candidate is scored exactly (``annlearn/_pca_bound.py``). Only the
        survivors' exact scores are computed from ``X`` and ``Y``; the
        result is the same as without.
    allowed : ndarray of shape (1 or n_queries, ceil(n_database / 64)), uint64
        A filter: bit ``j % 64`` of word ``j // 64`` allows row j (one row of
        words for every query, or one per query). Excluded rows are never
        offered to the heaps; each query must allow at least k rows (else
        its last slots are -1). None: every row.

    Returns
    -------
    distances : ndarray of shape (n_queries, k), float32
        Sorted ascending.
    indices : ndarray of shape (n_queries, k), int64
        Row positions in ``Y``; ties are broken by the smaller position.
    """
    cdef intp_t n_queries = X.shape[0], n_database = Y.shape[0]
    cdef intp_t n_features = X.shape[1]
    if Y.shape[1] != n_features:
        raise ValueError(
            f"X has {n_features} features but Y has {Y.shape[1]}."
        )
    if not 1 <= k <= n_database:
        raise ValueError(f"Expected 1 <= k <= {n_database}, got k={k}.")
    if Y_sqnorms.shape[0] != n_database:
        raise ValueError("Y_sqnorms must have one entry per row of Y.")
    if gemm == "auto":
        gemm = DEFAULT_GEMM
    if gemm not in DEFAULT_CHUNKS:
        raise ValueError(f"Unknown gemm {gemm!r}.")
    if gemm == "packed" and not PACKED_GEMM_AVAILABLE:
        raise ValueError("The packed GEMM needs a CPU with AVX-512F or AVX2+FMA.")
    balance = x_chunk is None
    x_chunk = DEFAULT_CHUNKS[gemm][0] if x_chunk is None else int(x_chunk)
    y_chunk = DEFAULT_CHUNKS[gemm][1] if y_chunk is None else int(y_chunk)
    if n_threads < 1 or x_chunk < 1 or y_chunk < 1:
        raise ValueError("n_threads, x_chunk and y_chunk must be positive.")
    cdef bint packed = gemm == "packed"
    # 32-bit BLAS sizes: a block's element count must stay below 2**31.
    y_chunk = min(y_chunk, n_database)
    x_chunk = min(x_chunk, max(n_queries, 1))
    if x_chunk * y_chunk >= 2 ** 31 or y_chunk * n_features >= 2 ** 31:
        raise ValueError("Block too large for 32-bit BLAS sizes.")

    cdef const uint64_t[:, ::1] allow
    cdef const uint64_t* allow_ptr = NULL
    cdef intp_t allow_stride = 0
    if allowed is not None:
        allowed, allow_stride = _check_allowed(allowed, n_queries, n_database)
        allow = allowed
        allow_ptr = &allow[0, 0]

    distances_arr = np.empty((n_queries, k), dtype=np.float32)
    indices_arr = np.empty((n_queries, k), dtype=np.int64)
    if n_queries == 0:
        return distances_arr, indices_arr
    cdef float32_t[:, ::1] distances = distances_arr
    cdef id_t[:, ::1] indices = indices_arr

    if strategy == "auto":
        strategy = (
            "parallel_on_X" if n_queries >= n_threads * x_chunk else "parallel_on_Y"
        )
    if balance and strategy == "parallel_on_X":
        # Blocks of at most the default size, as many as a multiple of the
        # number of threads: 10,000 queries on 2 threads make 10 blocks of
        # 1000, not 9 of 1020 and one of 820 (one thread idle at the end).
        n_blocks = -(-n_queries // x_chunk)
        n_blocks = -(-n_blocks // n_threads) * n_threads
        x_chunk = -(-n_queries // n_blocks)
    cdef const float32_t[:, ::1] GX
    cdef const float32_t[:, ::1] GY
    cdef const float32_t[::1] G_sqnorms
    cdef const float32_t[::1] shift
    GX, GY, G_sqnorms, shift = _scanned_arrays(X, Y, Y_sqnorms, bound)
    cdef Bound b
    cdef Bound* bound_ptr = NULL
    if bound is not None:
        _fill_bound(&b, X, Y, Y_sqnorms, shift, metric)
        bound_ptr = &b
    if strategy == "parallel_on_X":
        _parallel_on_X(X, Y, Y_sqnorms, k, metric, n_threads, x_chunk, y_chunk,
                       packed, distances, indices, GX, GY, G_sqnorms, bound_ptr,
                       allow_ptr, allow_stride)
    elif strategy == "parallel_on_Y":
        _parallel_on_Y(X, Y, Y_sqnorms, k, metric, n_threads, x_chunk, y_chunk,
                       packed, distances, indices, GX, GY, G_sqnorms, bound_ptr,
                       allow_ptr, allow_stride)
    else:
        raise ValueError(f"Unknown strategy {strategy!r}.")
    return distances_arr, indices_arr


def _check_allowed(allowed, intp_t n_queries, intp_t n_rows):
    """(bitmap, row stride) of a filter over ``n_rows`` rows: one row of
    uint64 words for every query (stride 0) or one per query."""
    cdef intp_t n_words = (n_rows + 63) >> 6
    shape = np.shape(allowed)
    if (np.asarray(allowed).dtype != np.uint64 or len(shape) != 2
            or shape[0] not in (1, n_queries) or shape[1] != n_words
            or n_words == 0):
        raise ValueError(
            f"Expected allowed of dtype uint64 and shape (1 or {n_queries}, "
            f"{n_words}), got {np.asarray(allowed).dtype} {shape}."
        )
    return allowed, (n_words if shape[0] > 1 else 0)


def rows_kneighbors(
    const float32_t[:, ::1] X,
    const float32_t[:, ::1] Y,
    const id_t[::1] indptr,
    const id_t[::1] rows,
    intp_t k,
    int metric,
    int n_threads,
):
    """k nearest rows of ``Y`` for each query among listed rows, exactly.

    The search over few allowed rows: each candidate is scored directly
    (a float32 SIMD distance or inner product, no GEMM, no scan of the other
    rows), and the k winners are finalised as by :func:`flat_kneighbors`
    (exact float64 distances, re-sorted).

    Parameters
    ----------
    X : ndarray of shape (n_queries, n_features), float32
        Queries, prepared as for :func:`flat_kneighbors`.
    Y : ndarray of shape (n_database, n_features), float32
    indptr : ndarray of shape (n_queries + 1,) or (2,), int64
        Query q's candidates are ``rows[indptr[q]:indptr[q + 1]]``; with two
        entries, one list for every query.
    rows : ndarray of shape (n_candidates,), int64
        Row positions in ``Y``, distinct within a list.
    k : int
        Neighbours per query (>= 1); lists shorter than k leave their last
        slots at (+inf, -1).
    metric : int
        One of the ``METRIC_*`` codes.
    n_threads : int
        OpenMP threads (over queries).

    Returns
    -------
    distances : ndarray of shape (n_queries, k), float32
        In the metric's units, ascending.
    indices : ndarray of shape (n_queries, k), int64
        Row positions in ``Y``; ties are broken by the smaller position.
    """
    cdef intp_t n_queries = X.shape[0], n_features = X.shape[1]
    cdef intp_t n_database = Y.shape[0]
    cdef bint shared = indptr.shape[0] == 2
    if Y.shape[1] != n_features or k < 1:
        raise ValueError("X and Y must have the same features, and k >= 1.")
    if not (shared or indptr.shape[0] == n_queries + 1) or indptr[0] != 0 or \
            indptr[indptr.shape[0] - 1] != rows.shape[0] or \
            np.any(np.diff(np.asarray(indptr)) < 0):
        raise ValueError("indptr must increase from 0 to len(rows), one list "
                         "per query or one for all.")
    if rows.shape[0] and (np.min(rows) < 0 or np.max(rows) >= n_database):
        raise ValueError(f"rows must lie in [0, {n_database}).")
    distances_arr = np.empty((n_queries, k), dtype=np.float32)
    indices_arr = np.empty((n_queries, k), dtype=np.int64)
    if n_queries == 0:
        return distances_arr, indices_arr
    cdef float32_t[:, ::1] distances = distances_arr
    cdef id_t[:, ::1] indices = indices_arr
    cdef intp_t q, c, lo, hi
    cdef id_t row
    cdef float32_t score
    cdef bint l2 = metric == METRIC_SQEUCLIDEAN or metric == METRIC_EUCLIDEAN
    cdef intp_t work = (rows.shape[0] * (n_queries if shared else 1)) * n_features
    cdef int n_threads_used = <int>max(1, min(n_threads, n_queries,
                                              work // WORK_PER_THREAD))
    with nogil:
        for q in prange(n_queries, num_threads=n_threads_used, schedule="dynamic"):
            heap_init(&distances[q, 0], &indices[q, 0], k)
            lo = indptr[0 if shared else q]
            hi = indptr[1 if shared else q + 1]
            for c in range(lo, hi):
                row = rows[c]
                # The ranking scores of _finalize_row: a distance for the L2
                # metrics (recomputed exactly there), -x.y otherwise.
                if l2:
                    score = annlearn_l2sqr(&X[q, 0], &Y[row, 0], n_features)
                else:
                    score = -annlearn_inner_product(&X[q, 0], &Y[row, 0],
                                                    n_features)
                heap_push(&distances[q, 0], &indices[q, 0], k, score, row)
            _finalize_row(&X[q, 0], &Y[0, 0], n_features, k,
                          &distances[q, 0], &indices[q, 0], metric)
    return distances_arr, indices_arr


def _scanned_arrays(X, Y, Y_sqnorms, bound):
    """What the GEMM scans: ``(X, Y, Y_sqnorms, shift)`` themselves (shift
    unused), or the projections of a ``bound``, checked against X and Y."""
    if bound is None:
        return X, Y, Y_sqnorms, Y_sqnorms
    GX, GY, G_sqnorms, shift = bound
    if (GX.shape[0] != X.shape[0] or GY.shape[0] != Y.shape[0]
            or GX.shape[1] != GY.shape[1] or G_sqnorms.shape[0] != Y.shape[0]
            or shift.shape[0] != X.shape[0]):
        raise ValueError("bound arrays do not match X and Y.")
    return GX, GY, G_sqnorms, shift


cdef void _fill_bound(
    Bound* b, const float32_t[:, ::1] X, const float32_t[:, ::1] Y,
    const float32_t[::1] Y_sqnorms, const float32_t[::1] shift, int metric,
):
    b.X = &X[0, 0]
    b.Y = &Y[0, 0]
    b.Y_sqnorms = &Y_sqnorms[0]
    b.shift = &shift[0]
    b.n_features = X.shape[1]
    b.l2 = metric == METRIC_SQEUCLIDEAN or metric == METRIC_EUCLIDEAN


cdef void _raise_memory_error() except *:
    raise MemoryError("annlearn: could not allocate a per-thread search buffer.")


cdef void _parallel_on_X(
    const float32_t[:, ::1] X, const float32_t[:, ::1] Y,
    const float32_t[::1] Y_sqnorms, intp_t k, int metric, int n_threads,
    intp_t x_chunk, intp_t y_chunk, bint packed,
    float32_t[:, ::1] distances, id_t[:, ::1] indices,
    const float32_t[:, ::1] GX, const float32_t[:, ::1] GY,
    const float32_t[::1] G_sqnorms, const Bound* bound,
    const uint64_t* allowed, intp_t allow_stride,
) except *:
    # GX, GY, G_sqnorms: what the GEMM scans (X, Y, Y_sqnorms themselves, or
    # their projections with a bound); X and Y: the exact final scores.
    cdef intp_t n_queries = X.shape[0], n_database = Y.shape[0]
    cdef intp_t n_features = X.shape[1], gd = GX.shape[1]
    cdef intp_t n_chunks = (n_queries + x_chunk - 1) // x_chunk
    cdef intp_t chunk, xs, xe, i
    cdef bint l2 = metric == METRIC_SQEUCLIDEAN or metric == METRIC_EUCLIDEAN
    cdef float32_t* buf = NULL
    cdef float32_t* packed_x = NULL
    cdef float32_t* packed_y = NULL
    cdef int n_threads_used = <int>_imin(n_threads, n_chunks)
    cdef int t
    cdef Workspace w
    held = _workspace(&w, n_threads_used, x_chunk, y_chunk, gd, packed)
    with nogil, parallel(num_threads=n_threads_used):
        # This thread's buffers. (Assigned here, not through a pointer:
        # Cython makes variables assigned in the region private.)
        t = omp_get_thread_num()
        buf = _buffer(&w, t, 0)
        packed_x = _buffer(&w, t, w.packed_x)
        packed_y = _buffer(&w, t, w.packed_y)
        for chunk in prange(n_chunks, schedule="static"):
            xs = chunk * x_chunk
            xe = _imin(xs + x_chunk, n_queries)
            for i in range(xs, xe):
                heap_init(&distances[i, 0], &indices[i, 0], k)
            _scan_block(&GX[0, 0], gd, xs, xe, &GY[0, 0], 0, n_database,
                        &G_sqnorms[0], l2, k, &distances[xs, 0], &indices[xs, 0],
                        buf, packed_x, packed_y, y_chunk, bound, allowed,
                        allow_stride)
            for i in range(xs, xe):
                _finalize_row(&X[i, 0], &Y[0, 0], n_features, k,
                              &distances[i, 0], &indices[i, 0], metric)


cdef void _parallel_on_Y(
    const float32_t[:, ::1] X, const float32_t[:, ::1] Y,
    const float32_t[::1] Y_sqnorms, intp_t k, int metric, int n_threads,
    intp_t x_chunk, intp_t y_chunk, bint packed,
    float32_t[:, ::1] distances, id_t[:, ::1] indices,
    const float32_t[:, ::1] GX, const float32_t[:, ::1] GY,
    const float32_t[::1] G_sqnorms, const Bound* bound,
    const uint64_t* allowed, intp_t allow_stride,
) except *:
    # GX, GY, G_sqnorms: what the GEMM scans (X, Y, Y_sqnorms themselves, or
    # their projections with a bound); X and Y: the exact final scores.
    cdef intp_t n_queries = X.shape[0], n_database = Y.shape[0]
    cdef intp_t n_features = X.shape[1], gd = GX.shape[1]
    cdef intp_t n_y_chunks = (n_database + y_chunk - 1) // y_chunk
    cdef int n_threads_used = <int>_imin(n_threads, n_y_chunks)
    cdef intp_t chunks_per_thread = (n_y_chunks + n_threads_used - 1) // n_threads_used
    cdef intp_t n_blocks = (n_queries + x_chunk - 1) // x_chunk
    cdef intp_t block = 0, t, ys, ye, xs, xe, i, q, r, s, j
    cdef bint l2 = metric == METRIC_SQEUCLIDEAN or metric == METRIC_EUCLIDEAN
    cdef float32_t* buf = NULL
    cdef float32_t* packed_x = NULL
    cdef float32_t* packed_y = NULL
    cdef int me
    cdef Workspace w
    # Thread-local heaps for one block of x_chunk queries, not for every
    # query, so that they take n_threads * x_chunk * k entries however many
    # queries there are (the GEMM streams each thread's database range once
    # per block of x_chunk queries in either case).
    cdef float32_t[:, :, ::1] local_values = np.empty(
        (n_threads_used, x_chunk, k), dtype=np.float32)
    cdef id_t[:, :, ::1] local_ids = np.empty(
        (n_threads_used, x_chunk, k), dtype=np.int64)
    held = _workspace(&w, n_threads_used, x_chunk, y_chunk, gd, packed)

    with nogil, parallel(num_threads=n_threads_used):
        # This thread's buffers. (Assigned here, not through a pointer:
        # Cython makes variables assigned in the region private.)
        me = omp_get_thread_num()
        buf = _buffer(&w, me, 0)
        packed_x = _buffer(&w, me, w.packed_x)
        packed_y = _buffer(&w, me, w.packed_y)
        for block in range(n_blocks):
            for t in prange(n_threads_used, schedule="static", chunksize=1):
                ys = _imin(t * chunks_per_thread * y_chunk, n_database)
                ye = _imin(ys + chunks_per_thread * y_chunk, n_database)
                xs = block * x_chunk
                xe = _imin(xs + x_chunk, n_queries)
                for i in range(xe - xs):
                    heap_init(&local_values[t, i, 0], &local_ids[t, i, 0], k)
                # The heap of query xs + i is row i of this thread's heaps.
                _scan_block(&GX[0, 0], gd, xs, xe, &GY[0, 0], ys, ye,
                            &G_sqnorms[0], l2, k, &local_values[t, 0, 0],
                            &local_ids[t, 0, 0], buf, packed_x, packed_y,
                            y_chunk, bound, allowed, allow_stride)
            # Every thread's heaps of the block are complete before any is
            # merged, and merged (below) before the next block re-initialises
            # them: the pranges of a parallel block do not wait by themselves.
            annlearn_omp_barrier()
            for q in prange(block * x_chunk,
                            _imin((block + 1) * x_chunk, n_queries),
                            schedule="static"):
                # Thread 0's heaps are valid heaps; offer them the other
                # threads' entries. The id tie-break makes the result
                # independent of the order.
                r = q - block * x_chunk
                for j in range(k):
                    distances[q, j] = local_values[0, r, j]
                    indices[q, j] = local_ids[0, r, j]
                for s in range(1, n_threads_used):
                    for j in range(k):
                        heap_push(&distances[q, 0], &indices[q, 0], k,
                                  local_values[s, r, j], local_ids[s, r, j])
                _finalize_row(&X[q, 0], &Y[0, 0], n_features, k,
                              &distances[q, 0], &indices[q, 0], metric)
            annlearn_omp_barrier()


def row_sqnorms(const float32_t[:, ::1] X, int n_threads):
    """Squared Euclidean norm of every row (float64 accumulation)."""
    cdef intp_t n = X.shape[0], d = X.shape[1], i, f
    cdef float64_t acc
    out_arr = np.empty(n, dtype=np.float32)
    cdef float32_t[::1] out = out_arr
    # One thread per WORK_PER_THREAD multiply-adds at most: the few rows of a
    # single query never wait for a second thread to be scheduled.
    cdef int n_threads_used = <int>max(1, min(n_threads, n * d // WORK_PER_THREAD))
    with nogil:
        for i in prange(n, num_threads=n_threads_used, schedule="static"):
            acc = 0.0
            for f in range(d):
                acc = acc + <float64_t>X[i, f] * X[i, f]
            out[i] = <float32_t>acc
    return out_arr


cdef inline float64_t _distance64(
    const float32_t* x, const float32_t* y, intp_t n_features, int metric
) noexcept nogil:
    """The exact distance of (x, y) in the metric's units, in float64 (for
    Euclidean, its square: the caller compares squares)."""
    cdef float64_t acc
    if metric == METRIC_SQEUCLIDEAN or metric == METRIC_EUCLIDEAN:
        return annlearn_l2sqr_f64(x, y, n_features)
    acc = annlearn_inner_product_f64(x, y, n_features)
    if metric == METRIC_COSINE:
        acc = 1.0 - acc
        return 0.0 if acc < 0.0 else (2.0 if acc > 2.0 else acc)
    return -acc


cdef void _radius_tile(
    const float32_t* GX, intp_t gd, intp_t xs, intp_t xe,
    const float32_t* GY, intp_t ys, intp_t ye, const float32_t* G_sqnorms,
    const float32_t* X, const float32_t* Y, intp_t n_features,
    const float32_t* limits, float64_t radius, int metric,
    float32_t* buf, float32_t* packed_x, float32_t* packed_y,
    const Bound* bound, Hits* hits,
) noexcept nogil:
    """Append to ``hits`` every pair of the tile within ``radius``.

    The GEMM scores of the tile (on the projections with a ``bound``) are
    screened against ``limits[q]`` (+ the bound's shift); survivors get their
    exact float64 distance.
    """
    cdef intp_t nx = xe - xs, ny = ye - ys, i, j
    cdef bint l2 = metric == METRIC_SQEUCLIDEAN or metric == METRIC_EUCLIDEAN
    cdef float32_t alpha = -2.0 if l2 else -1.0
    cdef bint packed = packed_x != NULL and nx >= PACKED_MIN_QUERIES
    cdef float32_t* row
    cdef float32_t limit, score
    cdef float64_t dist
    if packed:
        annlearn_pack_rows(GX + xs * gd, gd, nx, gd, annlearn_gemm_mr(), packed_x)
        annlearn_pack_panels(GY + ys * gd, gd, ny, gd, packed_y)
        annlearn_packed_gemm_abt(nx, ny, gd, alpha, packed_x, packed_y,
                                 G_sqnorms + ys if l2 else NULL, buf, ny)
    elif packed_x != NULL:
        annlearn_dot_rows(nx, ny, gd, alpha, GX + xs * gd, gd, GY + ys * gd, gd,
                          buf, ny)
    else:
        gemm_abt(nx, ny, gd, alpha, GX + xs * gd, gd, GY + ys * gd, gd,
                 <float32_t>0.0, buf, ny)
    for i in range(nx):
        row = buf + i * ny
        if l2 and not packed:
            for j in range(ny):
                row[j] = row[j] + G_sqnorms[ys + j]
        limit = limits[xs + i]
        if bound != NULL:
            limit = limit + bound.shift[xs + i]
        for j in range(ny):
            if row[j] > limit:
                continue
            if bound != NULL:
                score = _exact_score(bound, xs + i, ys + j)
                if score > limits[xs + i]:
                    continue
            dist = _distance64(X + (xs + i) * n_features, Y + (ys + j) * n_features,
                               n_features, metric)
            if dist <= radius:
                if metric == METRIC_EUCLIDEAN:
                    dist = sqrt(dist)
                hits_append(hits, xs + i, ys + j, <float32_t>dist)


def flat_radius(
    const float32_t[:, ::1] X,
    const float32_t[:, ::1] Y,
    const float32_t[::1] Y_sqnorms,
    const float32_t[::1] limits,
    float64_t radius,
    int metric,
    int n_threads,
    x_chunk=None,
    y_chunk=None,
    str gemm="auto",
    bound=None,
):
    """Every row of ``Y`` within ``radius`` of each row of ``X``, exactly.

    Parameters
    ----------
    X, Y, Y_sqnorms, metric, n_threads, x_chunk, y_chunk, gemm, bound
        As for :func:`flat_kneighbors`.
    limits : ndarray of shape (n_queries,), float32
        Per query, the largest GEMM score (``||y||^2 - 2 x.y`` or ``-x.y``)
        that may still be within the radius, float32 rounding included: a
        screen only, every survivor is checked on its exact distance.
    radius : float
        In the metric's units, squared for ``METRIC_EUCLIDEAN``.

    Returns
    -------
    indptr : ndarray of shape (n_queries + 1,), int64
        The hits of query ``q`` are ``indptr[q]:indptr[q + 1]``.
    rows : ndarray of shape (n_hits,), int64
        Row positions in ``Y``, increasing within each query.
    distances : ndarray of shape (n_hits,), float32
        Their distances in the metric's units (not squared for Euclidean).
    """
    cdef intp_t n_queries = X.shape[0], n_database = Y.shape[0]
    cdef intp_t n_features = X.shape[1]
    if Y.shape[1] != n_features or Y_sqnorms.shape[0] != n_database:
        raise ValueError("X, Y and Y_sqnorms do not match.")
    if limits.shape[0] != n_queries:
        raise ValueError("limits must have one entry per query.")
    if gemm == "auto":
        gemm = DEFAULT_GEMM
    if gemm not in DEFAULT_CHUNKS or (gemm == "packed" and not PACKED_GEMM_AVAILABLE):
        raise ValueError(f"Unavailable gemm {gemm!r}.")
    cdef bint packed = gemm == "packed"
    cdef intp_t xc = min(DEFAULT_CHUNKS[gemm][0] if x_chunk is None else int(x_chunk),
                         max(n_queries, 1))
    cdef intp_t yc = min(DEFAULT_CHUNKS[gemm][1] if y_chunk is None else int(y_chunk),
                         max(n_database, 1))
    if n_threads < 1 or xc < 1 or yc < 1:
        raise ValueError("n_threads, x_chunk and y_chunk must be positive.")
    cdef const float32_t[:, ::1] GX
    cdef const float32_t[:, ::1] GY
    cdef const float32_t[::1] G_sqnorms
    cdef const float32_t[::1] shift
    GX, GY, G_sqnorms, shift = _scanned_arrays(X, Y, Y_sqnorms, bound)
    cdef Bound b
    cdef Bound* bound_ptr = NULL
    if bound is not None:
        _fill_bound(&b, X, Y, Y_sqnorms, shift, metric)
        bound_ptr = &b
    cdef intp_t gd = GX.shape[1]
    cdef intp_t n_xb = (n_queries + xc - 1) // xc, n_yb = (n_database + yc - 1) // yc
    cdef intp_t n_tiles = n_xb * n_yb if n_queries and n_database else 0
    cdef int n_threads_used = <int>max(1, _imin(n_threads, n_tiles))
    cdef Hits* hits = <Hits*> calloc(n_threads_used, sizeof(Hits))
    if hits == NULL:
        _raise_memory_error()
    cdef intp_t tile, xs, ys
    cdef float32_t* buf = NULL
    cdef float32_t* packed_x = NULL
    cdef float32_t* packed_y = NULL
    cdef int t
    cdef Workspace w
    held = _workspace(&w, n_threads_used, xc, yc, gd, packed)
    with nogil, parallel(num_threads=n_threads_used):
        t = omp_get_thread_num()
        buf = _buffer(&w, t, 0)
        packed_x = _buffer(&w, t, w.packed_x)
        packed_y = _buffer(&w, t, w.packed_y)
        # Tiles of one query block are consecutive: a thread's tiles mostly
        # share their queries.
        for tile in prange(n_tiles, schedule="dynamic"):
            xs = (tile // n_yb) * xc
            ys = (tile % n_yb) * yc
            _radius_tile(&GX[0, 0], gd, xs, _imin(xs + xc, n_queries),
                         &GY[0, 0], ys, _imin(ys + yc, n_database), &G_sqnorms[0],
                         &X[0, 0], &Y[0, 0], n_features, &limits[0], radius,
                         metric, buf, packed_x, packed_y, bound_ptr, &hits[t])
    try:
        return hits_collect(hits, n_threads_used, n_queries)
    finally:
        free(hits)
