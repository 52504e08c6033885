"""IVF-PQ search kernels: scan the probed inverted lists with ADC, re-rank.

Distances by asymmetric distance computation (ADC)
--------------------------------------------------
A database vector y in cell c is stored as the codes of its residual
r = y - c (``by_residual``) or of y itself, one code per sub-space:
y ~ c + sum_m e_m(code_m), e_m being the codeword embedded in sub-space m.
For a query x (never quantized: "asymmetric"), with the sub-vectors x_m,

    ||x - y||^2 ~ ||x - c||^2                                   (term 1)
                + sum_m ||r_m||^2 + 2 <c_m, r_m>                (term 2)
                - 2 sum_m <x_m, r_m>                            (term 3)

where r_m = e_m(code_m). Term 1 comes free from the coarse search that chose
the probed cells (its exact distances). Term 2 depends on the cell and the
codes, not on the query: a table of nlist x M x ksub floats computed at fit.
Term 3 depends on the query and the codes, not on the cell: one table of
M x ksub per query (``annlearn_pq_tables`` in _utils/_simd.h, from the
codebooks stored transposed so that its inner loop is a vectorised axpy over
the codewords; no BLAS inside the parallel region). So a
probed cell costs one vector addition (term 2 + term 3 into the lookup table)
and then M lookups and adds per stored code. This is FAISS's "precomputed
table" decomposition (``IndexIVFPQ``), derived here in the form we use.

Without residuals, c = 0: term 1 is ||x||^2 and term 2 is the cell-independent
table of codeword norms, folded into term 3 once per query.

For the inner product, -<x, y> = -<x, c> - sum_m <x_m, r_m>: term 1 is the
coarse search's -<x, c> and there is no term 2.

A radius search (``ivfpq_radius``) scans the same lists and keeps every code
whose ADC distance is within the limit, or, when the vectors are stored, every
vector of the probed cells whose exact distance is, in per-thread growable
lists (``_utils/_hits.pxd``).

Re-ranking (``refine``) reads each candidate's stored row in place: float32,
or the compact float16 / uint8 rows of ``annlearn/_quantizers/_scalar.py``,
widened in registers by the kernels of ``_utils/_compact.h``; nothing is
decoded into a buffer. The rows of the next few candidates are prefetched
while one is scored: rows at random addresses otherwise each wait for their
first cache lines, whatever their size, and with the fetches overlapped the
cost of a row follows its bytes (3,136 in float32, 784 in uint8 for 784
features).

Threads split the queries (FAISS's search mode 0): each owns its term-3
table, one lookup table and the heaps, which are rows of the output. Nothing is shared, so concurrent calls from several
Python threads, each with its own nprobe, cannot disturb each other.
"""

import numpy as np

cimport cython
from cython.parallel cimport parallel, prange, threadid
from libc.math cimport INFINITY, rintf
from libc.stdint cimport INT64_MAX, uint8_t, uint16_t, uint64_t
from libc.stdlib cimport calloc, free, malloc

cdef extern from "_simd.h" nogil:
    float annlearn_l2sqr(const float* x, const float* y, Py_ssize_t d)
    float annlearn_inner_product(const float* x, const float* y, Py_ssize_t d)
    void annlearn_pq_tables(const float* x, const float* codebooks_t,
                            Py_ssize_t M, Py_ssize_t dsub, Py_ssize_t ksub,
                            float alpha, float* table)
    void annlearn_add(const float* x, const float* y, Py_ssize_t n, float* out)
cdef extern from "_compact.h" nogil:
    float annlearn_l2sqr_f16(const float* x, const uint16_t* y, Py_ssize_t d)
    float annlearn_inner_product_f16(const float* x, const uint16_t* y,
                                     Py_ssize_t d)
    float annlearn_l2sqr_sq8(const float* x, const uint8_t* y,
                             const float* offset, const float* scale,
                             Py_ssize_t d)
    float annlearn_inner_product_sq8(const float* x, const uint8_t* y,
                                     const float* offset, const float* scale,
                                     Py_ssize_t d)
    void annlearn_prefetch(const void* p, Py_ssize_t n_bytes)
from annlearn._utils._checks cimport ids_within
from annlearn._utils._heap cimport heap_init, heap_push, heap_sort
from annlearn._utils._hits cimport Hits, hits_append, hits_collect
from annlearn._utils._openmp_helpers cimport omp_get_thread_num
from annlearn._utils._typedefs cimport code_t, float32_t, float64_t, id_t, intp_t

cdef inline intp_t _imin(intp_t a, intp_t b) noexcept nogil:
    return a if a < b else b


cdef struct Rows:
    # The stored vectors of an index as the re-ranking reads them: exactly
    # one of f32, f16 (half floats as bits) or u8 (codes of offset + scale *
    # code, per feature) is set (annlearn/_quantizers/_scalar.py).
    const float32_t* f32
    const uint16_t* f16
    const uint8_t* u8
    const float32_t* offset
    const float32_t* scale
    intp_t d
    bint inner_product


cdef inline float32_t _row_score(
    const Rows* rows, const float32_t* x, id_t row
) noexcept nogil:
    """||x - y||^2, or -<x, y>, for stored row ``row``, read in place."""
    cdef intp_t d = rows.d
    if rows.f32 != NULL:
        if rows.inner_product:
            return -annlearn_inner_product(x, rows.f32 + row * d, d)
        return annlearn_l2sqr(x, rows.f32 + row * d, d)
    if rows.f16 != NULL:
        if rows.inner_product:
            return -annlearn_inner_product_f16(x, rows.f16 + row * d, d)
        return annlearn_l2sqr_f16(x, rows.f16 + row * d, d)
    if rows.inner_product:
        return -annlearn_inner_product_sq8(x, rows.u8 + row * d, rows.offset,
                                           rows.scale, d)
    return annlearn_l2sqr_sq8(x, rows.u8 + row * d, rows.offset, rows.scale, d)


cdef enum:
    # Candidates whose rows are requested ahead of their distance: enough to
    # keep several row fetches in flight, few enough to stay in L1/L2.
    PREFETCH_ROWS = 4


cdef inline void _prefetch_row(const Rows* rows, id_t row) noexcept nogil:
    if row < 0:
        return
    if rows.f32 != NULL:
        annlearn_prefetch(rows.f32 + row * rows.d, rows.d * 4)
    elif rows.f16 != NULL:
        annlearn_prefetch(rows.f16 + row * rows.d, rows.d * 2)
    else:
        annlearn_prefetch(rows.u8 + row * rows.d, rows.d)


cdef _fill_rows(Rows* rows, vectors, offset, scale, intp_t d, bint inner_product):
    """Point ``rows`` at ``vectors`` (float32, float16 or uint8 with the
    float32 ``offset`` and ``scale`` of its features), checked. The caller
    keeps the arrays alive while ``rows`` is used."""
    cdef const float32_t[:, ::1] v32
    cdef const uint16_t[:, ::1] v16
    cdef const uint8_t[:, ::1] v8
    cdef const float32_t[::1] off
    cdef const float32_t[::1] sc
    rows.f32 = NULL
    rows.f16 = NULL
    rows.u8 = NULL
    rows.offset = NULL
    rows.scale = NULL
    rows.d = d
    rows.inner_product = inner_product
    if vectors.ndim != 2 or vectors.shape[1] != d:
        raise ValueError("vectors and queries differ in n_features.")
    if (vectors.dtype == np.uint8) != (offset is not None and scale is not None):
        raise ValueError("offset and scale are given if and only if vectors are uint8.")
    if vectors.shape[0] == 0:
        return
    if vectors.dtype == np.float32:
        v32 = vectors
        rows.f32 = &v32[0, 0]
    elif vectors.dtype == np.float16:
        v16 = vectors.view(np.uint16)
        rows.f16 = &v16[0, 0]
    elif vectors.dtype == np.uint8:
        v8 = vectors
        off = offset
        sc = scale
        if off.shape[0] != d or sc.shape[0] != d:
            raise ValueError("offset and scale must have n_features entries.")
        rows.u8 = &v8[0, 0]
        rows.offset = &off[0]
        rows.scale = &sc[0]
    else:
        raise ValueError(
            f"vectors must be float32, float16 or uint8, got {vectors.dtype}.")


cdef inline void _offer(
    float32_t dist, intp_t position, float32_t* threshold,
    intp_t k, float32_t* values, id_t* positions,
) noexcept nogil:
    if dist <= threshold[0]:
        heap_push(values, positions, k, dist, <id_t>position)
        threshold[0] = values[0]


cdef void _scan_list(
    const code_t* codes, intp_t start, intp_t end, intp_t M, intp_t ksub,
    const float32_t* table, float32_t base,
    intp_t k, float32_t* values, id_t* positions,
) noexcept nogil:
    """Offer the ADC distance of every code of one list to a heap.

    Four codes at a time: the M lookups of one code form a chain of dependent
    additions (latency-bound), so four interleaved chains keep the adder and
    the load ports busy. Each code's sum keeps the order m = 0..M-1.
    """
    cdef intp_t j = start, m
    cdef const code_t* c0
    cdef const code_t* c1
    cdef const code_t* c2
    cdef const code_t* c3
    cdef const float32_t* t
    cdef float32_t d0, d1, d2, d3
    cdef float32_t threshold = values[0]
    while j + 4 <= end:
        c0 = codes + j * M
        c1 = c0 + M
        c2 = c1 + M
        c3 = c2 + M
        d0 = base
        d1 = base
        d2 = base
        d3 = base
        t = table
        for m in range(M):
            d0 = d0 + t[c0[m]]
            d1 = d1 + t[c1[m]]
            d2 = d2 + t[c2[m]]
            d3 = d3 + t[c3[m]]
            t = t + ksub
        _offer(d0, j, &threshold, k, values, positions)
        _offer(d1, j + 1, &threshold, k, values, positions)
        _offer(d2, j + 2, &threshold, k, values, positions)
        _offer(d3, j + 3, &threshold, k, values, positions)
        j = j + 4
    while j < end:
        c0 = codes + j * M
        d0 = base
        for m in range(M):
            d0 = d0 + table[m * ksub + c0[m]]
        _offer(d0, j, &threshold, k, values, positions)
        j = j + 1


cdef extern from *:
    """
    static inline int annlearn_ctz64(unsigned long long x) {
    #if defined(__GNUC__)
        return __builtin_ctzll(x);
    #else
        int i = 0;
        while (!(x & 1ull)) { x >>= 1; i++; }
        return i;
    #endif
    }
    """
    int annlearn_ctz64(uint64_t x) noexcept nogil


cdef void _scan_list_allowed(
    const code_t* codes, intp_t start, intp_t end, intp_t M, intp_t ksub,
    const float32_t* table, float32_t base,
    intp_t k, float32_t* values, id_t* positions, const uint64_t* allowed,
) noexcept nogil:
    """``_scan_list`` over the codes whose bit is set in ``allowed`` (a
    bitmap over code positions): the set bits of each 64-bit word are
    visited directly, so an excluded code is never read nor scored, and a
    word of 64 excluded codes costs one load."""
    cdef intp_t w, w_end = (end + 63) >> 6, j, m
    cdef uint64_t bits
    cdef const code_t* c
    cdef float32_t d
    cdef float32_t threshold = values[0]
    w = start >> 6
    while w < w_end:
        bits = allowed[w]
        # Clear the bits of the words' rows outside [start, end).
        if w == start >> 6:
            bits = bits & (~(<uint64_t>0) << (start & 63))
        if w == w_end - 1 and (end & 63):
            bits = bits & ((<uint64_t>1 << (end & 63)) - 1)
        while bits:
            j = (w << 6) + annlearn_ctz64(bits)
            bits = bits & (bits - 1)
            c = codes + j * M
            d = base
            for m in range(M):
                d = d + table[m * ksub + c[m]]
            _offer(d, j, &threshold, k, values, positions)
        w = w + 1


def pq_encode(
    const float32_t[:, ::1] X,
    const float32_t[:, :, ::1] codebooks_t,
    const float32_t[:, ::1] sqnorms,
    centers=None,
    cells=None,
    int n_threads=1,
):
    """PQ codes of the rows of X, or of their residuals to their cells.

    Each row (less its cell's centre with ``centers``) is coded sub-vector
    by sub-vector by the nearest centre: the argmin over j of
    ``||b_mj||^2 - 2 <r_m, b_mj>`` (ties to the smaller j), from one
    lookup-table pass per row (the kernel of term 3, ``annlearn_pq_tables``)
    in a thread-local buffer, without a residual or sub-vector copy of X.

    Parameters
    ----------
    X : ndarray of shape (n, M * dsub), float32
    codebooks_t : ndarray of shape (M, dsub, ksub), float32
        The codebooks transposed (``ProductQuantizer.codebooks_t``).
    sqnorms : ndarray of shape (M, ksub), float32
        Squared norms of the centres.
    centers : ndarray of shape (nlist, M * dsub), float32, default=None
        Cell centres: code ``X[i] - centers[cells[i]]``.
    cells : ndarray of shape (n,), int64, default=None
        The cell of every row (with ``centers``).
    n_threads : int, default=1
        OpenMP threads (over rows).

    Returns
    -------
    codes : ndarray of shape (n, M), uint8
    """
    cdef intp_t n = X.shape[0], d = X.shape[1]
    cdef intp_t M = codebooks_t.shape[0], dsub = codebooks_t.shape[1]
    cdef intp_t ksub = codebooks_t.shape[2]
    if M * dsub != d or sqnorms.shape[0] != M or sqnorms.shape[1] != ksub:
        raise ValueError(
            f"Expected codebooks_t of shape (M, {d} / M, ksub) and sqnorms "
            "of shape (M, ksub)."
        )
    if not 1 <= ksub <= 256:
        raise ValueError(f"Expected 1 <= ksub <= 256, got {ksub}.")
    if (centers is None) != (cells is None):
        raise ValueError("centers and cells are given together.")
    cdef const float32_t[:, ::1] C
    cdef const id_t[::1] cell_of
    cdef bint residual = centers is not None
    if residual:
        C = centers
        cell_of = cells
        if C.shape[1] != d or cell_of.shape[0] != n:
            raise ValueError("Expected centers with n_features columns, a cell per row.")
        if not ids_within(np.asarray(cells).reshape(1, -1), 0, C.shape[0]):
            raise ValueError(f"Expected cells in [0, {C.shape[0]}).")
    codes_arr = np.empty((n, M), dtype=np.uint8)
    if n == 0:
        return codes_arr
    cdef uint8_t[:, ::1] codes = codes_arr
    cdef intp_t i, m, j, best
    cdef float32_t* table = NULL
    cdef float32_t* r = NULL
    cdef float32_t score, low
    cdef int failed = 0
    cdef int* failed_ptr = &failed
    with nogil, parallel(num_threads=<int>max(1, min(n_threads, n // 64))):
        table = <float32_t*>malloc(M * ksub * sizeof(float32_t))
        r = <float32_t*>malloc(d * sizeof(float32_t))
        for i in prange(n, schedule="static"):
            if table == NULL or r == NULL:
                failed_ptr[0] = 1
                continue
            if residual:
                for j in range(d):
                    r[j] = X[i, j] - C[cell_of[i], j]
            annlearn_pq_tables(r if residual else &X[i, 0], &codebooks_t[0, 0, 0],
                               M, dsub, ksub, -2.0, table)
            for m in range(M):
                best = 0
                low = table[m * ksub] + sqnorms[m, 0]
                for j in range(1, ksub):
                    score = table[m * ksub + j] + sqnorms[m, j]
                    if score < low:
                        low = score
                        best = j
                codes[i, m] = <uint8_t>best
        free(table)
        free(r)
    if failed:
        raise MemoryError("annlearn: could not allocate the encoding buffers.")
    return codes_arr


def sq8_encode(
    const float32_t[:, ::1] X,
    const float32_t[::1] offset,
    const float32_t[::1] scale,
    int n_threads=1,
):
    """uint8 codes ``rint((x - offset) / scale)`` of the rows of X, clipped
    to [0, 255], and the number of rows with a clipped value.

    float32 subtraction then division, rounded half to even (``rintf``): the
    numpy expression ``np.rint((X - offset) / scale)``, in one pass.

    Parameters
    ----------
    X : ndarray of shape (n, d), float32
    offset, scale : ndarray of shape (d,), float32
        The scalar quantizer (``scale > 0``).
    n_threads : int, default=1
        OpenMP threads (over rows).

    Returns
    -------
    codes : ndarray of shape (n, d), uint8
    clipped : int
    """
    cdef intp_t n = X.shape[0], d = X.shape[1], i, f
    if offset.shape[0] != d or scale.shape[0] != d:
        raise ValueError(f"Expected offset and scale of shape ({d},).")
    codes_arr = np.empty((n, d), dtype=np.uint8)
    if n == 0 or d == 0:
        return codes_arr, 0
    cdef uint8_t[:, ::1] codes = codes_arr
    cdef float32_t v
    cdef intp_t clipped = 0
    cdef int outside
    with nogil:
        for i in prange(n, num_threads=<int>max(1, min(n_threads, n * d // (1 << 18))),
                        schedule="static"):
            outside = 0
            for f in range(d):
                v = rintf((X[i, f] - offset[f]) / scale[f])
                if v < 0:
                    v = 0
                    outside = 1
                elif v > 255:
                    v = 255
                    outside = 1
                codes[i, f] = <uint8_t>v
            clipped += outside
    return codes_arr, clipped


def sq8_range(const float32_t[:, ::1] X, int n_threads=1):
    """Per feature of X: the smallest and largest value, and whether every
    value is an integer, in one pass over the rows.

    Parameters
    ----------
    X : ndarray of shape (n, d), float32
    n_threads : int, default=1
        OpenMP threads (over blocks of rows; each keeps its own three
        arrays, combined at the end).

    Returns
    -------
    low, high : ndarray of shape (d,), float32
        +inf and -inf where X has no rows.
    integral : ndarray of shape (d,), bool
    """
    cdef intp_t n = X.shape[0], d = X.shape[1], i, f, b
    cdef intp_t block = 256, n_blocks = (n + block - 1) // block
    cdef int threads = <int>max(1, min(n_threads, n * d // (1 << 18)))
    low_arr = np.full((threads, d), np.inf, dtype=np.float32)
    high_arr = np.full((threads, d), -np.inf, dtype=np.float32)
    frac_arr = np.zeros((threads, d), dtype=np.uint8)
    cdef float32_t[:, ::1] low = low_arr, high = high_arr
    cdef uint8_t[:, ::1] fractional = frac_arr
    cdef float32_t v
    cdef int t
    with nogil, parallel(num_threads=threads):
        t = threadid()
        for b in prange(n_blocks, schedule="static"):
            for i in range(b * block, min(n, (b + 1) * block)):
                for f in range(d):
                    v = X[i, f]
                    if v < low[t, f]:
                        low[t, f] = v
                    if v > high[t, f]:
                        high[t, f] = v
                    fractional[t, f] |= rintf(v) != v
    return low_arr.min(axis=0), high_arr.max(axis=0), ~frac_arr.any(axis=0)


def exact_uint8(const float32_t[:, ::1] X, int n_threads=1):
    """X as uint8 if every value is an integer in [0, 255] (pixels), else
    None; one pass, which stops at the first other value (a block of text
    embeddings costs its first row).

    Parameters
    ----------
    X : ndarray of shape (n, d), float32
    n_threads : int, default=1
        OpenMP threads (over blocks of rows).

    Returns
    -------
    X_uint8 : ndarray of shape (n, d), uint8, or None
    """
    cdef intp_t n = X.shape[0], d = X.shape[1], i, f, b
    cdef intp_t block = 256, n_blocks = (n + block - 1) // block
    cdef int threads = <int>max(1, min(n_threads, n * d // (1 << 18)))
    out_arr = np.empty((n, d), dtype=np.uint8)
    cdef uint8_t[:, ::1] out = out_arr
    # Shared by the threads through a pointer (a variable assigned in a
    # prange would be private).
    cdef int inexact = 0
    cdef int* stop = &inexact
    cdef int inexact_row
    cdef float32_t v, w
    cdef uint8_t u
    cdef const float32_t* row
    cdef uint8_t* row_out
    with nogil:
        for b in prange(n_blocks, schedule="static", num_threads=threads):
            if stop[0]:
                continue
            for i in range(b * block, min(n, (b + 1) * block)):
                # Branch-free over a row (it vectorises); the clamp keeps
                # every conversion defined, the row's check decides.
                inexact_row = 0
                row = &X[i, 0]
                row_out = &out[i, 0]
                for f in range(d):
                    v = row[f]
                    w = v if v > 0 else 0  # NaN -> 0
                    w = w if w < 255 else 255
                    u = <uint8_t><int>w
                    # Equal to its uint8 only for an integer in [0, 255].
                    inexact_row = inexact_row | (<float32_t>u != v)
                    row_out[f] = u
                if inexact_row:
                    stop[0] = 1
                    break
    return None if inexact else out_arr


def _check_allowed(allowed, intp_t n_queries, intp_t n_bits):
    """(bitmap, row stride) of a filter over ``n_bits`` positions: one row
    of uint64 words for every query (stride 0) or one per query."""
    cdef intp_t n_words = (n_bits + 63) >> 6
    shape = np.shape(allowed)
    if (np.asarray(allowed).dtype != np.uint64 or len(shape) != 2
            or shape[0] not in (1, n_queries) or shape[1] != n_words):
        raise ValueError(
            f"Expected allowed of dtype uint64 and shape (1 or {n_queries}, "
            f"{n_words}), got {np.asarray(allowed).dtype} {shape}."
        )
    return allowed, (n_words if shape[0] > 1 else 0)


def _check_scan_inputs(Q, probe_cells, probe_base, codebooks_t, term2,
                       list_offsets, codes):
    """Raise ValueError unless the arrays of a scan fit together."""
    n_queries, d = Q.shape[0], Q.shape[1]
    M, dsub, ksub = codebooks_t.shape[:3]
    nlist, n_tables = list_offsets.shape[0] - 1, term2.shape[0]
    if M * dsub != d:
        raise ValueError(f"codebooks cover {M * dsub} features, queries have {d}.")
    if probe_base.shape[:2] != probe_cells.shape[:2] or probe_cells.shape[0] != n_queries:
        raise ValueError("probe_cells and probe_base must be (n_queries, nprobe).")
    if n_tables not in (0, 1, nlist) or (n_tables and (
            term2.shape[1] != M or term2.shape[2] != ksub)):
        raise ValueError("term2 must be (nlist or 1 or 0, M, ksub).")
    if codes.shape[1] != M and codes.shape[0] > 0:
        raise ValueError("codes must have M columns.")
    if not ids_within(probe_cells, -1, nlist):
        raise ValueError(f"probe_cells must lie in [-1, {nlist}).")


def ivfpq_scan(
    const float32_t[:, ::1] Q,
    const id_t[:, ::1] probe_cells,
    const float32_t[:, ::1] probe_base,
    const float32_t[:, :, ::1] codebooks_t,
    const float32_t[:, :, ::1] term2,
    const id_t[::1] list_offsets,
    const code_t[:, ::1] codes,
    intp_t k,
    bint inner_product,
    int n_threads,
    allowed=None,
):
    """k best stored codes for every query, by ADC over the probed lists.

    Parameters
    ----------
    Q : ndarray of shape (n_queries, n_features), float32
        Prepared queries.
    probe_cells : ndarray of shape (n_queries, nprobe), int64
        Cells to scan per query (-1: skip).
    probe_base : ndarray of shape (n_queries, nprobe), float32
        Term 1 for each probed cell.
    codebooks_t : ndarray of shape (M, dsub, ksub), float32
        PQ codebooks, transposed (``codebooks.transpose(0, 2, 1)``),
        ``M * dsub == n_features``.
    term2 : ndarray of shape (n_tables, M, ksub), float32
        Term 2 per cell (``n_tables == nlist``), or one table for every cell
        (``n_tables == 1``, folded into term 3), or ``n_tables == 0``: none.
    list_offsets : ndarray of shape (nlist + 1,), int64
        List ``c`` holds codes ``list_offsets[c]:list_offsets[c + 1]``.
    codes : ndarray of shape (n_codes, M), uint8
        Stored codes, list after list.
    k : int
        Candidates to keep per query.
    inner_product : bool
        Rank by -<x, y> instead of ||x - y||^2.
    n_threads : int
        OpenMP threads.
    allowed : ndarray of shape (1 or n_queries, ceil(n_codes / 64)), uint64
        A filter: bit ``j % 64`` of word ``j // 64`` allows code j (one row for
        every query, or one per query); excluded codes are never scored.
        None: every code.

    Returns
    -------
    distances : ndarray of shape (n_queries, k), float32
        ADC distances, ascending; +inf where fewer than k codes were scanned.
    positions : ndarray of shape (n_queries, k), int64
        Positions of the codes in ``codes``; -1 where none.
    """
    cdef intp_t n_queries = Q.shape[0], d = Q.shape[1]
    cdef intp_t M = codebooks_t.shape[0], dsub = codebooks_t.shape[1]
    cdef intp_t ksub = codebooks_t.shape[2], nprobe = probe_cells.shape[1]
    cdef intp_t nlist = list_offsets.shape[0] - 1
    cdef intp_t n_tables = term2.shape[0]
    _check_scan_inputs(Q, probe_cells, probe_base, codebooks_t, term2,
                       list_offsets, codes)
    if k < 1:
        raise ValueError("k must be >= 1.")
    cdef const uint64_t[:, ::1] allow
    cdef intp_t allow_stride = 0
    cdef const uint64_t* allow_q = NULL
    cdef bint filtered = allowed is not None
    if filtered:
        allowed, allow_stride = _check_allowed(allowed, n_queries, codes.shape[0])
        allow = allowed

    distances_arr = np.empty((n_queries, k), dtype=np.float32)
    positions_arr = np.empty((n_queries, k), dtype=np.int64)
    if n_queries == 0:
        return distances_arr, positions_arr
    cdef float32_t[:, ::1] distances = distances_arr
    cdef id_t[:, ::1] positions = positions_arr
    cdef intp_t table_size = M * ksub
    cdef float32_t alpha = -1.0 if inner_product else -2.0
    # One term-2 table for every cell is folded into term 3 once per query;
    # per-cell tables are added for each probed cell.
    cdef bint shared_term2 = n_tables == 1
    cdef bint per_cell_term2 = n_tables > 1
    cdef int n_threads_used = <int>_imin(n_threads, n_queries)
    cdef intp_t q, p, r
    cdef id_t cell
    cdef float32_t* term3 = NULL
    cdef float32_t* lut = NULL
    cdef int failed = 0
    cdef int* failed_ptr = &failed

    with nogil, parallel(num_threads=n_threads_used):
        term3 = <float32_t*> malloc(table_size * sizeof(float32_t))
        lut = <float32_t*> malloc(table_size * sizeof(float32_t))
        for q in prange(n_queries, schedule="dynamic", chunksize=16):
            if term3 == NULL or lut == NULL:
                failed_ptr[0] = 1
                continue
            annlearn_pq_tables(&Q[q, 0], &codebooks_t[0, 0, 0], M, dsub, ksub,
                               alpha, term3)
            if shared_term2:
                annlearn_add(term3, &term2[0, 0, 0], table_size, term3)
            heap_init(&distances[q, 0], &positions[q, 0], k)
            if filtered:
                allow_q = &allow[0, 0] + q * allow_stride
            for p in range(nprobe):
                cell = probe_cells[q, p]
                if cell < 0 or list_offsets[cell] == list_offsets[cell + 1]:
                    continue
                if filtered:
                    if per_cell_term2:
                        annlearn_add(term3, &term2[cell, 0, 0], table_size, lut)
                    _scan_list_allowed(&codes[0, 0], list_offsets[cell],
                                       list_offsets[cell + 1], M, ksub,
                                       lut if per_cell_term2 else term3,
                                       probe_base[q, p], k, &distances[q, 0],
                                       &positions[q, 0], allow_q)
                elif per_cell_term2:
                    annlearn_add(term3, &term2[cell, 0, 0], table_size, lut)
                    _scan_list(&codes[0, 0], list_offsets[cell],
                               list_offsets[cell + 1], M, ksub, lut,
                               probe_base[q, p], k, &distances[q, 0],
                               &positions[q, 0])
                else:
                    _scan_list(&codes[0, 0], list_offsets[cell],
                               list_offsets[cell + 1], M, ksub, term3,
                               probe_base[q, p], k, &distances[q, 0],
                               &positions[q, 0])
            heap_sort(&distances[q, 0], &positions[q, 0], k)
            for r in range(k):
                if positions[q, r] == INT64_MAX:
                    positions[q, r] = -1
        free(term3)
        free(lut)
    if failed:
        raise MemoryError("annlearn: could not allocate the IVF-PQ scan buffers.")
    return distances_arr, positions_arr


cdef inline void _score_candidates(
    const Rows* rows, const float32_t* x, const id_t* candidates, intp_t n,
    float32_t* out
) noexcept nogil:
    """``out[c]``: the exact score of candidate row ``candidates[c]`` for
    query ``x`` (+inf for -1), the next rows prefetched while one is
    scored."""
    cdef intp_t c
    cdef id_t row
    for c in range(_imin(PREFETCH_ROWS, n)):
        _prefetch_row(rows, candidates[c])
    for c in range(n):
        if c + PREFETCH_ROWS < n:
            _prefetch_row(rows, candidates[c + PREFETCH_ROWS])
        row = candidates[c]
        out[c] = INFINITY if row < 0 else _row_score(rows, x, row)


cdef _check_candidates(const float32_t[:, ::1] Q, vectors,
                       const id_t[:, ::1] candidates, Rows* rows, offset, scale,
                       bint inner_product):
    """Point ``rows`` at ``vectors``; raise ValueError unless ``candidates``
    has one row per query, of rows of ``vectors`` or -1."""
    _fill_rows(rows, vectors, offset, scale, Q.shape[1], inner_product)
    if candidates.shape[0] != Q.shape[0]:
        raise ValueError("candidates must have one row per query.")
    if not ids_within(candidates, -1, vectors.shape[0]):
        raise ValueError(f"candidates must lie in [-1, {vectors.shape[0]}).")


cdef inline int _rerank_threads(int n_threads, intp_t work) noexcept nogil:
    # One thread per 2**18 multiply-adds at most: the candidates of a single
    # query never wait for a second thread to be scheduled.
    return <int>max(1, min(n_threads, work // (1 << 18)))


def refine(
    const float32_t[:, ::1] Q,
    vectors,
    const id_t[:, ::1] candidates,
    intp_t k,
    bint inner_product,
    int n_threads,
    offset=None,
    scale=None,
):
    """Re-rank candidates by their exact distance; keep the k best.

    Parameters
    ----------
    Q : ndarray of shape (n_queries, n_features), float32
        Prepared queries.
    vectors : ndarray of shape (n_vectors, n_features)
        Stored vectors, C-contiguous: float32, float16, or uint8 codes of
        ``offset + scale * code``. Read in place, a candidate row at a time.
    candidates : ndarray of shape (n_queries, n_candidates), int64
        Rows of ``vectors`` to re-rank; -1 entries are ignored.
    k : int
        Number kept, ``k <= n_candidates``.
    inner_product : bool
        Exact -<x, y> instead of ||x - y||^2.
    n_threads : int
        OpenMP threads.
    offset, scale : ndarray of shape (n_features,), float32, default=None
        The scalar quantizer of uint8 ``vectors`` (None otherwise).

    Returns
    -------
    distances : ndarray of shape (n_queries, k), float32
        Exact squared distances (or -<x, y>) to the stored vectors,
        ascending.
    positions : ndarray of shape (n_queries, k), int64
        Rows of ``vectors``; -1 where fewer than k candidates.
    """
    cdef intp_t n_queries = Q.shape[0], d = Q.shape[1]
    cdef intp_t n_candidates = candidates.shape[1]
    cdef Rows rows
    _check_candidates(Q, vectors, candidates, &rows, offset, scale, inner_product)
    if not 1 <= k <= n_candidates:
        raise ValueError(f"Expected 1 <= k <= {n_candidates}, got k={k}.")
    distances_arr = np.empty((n_queries, k), dtype=np.float32)
    positions_arr = np.empty((n_queries, k), dtype=np.int64)
    cdef float32_t[:, ::1] distances = distances_arr
    cdef id_t[:, ::1] positions = positions_arr
    cdef intp_t q, c, r
    cdef float32_t* scores = NULL
    cdef int failed = 0
    cdef int* failed_ptr = &failed
    with nogil, parallel(num_threads=_rerank_threads(
            n_threads, n_queries * n_candidates * d)):
        scores = <float32_t*>malloc(n_candidates * sizeof(float32_t))
        for q in prange(n_queries, schedule="static"):
            if scores == NULL:
                failed_ptr[0] = 1
                continue
            _score_candidates(&rows, &Q[q, 0], &candidates[q, 0], n_candidates,
                              scores)
            heap_init(&distances[q, 0], &positions[q, 0], k)
            for c in range(n_candidates):
                if candidates[q, c] >= 0:
                    heap_push(&distances[q, 0], &positions[q, 0], k, scores[c],
                              candidates[q, c])
            heap_sort(&distances[q, 0], &positions[q, 0], k)
            for r in range(k):
                if positions[q, r] == INT64_MAX:
                    positions[q, r] = -1
        free(scores)
    if failed:
        raise MemoryError("annlearn: could not allocate the re-ranking buffers.")
    return distances_arr, positions_arr


def exact_scores(
    const float32_t[:, ::1] Q,
    vectors,
    const id_t[:, ::1] candidates,
    bint inner_product,
    int n_threads,
    offset=None,
    scale=None,
):
    """The exact distance of every candidate, in place (``refine`` without
    the selection; a sharded index merges them with other shards').

    Parameters
    ----------
    Q, vectors, candidates, inner_product, n_threads, offset, scale
        As :func:`refine`'s.

    Returns
    -------
    distances : ndarray of shape (n_queries, n_candidates), float32
        Exact squared distance (or -<x, y>) of ``candidates[q, c]``; +inf
        where it is -1.
    """
    cdef intp_t n_queries = Q.shape[0], d = Q.shape[1]
    cdef intp_t n_candidates = candidates.shape[1]
    cdef Rows rows
    _check_candidates(Q, vectors, candidates, &rows, offset, scale, inner_product)
    distances_arr = np.empty((n_queries, n_candidates), dtype=np.float32)
    if n_candidates == 0:
        return distances_arr
    cdef float32_t[:, ::1] distances = distances_arr
    cdef intp_t q
    with nogil:
        for q in prange(
            n_queries,
            num_threads=_rerank_threads(n_threads, n_queries * n_candidates * d),
            schedule="static",
        ):
            _score_candidates(&rows, &Q[q, 0], &candidates[q, 0], n_candidates,
                              &distances[q, 0])
    return distances_arr


cdef void _radius_list(
    const code_t* codes, intp_t start, intp_t end, intp_t M, intp_t ksub,
    const float32_t* table, float32_t base, float32_t limit, intp_t query,
    Hits* hits,
) noexcept nogil:
    """Append every code of one list whose ADC distance is <= limit."""
    cdef intp_t j, m
    cdef const code_t* c
    cdef float32_t dist
    for j in range(start, end):
        c = codes + j * M
        dist = base
        for m in range(M):
            dist = dist + table[m * ksub + c[m]]
        if dist <= limit:
            hits_append(hits, query, j, dist)


def ivfpq_radius(
    const float32_t[:, ::1] Q,
    const id_t[:, ::1] probe_cells,
    const float32_t[:, ::1] probe_base,
    const float32_t[:, :, ::1] codebooks_t,
    const float32_t[:, :, ::1] term2,
    const id_t[::1] list_offsets,
    const code_t[:, ::1] codes,
    vectors,
    float32_t limit,
    bint inner_product,
    int n_threads,
    offset=None,
    scale=None,
):
    """Every stored row within ``limit`` of each query, in the probed lists.

    Parameters
    ----------
    Q, probe_cells, probe_base, codebooks_t, term2, list_offsets, codes, \
inner_product, n_threads
        As for :func:`ivfpq_scan`.
    vectors : ndarray of shape (n_codes, n_features), or None
        The stored vectors (float32, float16 or uint8, as for
        :func:`refine`): when given, rows are kept by their exact distance
        to them (the codes are not read); otherwise by their ADC distance.
    limit : float
        The largest distance kept, in scan units (``||x - y||^2`` or
        ``-<x, y>``).
    offset, scale : ndarray of shape (n_features,), float32, default=None
        The scalar quantizer of uint8 ``vectors``.

    Returns
    -------
    indptr : ndarray of shape (n_queries + 1,), int64
    positions : ndarray of shape (n_hits,), int64
        Rows of ``codes``, increasing within each query.
    distances : ndarray of shape (n_hits,), float32
        In scan units.
    """
    cdef intp_t n_queries = Q.shape[0], d = Q.shape[1]
    cdef intp_t M = codebooks_t.shape[0], dsub = codebooks_t.shape[1]
    cdef intp_t ksub = codebooks_t.shape[2], nprobe = probe_cells.shape[1]
    cdef intp_t nlist = list_offsets.shape[0] - 1
    cdef intp_t n_tables = term2.shape[0]
    _check_scan_inputs(Q, probe_cells, probe_base, codebooks_t, term2,
                       list_offsets, codes)
    cdef Rows rows
    cdef bint exact = vectors is not None
    if exact:
        _fill_rows(&rows, vectors, offset, scale, d, inner_product)
        if vectors.shape[0] != codes.shape[0]:
            raise ValueError("vectors must be (n_codes, n_features).")
    cdef intp_t table_size = M * ksub
    cdef float32_t alpha = -1.0 if inner_product else -2.0
    cdef bint shared_term2 = n_tables == 1
    cdef bint per_cell_term2 = n_tables > 1
    cdef int n_threads_used = <int>max(1, _imin(n_threads, n_queries))
    cdef Hits* hits = <Hits*> calloc(n_threads_used, sizeof(Hits))
    if hits == NULL:
        raise MemoryError("annlearn: could not allocate the radius search lists.")
    cdef intp_t q, p, j
    cdef id_t cell
    cdef int t
    cdef float32_t dist
    cdef float32_t* term3 = NULL
    cdef float32_t* lut = NULL
    with nogil, parallel(num_threads=n_threads_used):
        t = omp_get_thread_num()
        term3 = <float32_t*> malloc(table_size * sizeof(float32_t))
        lut = <float32_t*> malloc(table_size * sizeof(float32_t))
        for q in prange(n_queries, schedule="dynamic", chunksize=16):
            if term3 == NULL or lut == NULL:
                hits[t].failed = 1
                continue
            if not exact:
                annlearn_pq_tables(&Q[q, 0], &codebooks_t[0, 0, 0], M, dsub, ksub,
                                   alpha, term3)
                if shared_term2:
                    annlearn_add(term3, &term2[0, 0, 0], table_size, term3)
            for p in range(nprobe):
                cell = probe_cells[q, p]
                if cell < 0:
                    continue
                if exact:
                    for j in range(list_offsets[cell], list_offsets[cell + 1]):
                        dist = _row_score(&rows, &Q[q, 0], j)
                        if dist <= limit:
                            hits_append(&hits[t], q, j, dist)
                elif per_cell_term2:
                    annlearn_add(term3, &term2[cell, 0, 0], table_size, lut)
                    _radius_list(&codes[0, 0], list_offsets[cell],
                                 list_offsets[cell + 1], M, ksub, lut,
                                 probe_base[q, p], limit, q, &hits[t])
                else:
                    _radius_list(&codes[0, 0], list_offsets[cell],
                                 list_offsets[cell + 1], M, ksub, term3,
                                 probe_base[q, p], limit, q, &hits[t])
        free(term3)
        free(lut)
    try:
        return hits_collect(hits, n_threads_used, n_queries)
    finally:
        free(hits)
