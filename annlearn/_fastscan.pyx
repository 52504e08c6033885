"""4-bit fast-scan PQ: packed codes, quantized lookup tables, the IVF scan.

With 16 centroids per sub-quantizer (4-bit codes), a lookup table quantized
to uint8 is 16 bytes, which one SIMD byte shuffle indexes from a register:
the scan sums M table entries for 32 vectors at a time in uint16 lanes
(_fastscan.h explains the code layout and the kernels). The pieces:

``pack_codes`` / ``unpack_codes`` / ``pack_lists``
    uint8 codes (n, M), values 0..15 <-> blocks of 32 vectors, two codes per
    byte; an inverted file packs each list on its own, so every list starts
    on a block boundary.
``quantize_tables``
    float32 tables (n_queries, nprobe, M, 16) -> uint8 tables, one scale and
    one float bias per (query, probed cell): a cell's tables depend on that
    cell alone.
``ivf_tables``
    The same quantized tables computed from the queries, the codebooks and
    term 2 of _ivf.pyx's decomposition, without the float array.
``ivf_fastscan``
    The k best rows per query over the probed lists: per block of 32 the
    uint16 sums, one SIMD comparison with the current k-th best (in this
    probe's quantized units) and candidate work only for the vectors that
    pass: a heap (_utils/_heap.pxd) for small k, a buffer compacted by radix
    select for large k (HEAP_MAX_K).

The approximate distance of row i of probed cell p is
``bias[q, p] + sum_m qtables[q, p, m, code_m(i)] / scale[q, p]``, in float32;
the scan turns the heap's worst distance into each probe's units.
Threads split the queries (prange); each owns its heap (a row of the output)
or buffer, a table image and a sums buffer, so results do not depend on the
thread count; ties rank by the smaller position either way.

``ivf_fastscan_queries``
    Both in one pass per query: each thread builds a query's tables into its
    own buffer and scans them at once (what IVFPQNeighbors runs).
"""

import numpy as np

from cython.parallel cimport parallel, prange
from libc.math cimport INFINITY, fabs
from libc.stdint cimport INT64_MAX, uint8_t, uint16_t, uint32_t
from libc.stdlib cimport free, malloc

from annlearn._utils._checks cimport all_finite, ids_within, positive_finite
from annlearn._utils._heap cimport heap_init, heap_push, heap_sort
from annlearn._utils._typedefs cimport float32_t, float64_t, id_t, intp_t

cdef extern from "_fastscan.h" nogil:
    intp_t annlearn_fs_n_pairs(intp_t M)
    intp_t annlearn_fs_block_bytes(intp_t M)
    int annlearn_fs_ctz(uint32_t mask)
    void annlearn_fs_pack(const uint8_t* codes, intp_t n, intp_t M, uint8_t* out)
    void annlearn_fs_unpack(const uint8_t* packed, intp_t n, intp_t M,
                            uint8_t* out)
    intp_t annlearn_fs_image_bytes(intp_t M)
    int annlearn_fs_image(const uint8_t* tables, intp_t M, uint8_t* image)
    int annlearn_fs_best_isa()
    void annlearn_fs_sort(const float* d, const id_t* ids, intp_t n, float* out_d,
                          id_t* out_ids, void* scratch)
    void annlearn_fs_compact(float* d, id_t* ids, intp_t n, intp_t k, float* tie_d,
                             id_t* tie_ids, float* worst, id_t* worst_id)
    int annlearn_fs_tables_query(int isa, const float** A, const float** B,
                                 intp_t nprobe, intp_t M, const float* base,
                                 float vmax, float* lo_buf, uint8_t* out,
                                 float* scale, float* bias)
    int annlearn_fs_table_probe(int isa, const float* A, const float* B, intp_t M,
                                float vmax, float* lo_buf, uint8_t* out,
                                float* scale, float64_t* lo_sum)
    intp_t annlearn_fs_scan(int isa, const uint8_t* codes, intp_t b, intp_t end,
                            intp_t n_pairs, const uint8_t* image,
                            uint16_t threshold, uint16_t* sums, uint32_t* mask,
                            const uint32_t* allowed)

cdef extern from "_simd.h" nogil:
    void annlearn_pq_tables(const float* x, const float* codebooks_t,
                            intp_t M, intp_t dsub, intp_t ksub,
                            float alpha, float* table)
    void annlearn_add(const float* x, const float* y, intp_t n, float* out)

cdef enum:
    _BLOCK = 32  # vectors per block (the C kernels assume it)

BLOCK = _BLOCK
# ivf_fastscan keeps its candidates in a heap below this k, in a buffer
# compacted by radix select from it on. Measured on one thread (Fashion-MNIST,
# nlist 256, 28x4 codes, nprobe 4 and 16): the heap is 2-4x faster at k <= 10
# (the buffer's compactions have fixed costs), the two are even at k = 40,
# and the buffer is 1.3x faster at k = 80, 1.9x at 160 and 2.8-3.3x at 640.
HEAP_MAX_K = 48
_ISA_NAMES = {"none": 0, "avx2": 1, "avx512": 2}


def fastscan_isa():
    """Name of the widest scan kernel this CPU runs.

    Returns
    -------
    isa : {"avx512", "avx2", "none"}
        ``"avx512"`` needs AVX-512F, BW and VL; ``"none"`` is the portable
        C loop. ``ANNLEARN_ISA=avx2`` or ``=none`` in the environment (read
        once per process) lowers it.
    """
    best = annlearn_fs_best_isa()
    return [name for name, value in _ISA_NAMES.items() if value == best][0]


def _resolve_isa(isa):
    best = annlearn_fs_best_isa()
    if isa is None:
        return best
    if isa not in _ISA_NAMES:
        raise ValueError(f"isa must be one of {sorted(_ISA_NAMES)} or None, got {isa!r}.")
    if _ISA_NAMES[isa] > best:
        raise ValueError(
            f"The {isa} kernel cannot run here: the widest is {fastscan_isa()}."
        )
    return _ISA_NAMES[isa]


def _check_codes(codes):
    codes = np.asarray(codes)
    if codes.dtype != np.uint8 or codes.ndim != 2:
        raise ValueError(
            f"Expected codes of dtype uint8 and 2 dimensions, got {codes.dtype} "
            f"with {codes.ndim}."
        )
    if codes.shape[1] < 1:
        raise ValueError("Expected at least one sub-quantizer (M >= 1), got 0.")
    if codes.size and codes.max() > 15:
        raise ValueError(f"Expected 4-bit codes (<= 15), got {codes.max()}.")
    return np.ascontiguousarray(codes)


def pack_codes(codes):
    """Pack 4-bit PQ codes into blocks of 32 vectors for the fast scan.

    Parameters
    ----------
    codes : ndarray of shape (n, M), uint8
        Codes, values 0..15.

    Returns
    -------
    packed : ndarray of shape (ceil(n / 32), 16 * M2), uint8
        ``M2 = M + M % 2``. Block b holds vectors ``32 b .. 32 b + 31``
        (missing ones padded with code 0; the caller keeps ``n``) as M2 / 2
        runs of 32 bytes: run j holds sub-quantizer 2j in the low nibbles
        and 2j + 1 in the high nibbles (0 when ``2j + 1 == M``), and its byte
        t holds vector ``(t % 2) * 16 + (t // 16) * 8 + (t % 16) // 2`` of
        the block (see ``_fastscan.h``).

    Examples
    --------
    >>> import numpy as np
    >>> from annlearn._fastscan import pack_codes, unpack_codes
    >>> codes = np.arange(15, dtype=np.uint8).reshape(5, 3)
    >>> packed = pack_codes(codes)
    >>> packed.shape
    (1, 64)
    >>> bool((unpack_codes(packed, 5, 3) == codes).all())
    True
    """
    codes = _check_codes(codes)
    cdef intp_t n = codes.shape[0], M = codes.shape[1]
    packed_arr = np.zeros(((n + BLOCK - 1) // BLOCK, annlearn_fs_block_bytes(M)),
                          dtype=np.uint8)
    cdef const uint8_t[:, ::1] src = codes
    cdef uint8_t[:, ::1] dst = packed_arr
    if n:
        with nogil:
            annlearn_fs_pack(&src[0, 0], n, M, &dst[0, 0])
    return packed_arr


def unpack_codes(packed, n, M):
    """Recover the codes of the first ``n`` vectors packed by :func:`pack_codes`.

    Parameters
    ----------
    packed : ndarray of shape (n_blocks, 16 * M2), uint8
        Packed codes, ``n_blocks >= ceil(n / 32)``.
    n : int
        Number of vectors to unpack.
    M : int
        Number of sub-quantizers of the codes.

    Returns
    -------
    codes : ndarray of shape (n, M), uint8
    """
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    if packed.ndim != 2 or packed.shape[1] != annlearn_fs_block_bytes(M):
        raise ValueError(
            f"Expected packed codes of shape (n_blocks, {annlearn_fs_block_bytes(M)})"
            f" for M={M}, got {packed.shape}."
        )
    if not 0 <= n <= BLOCK * packed.shape[0]:
        raise ValueError(f"Expected 0 <= n <= {BLOCK * packed.shape[0]}, got {n}.")
    codes_arr = np.zeros((n, M), dtype=np.uint8)
    cdef const uint8_t[:, ::1] src = packed
    cdef uint8_t[:, ::1] dst = codes_arr
    cdef intp_t n_ = n, M_ = M
    if n_:
        with nogil:
            annlearn_fs_unpack(&src[0, 0], n_, M_, &dst[0, 0])
    return codes_arr


def pack_lists(codes, offsets):
    """Pack the lists of an inverted file, each starting on a block boundary.

    Parameters
    ----------
    codes : ndarray of shape (n, M), uint8
        Codes (values 0..15), sorted by cell: list c is
        ``codes[offsets[c]:offsets[c + 1]]``.
    offsets : ndarray of shape (nlist + 1,), int64
        Row offsets of the lists, non-decreasing, from 0 to n.

    Returns
    -------
    packed : ndarray of shape (block_offsets[-1], 16 * M2), uint8
        List c packed as by :func:`pack_codes` into blocks
        ``block_offsets[c]:block_offsets[c + 1]``.
    block_offsets : ndarray of shape (nlist + 1,), int64
        ``block_offsets[c + 1] - block_offsets[c] == ceil(rows of c / 32)``.

    Examples
    --------
    >>> import numpy as np
    >>> from annlearn._fastscan import pack_lists
    >>> codes = np.zeros((40, 4), dtype=np.uint8)
    >>> packed, blocks = pack_lists(codes, np.array([0, 33, 33, 40]))
    >>> packed.shape, blocks.tolist()
    ((3, 64), [0, 2, 2, 3])
    """
    codes = _check_codes(codes)
    offsets = np.asarray(offsets, dtype=np.int64)
    if (offsets.ndim != 1 or offsets.shape[0] < 2 or offsets[0] != 0
            or offsets[len(offsets) - 1] != codes.shape[0] or np.any(np.diff(offsets) < 0)):
        raise ValueError(
            f"Expected non-decreasing offsets from 0 to {codes.shape[0]}."
        )
    sizes = np.diff(offsets)
    block_offsets = np.zeros_like(offsets)
    np.cumsum((sizes + BLOCK - 1) // BLOCK, out=block_offsets[1:])
    cdef intp_t M = codes.shape[1], nlist = sizes.shape[0], c
    packed_arr = np.zeros((block_offsets[nlist], annlearn_fs_block_bytes(M)),
                          dtype=np.uint8)
    cdef const uint8_t[:, ::1] src = codes
    cdef uint8_t[:, ::1] dst = packed_arr
    cdef const id_t[::1] rows = offsets
    cdef const id_t[::1] blocks = block_offsets
    with nogil:
        for c in range(nlist):
            if rows[c + 1] > rows[c]:
                annlearn_fs_pack(&src[rows[c], 0], rows[c + 1] - rows[c], M,
                                 &dst[blocks[c], 0])
    return packed_arr, block_offsets


def quantize_tables(tables, base=None, int n_threads=1, isa=None):
    """Quantize float lookup tables to uint8 for the fast scan.

    Per table (query q, probed cell p, sub-quantizer m), the minimum
    ``min_j tables[q, p, m, j]`` is subtracted and moved into the bias. Each
    probe then has one scale for its M tables,
    ``scale[q, p] = vmax / span[q, p]`` with ``span[q, p]`` the largest
    range (max - min) of its tables and ``vmax = min(255, 65535 // M)``, so
    that M entries sum to at most 65535 (no uint16 overflow); distances
    ``bias + sum / scale`` from different cells rank in one heap:

        qtables = rint(min((tables - min) * scale, vmax))
                  (float32 operations, rounding half to even)
        bias[q, p] = base[q, p] + sum_m min(tables[q, p, m])

    Parameters
    ----------
    tables : ndarray of shape (n_queries, nprobe, M, 16), float32
        Lookup tables (for by-residual L2, one set per probed cell), finite.
    base : ndarray of shape (n_queries, nprobe), float32, default=None
        Term 1 of each probed cell (the coarse distance); zeros if None.
    n_threads : int, default=1
        OpenMP threads (over queries).
    isa : {"avx512", "avx2", "none"}, default=None
        Kernel to run (all give the same bytes; for tests); None: the
        widest available.

    Returns
    -------
    qtables : ndarray of shape (n_queries, nprobe, M, 16), uint8
    scale : ndarray of shape (n_queries, nprobe), float32
        Quantization steps per distance unit (1 when a probe's tables are
        all flat).
    bias : ndarray of shape (n_queries, nprobe), float32

    Notes
    -----
    Error bound. Every entry is rounded to the nearest step (a step is
    ``1 / scale[q, p] = span[q, p] / vmax`` distance units), so it is off
    by at most half a step, and an approximate distance
    ``bias + sum / scale`` differs from the exact ``base + sum_m tables`` by
    at most ``M / 2`` steps, i.e. ``M * span[q, p] / (2 * vmax)``, plus float32
    rounding of the bias and of the final division and addition (relative
    ~1e-7). Padding to an even M adds no error (zero tables). That bound is
    reached only when all M roundings go the same way; independent roundings
    give a typical error of ``sqrt(M / 12)`` steps. The step is set by the
    widest table of the probe, so one table with a large range coarsens the
    probe's others (not other cells'). Two rows whose exact distances
    differ by more than ``M`` steps of either's probe are never swapped.
    """
    tables = np.ascontiguousarray(tables, dtype=np.float32)
    if tables.ndim != 4 or tables.shape[3] != 16:
        raise ValueError(
            f"Expected tables of shape (n_queries, nprobe, M, 16), got {tables.shape}."
        )
    cdef intp_t n_queries = tables.shape[0], nprobe = tables.shape[1]
    cdef intp_t M = tables.shape[2]
    if M < 1:
        raise ValueError("Expected at least one sub-quantizer (M >= 1), got 0.")
    if base is None:
        base = np.zeros((n_queries, nprobe), dtype=np.float32)
    base = np.ascontiguousarray(base, dtype=np.float32)
    if base.shape != (n_queries, nprobe):
        raise ValueError(
            f"Expected base of shape {(n_queries, nprobe)}, got {base.shape}."
        )
    qtables_arr = np.empty(tables.shape, dtype=np.uint8)
    scale_arr = np.ones((n_queries, nprobe), dtype=np.float32)
    bias_arr = np.empty((n_queries, nprobe), dtype=np.float32)
    if n_queries == 0 or nprobe == 0:
        return qtables_arr, scale_arr, bias_arr
    cdef const float32_t[:, :, :, ::1] T = tables
    cdef const float32_t[:, ::1] B_ = base
    cdef uint8_t[:, :, :, ::1] out = qtables_arr
    cdef float32_t[:, ::1] scale = scale_arr
    cdef float32_t[:, ::1] bias = bias_arr
    cdef float32_t vmax = min(255, 65535 // M)
    cdef int isa_ = _resolve_isa(isa)
    cdef intp_t q, p
    cdef int bad = 0, failed = 0
    cdef int* bad_ptr = &bad  # flags, not reduction variables of the prange
    cdef int* failed_ptr = &failed
    cdef const float** A = NULL
    cdef const float** B = NULL
    cdef float32_t* lo_buf = NULL
    with nogil, parallel(num_threads=<int>min(n_threads, n_queries)):
        A = <const float**>malloc(nprobe * sizeof(float*))
        B = <const float**>malloc(nprobe * sizeof(float*))
        lo_buf = <float32_t*>malloc(M * sizeof(float32_t))
        for q in prange(n_queries, schedule="static"):
            if A == NULL or B == NULL or lo_buf == NULL:
                failed_ptr[0] = 1
                continue
            for p in range(nprobe):
                A[p] = &T[q, p, 0, 0]
                B[p] = NULL
            if annlearn_fs_tables_query(isa_, A, B, nprobe, M, &B_[q, 0], vmax,
                                        lo_buf, &out[q, 0, 0, 0], &scale[q, 0],
                                        &bias[q, 0]):
                bad_ptr[0] = 1
        free(A)
        free(B)
        free(lo_buf)
    if failed:
        raise MemoryError("annlearn: could not allocate the table buffers.")
    if bad:
        raise ValueError("Expected finite lookup tables.")
    return qtables_arr, scale_arr, bias_arr


# Checked on every call by a typed loop, as _utils/_checks.pxd's checks.
cdef bint _lists_match(
    const id_t[::1] list_offsets, const id_t[::1] block_offsets, intp_t n_blocks
) noexcept nogil:
    """Offsets non-decreasing from >= 0, each list in ceil(size / 32) blocks
    of ``packed`` (pack_lists's layout)."""
    cdef intp_t c, nlist = list_offsets.shape[0] - 1
    cdef id_t size
    if list_offsets[0] < 0 or block_offsets[0] < 0 or block_offsets[nlist] > n_blocks:
        return False
    for c in range(nlist):
        size = list_offsets[c + 1] - list_offsets[c]
        if size < 0 or block_offsets[c + 1] - block_offsets[c] != (size + _BLOCK - 1) // _BLOCK:
            return False
    return True


def ivf_tables(
    const float32_t[:, ::1] Q,
    const float32_t[:, :, ::1] codebooks_t,
    const float32_t[:, :, ::1] term2,
    const id_t[:, ::1] probe_cells,
    const float32_t[:, ::1] probe_base,
    bint inner_product,
    int n_threads,
    isa=None,
):
    """Quantized lookup tables of the probed cells, from the queries directly.

    The fused equivalent of building the float tables of ``_ivf.pyx``'s
    decomposition (term 3 of the query plus term 2 of each probed cell) and
    calling :func:`quantize_tables` on them, without the float array of
    shape (n_queries, nprobe, M, 16); inputs as ``_ivf.ivfpq_scan`` takes
    them, for 4-bit codebooks.

    Parameters
    ----------
    Q : ndarray of shape (n_queries, n_features), float32
        Prepared queries.
    codebooks_t : ndarray of shape (M, dsub, 16), float32
        PQ codebooks, transposed, ``M * dsub == n_features``.
    term2 : ndarray of shape (n_tables, M, 16), float32
        Term 2 per cell (``n_tables == nlist``), one table for every cell
        (``n_tables == 1``) or none (``n_tables == 0``).
    probe_cells : ndarray of shape (n_queries, nprobe), int64
        Cells to scan per query (-1: skipped; its table is zero, so that it
        does not widen the query's scale).
    probe_base : ndarray of shape (n_queries, nprobe), float32
        Term 1 of each probed cell.
    inner_product : bool
        Tables of -<x, y> instead of ||x - y||^2.
    n_threads : int
        OpenMP threads (over queries).
    isa : {"avx512", "avx2", "none"}, default=None
        Kernel of the quantization (all give the same bytes; for tests);
        None: the widest available.

    Returns
    -------
    qtables : ndarray of shape (n_queries, nprobe, M, 16), uint8
    scale : ndarray of shape (n_queries, nprobe), float32
    bias : ndarray of shape (n_queries, nprobe), float32
        As :func:`quantize_tables` returns them (a skipped probe: a zero
        table, scale 1, bias ``probe_base``).
    """
    cdef intp_t n_queries = Q.shape[0]
    cdef intp_t M = codebooks_t.shape[0], dsub = codebooks_t.shape[1]
    cdef intp_t nprobe = probe_cells.shape[1], n_tables = term2.shape[0]
    _check_table_inputs(Q, codebooks_t, term2, probe_cells, probe_base)
    qtables_arr = np.empty((n_queries, nprobe, M, 16), dtype=np.uint8)
    scale_arr = np.ones((n_queries, nprobe), dtype=np.float32)
    bias_arr = np.empty((n_queries, nprobe), dtype=np.float32)
    if n_queries == 0 or nprobe == 0:
        return qtables_arr, scale_arr, bias_arr
    cdef uint8_t[:, :, :, ::1] out = qtables_arr
    cdef float32_t[:, ::1] scale = scale_arr
    cdef float32_t[:, ::1] bias = bias_arr
    cdef float32_t vmax = min(255, 65535 // M)
    cdef float32_t alpha = -1.0 if inner_product else -2.0
    cdef int isa_ = _resolve_isa(isa)
    cdef intp_t table_size = M * 16, q, p
    cdef id_t cell
    cdef float32_t* term3 = NULL
    cdef float32_t* lo_buf = NULL
    cdef const float** A = NULL
    cdef const float** B = NULL
    cdef int failed = 0, bad = 0
    cdef int* failed_ptr = &failed
    cdef int* bad_ptr = &bad
    with nogil, parallel(num_threads=<int>min(n_threads, n_queries)):
        term3 = <float32_t*>malloc(table_size * sizeof(float32_t))
        lo_buf = <float32_t*>malloc(M * sizeof(float32_t))
        A = <const float**>malloc(nprobe * sizeof(float*))
        B = <const float**>malloc(nprobe * sizeof(float*))
        for q in prange(n_queries, schedule="static"):
            if term3 == NULL or lo_buf == NULL or A == NULL or B == NULL:
                failed_ptr[0] = 1
                continue
            annlearn_pq_tables(&Q[q, 0], &codebooks_t[0, 0, 0], M, dsub, 16, alpha,
                               term3)
            if n_tables == 1:
                annlearn_add(term3, &term2[0, 0, 0], table_size, term3)
            for p in range(nprobe):
                cell = probe_cells[q, p]
                # A skipped probe gets a zero table (A == NULL).
                A[p] = term3 if cell >= 0 else NULL
                B[p] = &term2[cell, 0, 0] if cell >= 0 and n_tables > 1 else NULL
            if annlearn_fs_tables_query(isa_, A, B, nprobe, M, &probe_base[q, 0], vmax,
                                        lo_buf, &out[q, 0, 0, 0], &scale[q, 0],
                                        &bias[q, 0]):
                bad_ptr[0] = 1
        free(term3)
        free(lo_buf)
        free(A)
        free(B)
    if failed:
        raise MemoryError("annlearn: could not allocate the table buffers.")
    if bad:
        raise ValueError("Expected finite queries, codebooks and term 2.")
    return qtables_arr, scale_arr, bias_arr


def _check_table_inputs(
    const float32_t[:, ::1] Q,
    const float32_t[:, :, ::1] codebooks_t,
    const float32_t[:, :, ::1] term2,
    const id_t[:, ::1] probe_cells,
    const float32_t[:, ::1] probe_base,
):
    """Raise ValueError unless the inputs of the tables agree (as
    :func:`ivf_tables` takes them)."""
    cdef intp_t n_queries = Q.shape[0], d = Q.shape[1]
    cdef intp_t M = codebooks_t.shape[0], dsub = codebooks_t.shape[1]
    cdef intp_t nprobe = probe_cells.shape[1], n_tables = term2.shape[0]
    if codebooks_t.shape[2] != 16 or M * dsub != d or M < 1:
        raise ValueError(
            f"Expected codebooks_t of shape (M, dsub, 16) with M * dsub == {d}, "
            f"got {tuple(codebooks_t.shape)}."
        )
    if n_tables and (term2.shape[1] != M or term2.shape[2] != 16):
        raise ValueError(f"Expected term2 of shape (n_tables, {M}, 16).")
    if probe_cells.shape[0] != n_queries or probe_base.shape[0] != n_queries \
            or probe_base.shape[1] != nprobe:
        raise ValueError(
            f"Expected probe_cells and probe_base of shape ({n_queries}, nprobe)."
        )
    if not ids_within(probe_cells, -1, INT64_MAX):
        raise ValueError("Expected probe_cells >= -1.")
    if n_tables > 1 and not ids_within(probe_cells, -1, n_tables):
        raise ValueError(f"Expected probe_cells < {n_tables} (one term 2 per cell).")


cdef inline int _sum_threshold(
    float32_t worst, float32_t bias, float32_t scale
) noexcept nogil:
    """The largest uint16 sum that can still enter a heap whose worst entry is
    ``worst``, or -1 if none can.

    A row's distance is float32(bias + float32(sum) / scale); the bound is
    computed in float64 with slack for those two roundings (relative 2**-24
    each, on terms at most |worst| + |bias|, and the rounding of 1 / scale),
    so that it never rejects a row the heap would keep; the heap makes the
    exact comparison. Sums are integers: sum <= x if and only if
    sum <= floor(x).
    """
    cdef float64_t x
    if worst == INFINITY:
        return 65535
    x = (<float64_t>worst - bias + (fabs(worst) + fabs(bias)) * 1e-6) * scale
    if x < 0:
        return -1
    x = x * (1 + 1e-6)
    if x >= 65535:
        return 65535
    return <int>x


def _block_sums(packed, const uint8_t[:, ::1] table, isa=None):
    """Test twin: the uint16 sums of every vector of ``packed`` for one table.

    Parameters
    ----------
    packed : ndarray of shape (n_blocks, 16 * M2), uint8
        Codes packed by :func:`pack_codes`.
    table : ndarray of shape (M, 16), uint8
        Quantized lookup table.
    isa : {"avx512", "avx2", "none"}, default=None
        Kernel to run; None: the widest available.

    Returns
    -------
    sums : ndarray of shape (32 * n_blocks,), uint16
        Sums modulo 2**16 (exact when ``M * table.max() <= 65535``).
    """
    cdef int isa_ = _resolve_isa(isa)
    cdef intp_t M = table.shape[0]
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    if table.shape[1] != 16 or packed.ndim != 2 or (
            packed.shape[1] != annlearn_fs_block_bytes(M)):
        raise ValueError("table must be (M, 16) and packed (n_blocks, 16 * M2).")
    cdef const uint8_t[:, ::1] codes = packed
    cdef intp_t n_blocks = packed.shape[0], b = 0
    sums_arr = np.zeros(BLOCK * n_blocks, dtype=np.uint16)
    cdef uint16_t[::1] sums = sums_arr
    cdef uint32_t mask
    image_arr = np.empty(annlearn_fs_image_bytes(M), dtype=np.uint8)
    cdef uint8_t[::1] image = image_arr
    annlearn_fs_image(&table[0, 0], M, &image[0])
    while b < n_blocks:
        # threshold 65535: every block has passing vectors, so every block
        # returns with its sums.
        b = annlearn_fs_scan(isa_, &codes[0, 0], b, n_blocks,
                             annlearn_fs_n_pairs(M), &image[0], 65535,
                             &sums[BLOCK * b], &mask, NULL)
        if mask != 0xFFFFFFFF:
            raise AssertionError("threshold 65535 rejected a vector")
        b += 1
    return sums_arr


def ivf_fastscan(
    const uint8_t[:, :, :, ::1] qtables,
    const float32_t[:, ::1] scale,
    const float32_t[:, ::1] bias,
    const id_t[:, ::1] probe_cells,
    const uint8_t[:, ::1] packed,
    const id_t[::1] block_offsets,
    const id_t[::1] list_offsets,
    intp_t k,
    int n_threads,
    isa=None,
    collector=None,
    allowed=None,
):
    """k best rows per query by 4-bit fast scan over the probed lists.

    Parameters
    ----------
    qtables : ndarray of shape (n_queries, nprobe, M, 16), uint8
        Quantized lookup tables (:func:`quantize_tables`), one set per query
        and probed cell; ``M * qtables.max() <= 65535``.
    scale : ndarray of shape (n_queries, nprobe), float32
        Quantization steps per distance unit of each probed cell, positive.
    bias : ndarray of shape (n_queries, nprobe), float32
        Distance offset of each probed cell (finite).
    probe_cells : ndarray of shape (n_queries, nprobe), int64
        Cells to scan per query, distinct within a row (a cell probed twice
        would offer its rows twice); -1: skip.
    packed : ndarray of shape (n_blocks, 16 * M2), uint8
        Lists packed by :func:`pack_lists`.
    block_offsets : ndarray of shape (nlist + 1,), int64
        List c is blocks ``block_offsets[c]:block_offsets[c + 1]``.
    list_offsets : ndarray of shape (nlist + 1,), int64
        List c is rows ``list_offsets[c]:list_offsets[c + 1]`` of the
        cell-sorted order.
    k : int
        Rows to keep per query, ``k >= 1``.
    n_threads : int
        OpenMP threads (over queries).
    isa : {"avx512", "avx2", "none"}, default=None
        Kernel to run; None: the widest available (:func:`fastscan_isa`).
    collector : {"heap", "buffer"}, default=None
        How the candidates that pass the SIMD threshold are kept: a heap of
        k, or a buffer of 2k + 32 compacted by radix select when full (see
        ``_fastscan.h``); None: the heap for ``k < HEAP_MAX_K``, else the
        buffer. Same results either way.
    allowed : ndarray of shape (1 or n_queries, n_blocks), uint32, default=None
        A filter in the packed layout: bit i of ``allowed[q, b]`` allows
        vector i of block b (row ``1`` for every query). Excluded vectors
        never pass the threshold test and blocks with no allowed vector are
        not read (see ``_fastscan.h``). None: every row.

    Returns
    -------
    distances : ndarray of shape (n_queries, k), float32
        ``bias[q, p] + sum / scale[q, p]`` (float32 operations), ascending;
        +inf where fewer than k rows were probed.
    positions : ndarray of shape (n_queries, k), int64
        Row positions in the cell-sorted order (``list_offsets[c] + i``);
        ties rank by the smaller position; -1 where none.
    """
    cdef intp_t n_queries = qtables.shape[0], nprobe = qtables.shape[1]
    if qtables.shape[3] != 16 or qtables.shape[2] < 1:
        raise ValueError("Expected qtables of shape (n_queries, nprobe, M, 16), M >= 1.")
    if scale.shape[0] != n_queries or scale.shape[1] != nprobe \
            or bias.shape[0] != n_queries or bias.shape[1] != nprobe \
            or probe_cells.shape[0] != n_queries or probe_cells.shape[1] != nprobe:
        raise ValueError(
            f"Expected scale, bias and probe_cells of shape ({n_queries}, {nprobe})."
        )
    if not (positive_finite(scale) and all_finite(bias)):
        raise ValueError("Expected positive finite scale and finite bias.")
    no_tables = np.empty((0, 0, 0), dtype=np.float32)
    no_rows = np.empty((0, 0), dtype=np.float32)
    return _scan_lists(
        False, qtables, scale, bias, no_rows, no_tables, no_tables, no_rows, False,
        probe_cells, packed, block_offsets, list_offsets, k, n_threads, isa,
        collector, allowed,
    )


def ivf_fastscan_queries(
    const float32_t[:, ::1] Q,
    const float32_t[:, :, ::1] codebooks_t,
    const float32_t[:, :, ::1] term2,
    const id_t[:, ::1] probe_cells,
    const float32_t[:, ::1] probe_base,
    bint inner_product,
    const uint8_t[:, ::1] packed,
    const id_t[::1] block_offsets,
    const id_t[::1] list_offsets,
    intp_t k,
    int n_threads,
    isa=None,
    collector=None,
    allowed=None,
    bound=None,
):
    """:func:`ivf_tables` then :func:`ivf_fastscan`, one query at a time.

    Each thread builds a query's quantized tables into its own buffer and
    scans them at once: the tables (``nprobe * M * 16`` bytes a query) stay
    in cache and are never held for every query. The tables, and so the
    results, are those of the two calls. Parameters as :func:`ivf_tables`
    (``Q`` to ``inner_product``) and :func:`ivf_fastscan` (the rest), and:

    bound : ndarray of shape (n_queries,), float32, default=None
        Each query's scan starts as if its k best so far were all at this
        distance: only rows at most that far are candidates (a row at
        exactly ``bound`` is one), so that a list scanned after another part
        of the index gave its k-th best keeps the rows that can still
        enter, at the cost of a scan and few heap operations. Slots nothing
        filled are (+inf, -1). None: +inf (every row).

    Returns
    -------
    distances, positions : as :func:`ivf_fastscan` returns them.
    """
    _check_table_inputs(Q, codebooks_t, term2, probe_cells, probe_base)
    if bound is not None:
        bound = np.ascontiguousarray(bound, dtype=np.float32)
        if bound.shape != (probe_cells.shape[0],) or np.isnan(bound).any():
            raise ValueError(
                f"Expected bound of shape ({probe_cells.shape[0]},), no NaN."
            )
    return _scan_lists(
        True, np.empty((0, 0, 0, 16), dtype=np.uint8), np.empty((0, 0), np.float32),
        np.empty((0, 0), np.float32), Q, codebooks_t, term2, probe_base,
        inner_product, probe_cells, packed, block_offsets, list_offsets, k,
        n_threads, isa, collector, allowed, bound,
    )


def _scan_lists(
    bint fused,
    const uint8_t[:, :, :, ::1] qtables,
    const float32_t[:, ::1] scale,
    const float32_t[:, ::1] bias,
    const float32_t[:, ::1] Q,
    const float32_t[:, :, ::1] codebooks_t,
    const float32_t[:, :, ::1] term2,
    const float32_t[:, ::1] probe_base,
    bint inner_product,
    const id_t[:, ::1] probe_cells,
    const uint8_t[:, ::1] packed,
    const id_t[::1] block_offsets,
    const id_t[::1] list_offsets,
    intp_t k,
    int n_threads,
    isa,
    collector,
    allowed,
    bound=None,
):
    """Both scans, inputs checked: with ``fused``, each query's tables built
    from (Q, codebooks_t, term2, probe_base) into the thread's buffer, else
    read from (qtables, scale, bias); each query's scan from its ``bound``
    (float32, checked) or +inf."""
    cdef int isa_ = _resolve_isa(isa)
    cdef bint use_heap = _use_heap(collector, k)
    cdef intp_t n_queries = probe_cells.shape[0], nprobe = probe_cells.shape[1]
    cdef intp_t M = codebooks_t.shape[0] if fused else qtables.shape[2]
    cdef intp_t dsub = codebooks_t.shape[1], n_tables = term2.shape[0]
    cdef intp_t allow_stride = _check_lists(
        M, probe_cells, packed, block_offsets, list_offsets, k, allowed
    )
    cdef const uint32_t[:, ::1] allow
    cdef bint filtered = allowed is not None
    if filtered:
        allow = allowed
    cdef const float32_t[::1] start
    cdef bint bounded = bound is not None
    if bounded:
        start = bound

    distances_arr = np.empty((n_queries, k), dtype=np.float32)
    positions_arr = np.empty((n_queries, k), dtype=np.int64)
    if n_queries == 0:
        return distances_arr, positions_arr
    if nprobe == 0:
        distances_arr.fill(INFINITY)
        positions_arr.fill(-1)
        return distances_arr, positions_arr
    cdef float32_t[:, ::1] distances = distances_arr
    cdef id_t[:, ::1] positions = positions_arr
    cdef intp_t n_pairs = annlearn_fs_n_pairs(M), n_blocks = packed.shape[0]
    cdef intp_t image_bytes = annlearn_fs_image_bytes(M)
    # Buffer collector: 2k + 32 slots, so that a compaction (O(2k)) keeps k
    # and frees at least k + 1 slots, and a block's 32 candidates always fit.
    cdef intp_t capacity = 2 * k + _BLOCK
    cdef intp_t table_size = M * 16, q, p
    cdef float32_t vmax = min(255, 65535 // M)
    cdef float32_t alpha = -1.0 if inner_product else -2.0
    cdef id_t cell
    cdef uint8_t* image = NULL
    cdef uint16_t* sums = NULL
    cdef float32_t* kept_d = NULL
    cdef id_t* kept_i = NULL
    cdef float32_t* tie_d = NULL
    cdef id_t* tie_i = NULL
    cdef void* scratch = NULL
    # The fused scan's buffers: one query's tables and what builds them.
    cdef float32_t* term3 = NULL
    cdef float32_t* lo_buf = NULL
    cdef const float** A = NULL
    cdef const float** B = NULL
    cdef uint8_t* qt = NULL
    cdef float32_t* qbias = NULL
    cdef float32_t* qscale = NULL
    cdef float64_t* lo_sum = NULL
    # Codes of the vectors: one table serves every probe (a stride of 0).
    cdef bint one_table = fused and n_tables <= 1
    cdef intp_t table_stride = 0 if one_table else M * 16
    cdef const uint8_t* codes = &packed[0, 0] if n_blocks else NULL
    cdef const uint32_t* allow0 = &allow[0, 0] if filtered and n_blocks else NULL
    cdef int failed = 0, overflow = 0, bad = 0
    cdef int* failed_ptr = &failed
    cdef int* overflow_ptr = &overflow
    cdef int* bad_ptr = &bad

    with nogil, parallel(num_threads=<int>min(n_threads, n_queries)):
        image = <uint8_t*>malloc(image_bytes)
        sums = <uint16_t*>malloc(_BLOCK * sizeof(uint16_t))
        if not use_heap:
            kept_d = <float32_t*>malloc(capacity * sizeof(float32_t))
            kept_i = <id_t*>malloc(capacity * sizeof(id_t))
            tie_d = <float32_t*>malloc(capacity * sizeof(float32_t))
            tie_i = <id_t*>malloc(capacity * sizeof(id_t))
            scratch = malloc(capacity * 16)
        if fused:
            term3 = <float32_t*>malloc(table_size * sizeof(float32_t))
            lo_buf = <float32_t*>malloc(M * sizeof(float32_t))
            A = <const float**>malloc(nprobe * sizeof(float*))
            B = <const float**>malloc(nprobe * sizeof(float*))
            qt = <uint8_t*>malloc((1 if one_table else nprobe) * table_size)
            qbias = <float32_t*>malloc(nprobe * sizeof(float32_t))
            qscale = <float32_t*>malloc(nprobe * sizeof(float32_t))
            lo_sum = <float64_t*>malloc(sizeof(float64_t))
        for q in prange(n_queries, schedule="dynamic", chunksize=16):
            if image == NULL or sums == NULL or not use_heap and (
                    kept_d == NULL or kept_i == NULL or tie_d == NULL
                    or tie_i == NULL or scratch == NULL) or fused and (
                    term3 == NULL or lo_buf == NULL or A == NULL or B == NULL
                    or qt == NULL or qbias == NULL or qscale == NULL
                    or lo_sum == NULL):
                failed_ptr[0] = 1
                continue
            if fused:
                # ivf_tables' tables, for this query only, and only for the
                # cells the scan reads (an empty list's probe is skipped:
                # an index cut by cells builds its own cells' tables only).
                annlearn_pq_tables(&Q[q, 0], &codebooks_t[0, 0, 0], M, dsub, 16,
                                   alpha, term3)
                if n_tables == 1:
                    annlearn_add(term3, &term2[0, 0, 0], table_size, term3)
                if one_table:
                    # The tables, scale and lo sum ivf_tables gives every
                    # probe; each probe's bias as it computes it.
                    if annlearn_fs_table_probe(isa_, term3, NULL, M, vmax, lo_buf, qt,
                                               qscale, lo_sum):
                        bad_ptr[0] = 1
                        continue
                    for p in range(nprobe):
                        qscale[p] = qscale[0]
                        qbias[p] = <float32_t>(<float64_t>probe_base[q, p] + lo_sum[0])
                else:
                    for p in range(nprobe):
                        cell = probe_cells[q, p]
                        if cell >= 0 and block_offsets[cell] == block_offsets[cell + 1]:
                            cell = -1
                        A[p] = term3 if cell >= 0 else NULL
                        B[p] = &term2[cell, 0, 0] if cell >= 0 else NULL
                    if annlearn_fs_tables_query(isa_, A, B, nprobe, M,
                                                &probe_base[q, 0], vmax, lo_buf, qt,
                                                qscale, qbias):
                        bad_ptr[0] = 1
                        continue
            if _scan_query(
                isa_, use_heap, qt if fused else &qtables[q, 0, 0, 0],
                table_stride, qscale if fused else &scale[q, 0],
                qbias if fused else &bias[q, 0],
                &probe_cells[q, 0], nprobe, M, n_pairs, codes, &block_offsets[0],
                &list_offsets[0], allow0 + q * allow_stride if filtered else NULL,
                k, capacity, start[q] if bounded else INFINITY, &distances[q, 0],
                &positions[q, 0], image, sums, kept_d, kept_i, tie_d, tie_i, scratch,
            ):
                overflow_ptr[0] = 1
        free(image)
        free(sums)
        free(kept_d)
        free(kept_i)
        free(tie_d)
        free(tie_i)
        free(scratch)
        free(term3)
        free(lo_buf)
        free(A)
        free(B)
        free(qt)
        free(qbias)
        free(qscale)
        free(lo_sum)
    if failed:
        raise MemoryError("annlearn: could not allocate the fast-scan buffers.")
    if bad:
        raise ValueError("Expected finite queries, codebooks and term 2.")
    if overflow:
        raise ValueError(
            f"Expected M * qtables.max() <= 65535 (uint16 sums), got M={M} and "
            "larger entries; use quantize_tables."
        )
    return distances_arr, positions_arr


def _use_heap(collector, intp_t k):
    """Whether the scan keeps its candidates in a heap (else a buffer)."""
    if collector not in (None, "heap", "buffer"):
        raise ValueError(f"collector must be 'heap', 'buffer' or None, got {collector!r}.")
    return collector == "heap" or (collector is None and k < HEAP_MAX_K)


def _check_lists(
    intp_t M,
    const id_t[:, ::1] probe_cells,
    const uint8_t[:, ::1] packed,
    const id_t[::1] block_offsets,
    const id_t[::1] list_offsets,
    intp_t k,
    allowed,
):
    """Raise ValueError unless the packed lists, the probed cells, k and the
    filter agree; return the filter's row stride (0: one row for every
    query)."""
    cdef intp_t nlist = list_offsets.shape[0] - 1, n_blocks = packed.shape[0]
    cdef intp_t n_queries = probe_cells.shape[0]
    if packed.shape[1] != annlearn_fs_block_bytes(M):
        raise ValueError(
            f"Expected packed codes with {annlearn_fs_block_bytes(M)} bytes per "
            f"block for M={M}, got {packed.shape[1]}."
        )
    if k < 1:
        raise ValueError(f"Expected k >= 1, got {k}.")
    if nlist < 1 or block_offsets.shape[0] != nlist + 1:
        raise ValueError("Expected block_offsets and list_offsets of shape (nlist + 1,).")
    if not _lists_match(list_offsets, block_offsets, n_blocks):
        raise ValueError(
            "Expected block_offsets and list_offsets of the same lists "
            "(pack_lists), within packed."
        )
    if not ids_within(probe_cells, -1, nlist):
        raise ValueError(f"Expected probe_cells in [-1, {nlist}).")
    if allowed is None:
        return 0
    cdef const uint32_t[:, ::1] allow = allowed
    if allow.shape[0] not in (1, n_queries) or allow.shape[1] != n_blocks:
        raise ValueError(
            f"Expected allowed of shape (1 or {n_queries}, {n_blocks}), got "
            f"{np.shape(allowed)}."
        )
    # One filter for every query (stride 0), or one row per query.
    return n_blocks if allow.shape[0] > 1 else 0


cdef int _scan_query(
    int isa_,
    bint use_heap,
    const uint8_t* qtables,
    intp_t table_stride,
    const float32_t* scale,
    const float32_t* bias,
    const id_t* cells,
    intp_t nprobe,
    intp_t M,
    intp_t n_pairs,
    const uint8_t* codes,
    const id_t* block_offsets,
    const id_t* list_offsets,
    const uint32_t* allowed,
    intp_t k,
    intp_t capacity,
    float32_t start,
    float32_t* out_d,
    id_t* out_i,
    uint8_t* image,
    uint16_t* sums,
    float32_t* kept_d,
    id_t* kept_i,
    float32_t* tie_d,
    id_t* tie_i,
    void* scratch,
) noexcept nogil:
    """One query's k best over its probed lists into ``out_d``/``out_i``
    (probe p's tables at ``qtables + p * table_stride``, M x 16: a stride
    of 0 when every probe has the same; its scale and bias per probe), with
    the thread's buffers, from a k-th best of ``start`` (+inf: none); 1 if
    a table can overflow the uint16 sums, else 0."""
    cdef intp_t p, r, b, b_first, b_end, n_kept = 0, rows_last
    cdef id_t cell, row0, worst_position = INT64_MAX
    cdef float32_t bias_qp, scale_qp, dist, worst = start
    cdef uint32_t mask, last_mask
    cdef int threshold, lane, largest, changed, overflow = 0
    cdef intp_t imaged = -1  # offset of the table the image holds
    if use_heap:
        # Empty entries at ``start``: a row ranks before them from there.
        heap_init(out_d, out_i, k)
        for r in range(k):
            out_d[r] = start
    for p in range(nprobe):
        cell = cells[p]
        if cell < 0:
            continue
        b = block_offsets[cell]
        b_end = block_offsets[cell + 1]
        if b == b_end:
            continue
        b_first = b
        row0 = list_offsets[cell]
        # Padding rows of the last block must never be candidates.
        rows_last = list_offsets[cell + 1] - row0 - (b_end - 1 - b) * _BLOCK
        last_mask = 0xFFFFFFFF if rows_last == _BLOCK else \
            ((<uint32_t>1 << rows_last) - 1)
        if p * table_stride != imaged:
            # The image of a shared table is built once.
            largest = annlearn_fs_image(qtables + p * table_stride, M, image)
            imaged = p * table_stride
            if largest * M > 65535:
                overflow = 1
        bias_qp = bias[p]
        scale_qp = scale[p]
        if use_heap:
            worst = out_d[0]
        threshold = _sum_threshold(worst, bias_qp, scale_qp)
        while threshold >= 0 and b < b_end:
            b = annlearn_fs_scan(isa_, codes, b, b_end, n_pairs, image,
                                 <uint16_t>threshold, sums, &mask, allowed)
            if b == b_end:
                break
            if b == b_end - 1:
                mask = mask & last_mask
            # dist is never -0.0 (sum / scale >= +0.0 and -0.0 + +0.0 ==
            # +0.0), as the radix keys require.
            if use_heap:
                changed = 0
                while mask:
                    lane = annlearn_fs_ctz(mask)
                    mask = mask & (mask - 1)
                    dist = bias_qp + (<float32_t>sums[lane]) / scale_qp
                    changed = changed | heap_push(
                        out_d, out_i, k, dist,
                        <id_t>(row0 + (b - b_first) * _BLOCK + lane))
                if changed:
                    worst = out_d[0]
                    threshold = _sum_threshold(worst, bias_qp, scale_qp)
            else:
                if n_kept + _BLOCK > capacity:
                    annlearn_fs_compact(kept_d, kept_i, n_kept, k, tie_d, tie_i,
                                        &worst, &worst_position)
                    n_kept = k
                    threshold = _sum_threshold(worst, bias_qp, scale_qp)
                while mask:
                    lane = annlearn_fs_ctz(mask)
                    mask = mask & (mask - 1)
                    kept_d[n_kept] = bias_qp + (<float32_t>sums[lane]) / scale_qp
                    kept_i[n_kept] = row0 + (b - b_first) * _BLOCK + lane
                    n_kept = n_kept + 1
            b = b + 1
    if use_heap:
        heap_sort(out_d, out_i, k)
        for r in range(k):
            if out_i[r] == INT64_MAX:
                out_d[r] = INFINITY
                out_i[r] = -1
    else:
        if n_kept > k:
            annlearn_fs_compact(kept_d, kept_i, n_kept, k, tie_d, tie_i, &worst,
                                &worst_position)
            n_kept = k
        annlearn_fs_sort(kept_d, kept_i, n_kept, out_d, out_i, scratch)
        for r in range(n_kept, k):
            out_d[r] = INFINITY
            out_i[r] = -1
    return overflow
