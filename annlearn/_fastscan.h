/*
 * 4-bit fast-scan product-quantization kernels: the code layout, the
 * register image of the lookup tables and the block scan, with AVX-512BW and
 * AVX2 versions selected at run time (annlearn_fs_best_isa()) and a portable
 * one. Plain C, called without the GIL from _fastscan.pyx.
 *
 * Why 4 bits: a sub-quantizer with 16 centroids has a lookup table of 16
 * bytes once its entries are quantized to uint8, which is exactly what one
 * byte shuffle (vpshufb) indexes: the table sits in a register and 32 (AVX2)
 * or 64 (AVX-512) lookups cost one instruction, where the 8-bit scan of
 * _ivf.pyx pays one scalar load per code and sub-quantizer.
 *
 * Code layout (annlearn_fs_pack)
 * ------------------------------
 * Vectors are grouped in blocks of 32 (the last block of a list is padded
 * with code 0; the caller knows how many rows are real). M is padded to an
 * even M2 (the extra sub-quantizer has code 0 and an all-zero table). A block
 * is M2 / 2 "pairs" of 32 bytes; pair j holds sub-quantizers 2j (low nibble)
 * and 2j + 1 (high nibble) of the 32 vectors, so a block is 16 * M2 bytes and
 * pair j of block b starts at byte (b * M2 / 2 + j) * 32.
 *
 * Inside a pair, byte t (lane L = t / 16 of the 128-bit lanes, i = t % 16)
 * holds vector
 *
 *     v(t) = (i % 2) * 16 + L * 8 + i / 2
 *
 * i.e. the even bytes hold vectors 0..15 and the odd bytes vectors 16..31:
 *
 *     byte t : 0  1  2  3 ... 14 15 | 16 17 18 19 ... 30 31
 *     vector : 0 16  1 17 ...  7 23 |  8 24  9 25 ... 15 31
 *
 * The reason is the accumulation. Shuffle results are 32 bytes; read as 16
 * uint16 words, word w is (byte 2w) + 256 * (byte 2w + 1). Adding the words
 * as they are into acc_e and their high bytes (word >> 8) into acc_o gives,
 * modulo 2^16, acc_e = sum(low bytes) + 256 * acc_o, so at the end
 *
 *     sums of vectors  0..15 = acc_e - (acc_o << 8)   (word w: vector w)
 *     sums of vectors 16..31 = acc_o                  (word w: vector 16 + w)
 *
 * exactly, provided no true sum exceeds 65535 (quantize_tables bounds every
 * entry by min(255, 65535 // M)). The byte order above makes word w of both
 * results vector w (resp. 16 + w): no cross-lane shuffle at the end of a
 * block, and the threshold mask comes out in vector order with one pack and
 * one permute (AVX2) or two mask compares (AVX-512).
 *
 * Register image of the tables (annlearn_fs_image)
 * ------------------------------------------------
 * vpshufb looks up within each 128-bit lane, so every 16-byte table appears
 * twice (32 bytes). The AVX-512 kernel takes two pairs per 64-byte load of
 * codes (pairs j, j + 1 of one block are contiguous), so the tables are
 * grouped four sub-quantizers at a time, 128 bytes per group g (pairs 2g and
 * 2g + 1):
 *
 *     [T(4g) x2][T(4g+2) x2] [T(4g+1) x2][T(4g+3) x2]
 *      low nibbles (64 B)     high nibbles (64 B)
 *
 * Missing tables (M not a multiple of 4) are zero. The AVX2 kernel reads the
 * same image 32 bytes at a time. Building it costs a few hundred bytes of
 * copying per (query, probed cell), small against the scan of a cell.
 *
 * Scan (annlearn_fs_scan)
 * -----------------------
 * Scans blocks [b, end) of one list and stops at the first block in which
 * some vector's sum is <= threshold (the caller's current k-th best,
 * converted to this probe's quantized units, rounded up): it stores that
 * block's 32 sums (vector order) and the mask of passing vectors and returns
 * the block index; `end` if no block has one. The caller does the heap work
 * for the set bits and calls again from the next block, so once the heap is
 * full most blocks cost the SIMD work alone and no call.
 *
 * Filter (allowed): NULL, or one 32-bit word per block (bit i: vector i of
 * the block may be returned). A vector whose bit is clear never passes the
 * threshold test, and a block whose word is 0 is skipped without reading its
 * codes, so a filtered scan does no work for the vectors it excludes.
 */
#ifndef ANNLEARN_FASTSCAN_H
#define ANNLEARN_FASTSCAN_H

#include <stddef.h>
#include <stdint.h>
#include <math.h>
#include <string.h>

#include "_packed_gemm.h" /* annlearn_isa(), ANNLEARN_HAVE_X86_DISPATCH */

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#define ANNLEARN_FS_BLOCK 32

/* Vector held by byte t (0..31) of a pair (see the layout above). */
static inline int annlearn_fs_lane_vector(int t) {
    int lane = t >> 4, i = t & 15;
    return (i & 1) * 16 + lane * 8 + (i >> 1);
}

static inline ptrdiff_t annlearn_fs_n_pairs(ptrdiff_t M) { return (M + 1) / 2; }

static inline ptrdiff_t annlearn_fs_block_bytes(ptrdiff_t M) {
    return 32 * annlearn_fs_n_pairs(M);
}

/* Index of the lowest set bit of a non-zero mask. */
static inline int annlearn_fs_ctz(uint32_t mask) {
#if defined(__GNUC__)
    return __builtin_ctz(mask);
#else
    int i = 0;
    while (!(mask & 1u)) {
        mask >>= 1;
        i++;
    }
    return i;
#endif
}

/* Candidate order of the top-k: smaller distance first, then smaller
 * position (the tie-break of _utils/_heap.pxd). */
static inline int annlearn_fs_before(float da, int64_t ia, float db,
                                     int64_t ib) {
    return da < db || (da == db && ia < ib);
}

/* Reorder the n candidates (d, ids) so that the first k (0 < k < n) are the
 * k first in annlearn_fs_before order, the k-th of them at index k - 1
 * (quickselect with Hoare partitions and a median-of-three pivot). */
static inline void annlearn_fs_select(float* d, int64_t* ids, ptrdiff_t n,
                                      ptrdiff_t k) {
    ptrdiff_t lo = 0, hi = n - 1, target = k - 1;
    if (k <= 0 || k >= n) return;
    while (lo < hi) {
        ptrdiff_t mid = lo + (hi - lo) / 2, i = lo, j = hi;
        float pd;
        int64_t pi;
        /* Median of d[lo], d[mid], d[hi] as the pivot. */
        ptrdiff_t a = lo, b = mid, c = hi, m;
        if (annlearn_fs_before(d[b], ids[b], d[a], ids[a])) { m = a; a = b; b = m; }
        if (annlearn_fs_before(d[c], ids[c], d[b], ids[b])) {
            b = c;
            if (annlearn_fs_before(d[b], ids[b], d[a], ids[a])) b = a;
        }
        pd = d[b];
        pi = ids[b];
        while (i <= j) {
            while (annlearn_fs_before(d[i], ids[i], pd, pi)) i++;
            while (annlearn_fs_before(pd, pi, d[j], ids[j])) j--;
            if (i <= j) {
                float td = d[i];
                int64_t ti = ids[i];
                d[i] = d[j];
                ids[i] = ids[j];
                d[j] = td;
                ids[j] = ti;
                i++;
                j--;
            }
        }
        /* [lo, j] before-or-equal the pivot, [i, hi] after-or-equal it,
         * (j, i) equal to it. */
        if (target <= j)
            hi = j;
        else if (target >= i)
            lo = i;
        else
            break;
    }
}

/* ------------------------------------------------------------------------
 * Candidate collection for large k (annlearn_fs_compact)
 *
 * A heap insertion is a sift-down of log2(k) levels whose branches the CPU
 * cannot predict, and the final heap sort as many again; beyond a few tens
 * of candidates that, not the SIMD scan, is most of the scan time (on
 * Fashion-MNIST with 16 probes, one thread: ~2.2 G codes/s at k = 1, ~0.5 G
 * at k = 40, ~0.04 G at k = 640 with the heap). For large k the candidates
 * that pass the SIMD threshold are instead appended to a buffer
 * unconditionally, and when the buffer is full it is compacted to the k
 * first by (distance, position): a radix select on the distances' bits
 * (histograms, no data-dependent branches), the ties at the k-th distance
 * settled by position, then one branch-free partition. The k-th kept
 * candidate becomes the threshold. Which candidates end in the top k does not
 * depend on when compactions happen, so the result equals the heap's; the
 * final k are ordered by a radix sort (annlearn_fs_sort).
 * ------------------------------------------------------------------------ */

/* An unsigned key with the order of the float (NaN excluded; -0.0 must have
 * been turned into +0.0 by the caller). */
static inline uint32_t annlearn_fs_key(float d) {
    uint32_t u;
    memcpy(&u, &d, sizeof(u));
    return u ^ ((uint32_t)((int32_t)u >> 31) | 0x80000000u);
}

/* The k-th smallest key (1 <= k <= n) of d[0..n), by bytes from the most
 * significant; *rank receives how many candidates with exactly that key
 * belong to the k first. */
static inline uint32_t annlearn_fs_kth_key(const float* d, ptrdiff_t n,
                                           ptrdiff_t k, ptrdiff_t* rank) {
    uint32_t prefix = 0, fixed = 0;
    ptrdiff_t i, need = k;
    int shift;
    for (shift = 24; shift >= 0; shift -= 8) {
        ptrdiff_t hist[257], below = 0;
        int bin;
        memset(hist, 0, sizeof(hist));
        for (i = 0; i < n; i++) {
            uint32_t key = annlearn_fs_key(d[i]);
            /* Candidates outside the current prefix go to bin 256. */
            hist[(key & fixed) == prefix ? (key >> shift) & 255u : 256]++;
        }
        for (bin = 0; bin < 255 && below + hist[bin] < need; bin++)
            below += hist[bin];
        need -= below;
        prefix |= (uint32_t)bin << shift;
        fixed |= 255u << shift;
    }
    *rank = need;
    return prefix;
}

/* Keep the k first of the n candidates (k < n) by (d, id), in no particular
 * order, at d[0..k), ids[0..k); `ties` is scratch of n pairs. Sets *worst,
 * *worst_id to the k-th (the last kept). */
static inline void annlearn_fs_compact(float* d, int64_t* ids, ptrdiff_t n,
                                       ptrdiff_t k, float* tie_d,
                                       int64_t* tie_ids, float* worst,
                                       int64_t* worst_id) {
    ptrdiff_t rank, n_ties = 0, kept = 0, i;
    const uint32_t kth = annlearn_fs_kth_key(d, n, k, &rank);
    /* The candidates at the k-th distance: usually one. */
    for (i = 0; i < n; i++) {
        if (annlearn_fs_key(d[i]) == kth) {
            tie_d[n_ties] = d[i];
            tie_ids[n_ties] = ids[i];
            n_ties++;
        }
    }
    if (rank < n_ties) annlearn_fs_select(tie_d, tie_ids, n_ties, rank);
    /* Branch-free partition: the candidates strictly below the k-th
     * distance, then the `rank` first ties. Writes never pass reads. */
    for (i = 0; i < n; i++) {
        const int keep = annlearn_fs_key(d[i]) < kth;
        d[kept] = d[i];
        ids[kept] = ids[i];
        kept += keep;
    }
    *worst_id = INT64_MIN;
    for (i = 0; i < rank; i++) {
        d[kept + i] = tie_d[i];
        ids[kept + i] = tie_ids[i];
        if (tie_ids[i] > *worst_id) *worst_id = tie_ids[i];
    }
    *worst = tie_d[0];
}

/* Sort n candidates by (d, ids) ascending into out_d, out_ids: an LSD radix
 * sort of the distance keys, 8 bits a pass (a pass is skipped when all keys
 * share its byte, as the exponent bytes of nearby distances usually do),
 * then the rare runs of equal distances ordered by position (insertion
 * sort). `scratch` holds 16 * n bytes. A heap sort costs k log2 k
 * unpredictable branches, ~20 cycles each: more than the whole scan at
 * k = 640. */
static inline void annlearn_fs_sort(const float* d, const int64_t* ids,
                                    ptrdiff_t n, float* out_d,
                                    int64_t* out_ids, void* scratch) {
    uint32_t* keys = (uint32_t*)scratch;
    uint32_t* idx = keys + n;
    uint32_t* keys2 = idx + n;
    uint32_t* idx2 = keys2 + n;
    ptrdiff_t i, j;
    int shift;
    for (i = 0; i < n; i++) {
        keys[i] = annlearn_fs_key(d[i]);
        idx[i] = (uint32_t)i;
    }
    for (shift = 0; shift < 32; shift += 8) {
        ptrdiff_t count[256], total = 0;
        int bin, skip = 0;
        uint32_t* t;
        memset(count, 0, sizeof(count));
        for (i = 0; i < n; i++) count[(keys[i] >> shift) & 255u]++;
        for (bin = 0; bin < 256; bin++) {
            ptrdiff_t c = count[bin];
            if (c == n) skip = 1;
            count[bin] = total;
            total += c;
        }
        if (skip) continue;
        for (i = 0; i < n; i++) {
            ptrdiff_t at = count[(keys[i] >> shift) & 255u]++;
            keys2[at] = keys[i];
            idx2[at] = idx[i];
        }
        t = keys; keys = keys2; keys2 = t;
        t = idx; idx = idx2; idx2 = t;
    }
    for (i = 0; i < n; i++) {
        out_d[i] = d[idx[i]];
        out_ids[i] = ids[idx[i]];
    }
    /* Equal distances: by position. */
    for (i = 1; i < n; i++) {
        if (out_d[i] == out_d[i - 1] && out_ids[i] < out_ids[i - 1]) {
            const int64_t id = out_ids[i];
            for (j = i; j > 0 && out_d[j - 1] == out_d[i] && out_ids[j - 1] > id; j--)
                out_ids[j] = out_ids[j - 1];
            out_ids[j] = id;
        }
    }
}

/* Pack rows [0, n) of `codes` (n x M, values 0..15) into ceil(n / 32) blocks
 * of annlearn_fs_block_bytes(M) bytes at `out`; padding rows and the padding
 * sub-quantizer get code 0. */
static inline void annlearn_fs_pack(const uint8_t* codes, ptrdiff_t n,
                                    ptrdiff_t M, uint8_t* out) {
    const ptrdiff_t n_pairs = annlearn_fs_n_pairs(M);
    const ptrdiff_t n_blocks = (n + 31) / 32;
    ptrdiff_t b, j;
    int t;
    for (b = 0; b < n_blocks; b++) {
        for (j = 0; j < n_pairs; j++) {
            uint8_t* dst = out + (b * n_pairs + j) * 32;
            for (t = 0; t < 32; t++) {
                ptrdiff_t v = b * 32 + annlearn_fs_lane_vector(t);
                uint8_t lo = 0, hi = 0;
                if (v < n) {
                    lo = codes[v * M + 2 * j] & 15;
                    if (2 * j + 1 < M) hi = codes[v * M + 2 * j + 1] & 15;
                }
                dst[t] = (uint8_t)(lo | (hi << 4));
            }
        }
    }
}

/* The inverse of annlearn_fs_pack for rows [0, n): `out` is n x M. */
static inline void annlearn_fs_unpack(const uint8_t* packed, ptrdiff_t n,
                                      ptrdiff_t M, uint8_t* out) {
    const ptrdiff_t n_pairs = annlearn_fs_n_pairs(M);
    const ptrdiff_t n_blocks = (n + 31) / 32;
    ptrdiff_t b, j;
    int t;
    for (b = 0; b < n_blocks; b++) {
        for (j = 0; j < n_pairs; j++) {
            const uint8_t* src = packed + (b * n_pairs + j) * 32;
            for (t = 0; t < 32; t++) {
                ptrdiff_t v = b * 32 + annlearn_fs_lane_vector(t);
                if (v >= n) continue;
                out[v * M + 2 * j] = src[t] & 15;
                if (2 * j + 1 < M) out[v * M + 2 * j + 1] = src[t] >> 4;
            }
        }
    }
}

/* Bytes of the register image of M tables. */
static inline ptrdiff_t annlearn_fs_image_bytes(ptrdiff_t M) {
    return 128 * ((annlearn_fs_n_pairs(M) + 1) / 2);
}

/* Offset in the image of the (first copy of the) table of sub-quantizer s. */
static inline ptrdiff_t annlearn_fs_image_offset(ptrdiff_t s) {
    ptrdiff_t j = s >> 1;
    return (j >> 1) * 128 + (s & 1) * 64 + (j & 1) * 32;
}

/* Write the register image of `tables` (M x 16 bytes) and return the largest
 * table entry (the caller checks that M times it fits in 16 bits). */
static inline int annlearn_fs_image(const uint8_t* tables, ptrdiff_t M,
                                    uint8_t* image) {
    ptrdiff_t s, i;
    uint8_t largest = 0;
    /* Zero only the tables past M (a multiple-of-4 tail): the others are
     * overwritten. Fixed-size memcpy compiles to 16-byte moves, and the max
     * is a plain reduction the compiler vectorises. */
    for (s = M; s < 4 * ((M + 3) / 4); s++) {
        memset(image + annlearn_fs_image_offset(s), 0, 32);
    }
    for (s = 0; s < M; s++) {
        uint8_t* dst = image + annlearn_fs_image_offset(s);
        memcpy(dst, tables + 16 * s, 16);
        memcpy(dst + 16, tables + 16 * s, 16);
    }
    for (i = 0; i < 16 * M; i++)
        largest = tables[i] > largest ? tables[i] : largest;
    return largest;
}

/* ------------------------------------------------------------------------
 * Table quantization, one probed cell at a time (quantize_tables,
 * ivf_tables, the fused scan)
 *
 * Table m of a probe is A[m] + B[m] (16 floats each; A and B point to M x 16
 * floats; B == NULL: no second term). Giving the tables as a sum lets
 * ivf_tables pass term 3 of the query and the probed cell's term 2 without
 * writing the float tables out. Then
 *
 *     lo(m)  = min of table m
 *     lo_sum = sum_m lo(m)                               (double, m ascending)
 *     bias   = float(base + lo_sum)                      (double)
 *     scale  = vmax / (largest max - min over m), 1 if that is ~0
 *     out    = rint(min((table - lo) * scale, vmax))    float32
 *
 * One scale per probe, not per query: a probe's tables depend on that cell
 * alone (the scan turns the heap's worst distance into each probe's units),
 * so a cell's step is not coarsened by another cell's wider tables, and an
 * index cut into shards by cells (annlearn.dask) builds the tables of its
 * own cells only and ranks exactly as one index. Codes of the vectors (no
 * term 2 per cell) give every probe the same tables, scale and lo_sum: one
 * quantization serves all the probes of a query, each with its own bias.
 * rint rounds half to even
 * (the default rounding mode of cvtps2dq and lrintf). Not floor(x + 0.5):
 * the compiler may contract a multiply and an add into one FMA on some paths
 * and not others, which changes a result at ties; a subtract then a multiply
 * cannot be contracted, so every path gives the same bytes. Two passes over
 * the probe's tables (the scale needs all of them); lo is kept in `lo_buf`
 * (M floats) between them. Returns 1 if an entry is not finite, else 0.
 * ------------------------------------------------------------------------ */

/* SSE2 (the x86-64 baseline) or plain C. */
static inline int annlearn_fs_table_probe_base(
    const float* A, const float* B, ptrdiff_t M, float vmax, float* lo_buf,
    uint8_t* out, float* scale, double* lo_sum) {
    ptrdiff_t m;
    float span = 0.0f, s;
    double total = 0.0;
#if defined(__SSE2__)
    __m128 check = _mm_setzero_ps();
#define ANNLEARN_FS_LOAD(dst, off)                   \
    dst = _mm_loadu_ps(A + m * 16 + off);            \
    if (B != NULL) dst = _mm_add_ps(dst, _mm_loadu_ps(B + m * 16 + off));
#else
    float check = 0.0f;
#endif
    for (m = 0; m < M; m++) {
        float lo, hi;
#if defined(__SSE2__)
        __m128 a, b, c, d, vlo, vhi;
        ANNLEARN_FS_LOAD(a, 0)
        ANNLEARN_FS_LOAD(b, 4)
        ANNLEARN_FS_LOAD(c, 8)
        ANNLEARN_FS_LOAD(d, 12)
        vlo = _mm_min_ps(_mm_min_ps(a, b), _mm_min_ps(c, d));
        vhi = _mm_max_ps(_mm_max_ps(a, b), _mm_max_ps(c, d));
        /* x * 0 is 0 unless x is NaN or infinite. */
        check = _mm_add_ps(check, _mm_mul_ps(_mm_add_ps(_mm_add_ps(a, b),
                                                        _mm_add_ps(c, d)),
                                             _mm_setzero_ps()));
        vlo = _mm_min_ps(vlo, _mm_shuffle_ps(vlo, vlo, _MM_SHUFFLE(1, 0, 3, 2)));
        vlo = _mm_min_ps(vlo, _mm_shuffle_ps(vlo, vlo, _MM_SHUFFLE(2, 3, 0, 1)));
        vhi = _mm_max_ps(vhi, _mm_shuffle_ps(vhi, vhi, _MM_SHUFFLE(1, 0, 3, 2)));
        vhi = _mm_max_ps(vhi, _mm_shuffle_ps(vhi, vhi, _MM_SHUFFLE(2, 3, 0, 1)));
        lo = _mm_cvtss_f32(vlo);
        hi = _mm_cvtss_f32(vhi);
#else
        int j;
        lo = INFINITY;
        hi = -INFINITY;
        for (j = 0; j < 16; j++) {
            float x = A[m * 16 + j] + (B == NULL ? 0.0f : B[m * 16 + j]);
            lo = x < lo ? x : lo;
            hi = x > hi ? x : hi;
            check += x * 0.0f;
        }
#endif
        lo_buf[m] = lo;
        total += lo;
        if (hi - lo > span) span = hi - lo;
    }
#if defined(__SSE2__)
    {
        float c4[4];
        _mm_storeu_ps(c4, check);
        if (!(c4[0] == 0.0f && c4[1] == 0.0f && c4[2] == 0.0f && c4[3] == 0.0f))
            return 1;
    }
#else
    if (!(check == 0.0f)) return 1;
#endif
    if (!(span <= 3.4e38f)) return 1;
    s = span > 1e-30f ? vmax / span : 1.0f;
    *scale = s;
    *lo_sum = total;
    for (m = 0; m < M; m++) {
        uint8_t* o = out + m * 16;
#if defined(__SSE2__)
        const __m128 vlo = _mm_set1_ps(lo_buf[m]);
        const __m128 vs = _mm_set1_ps(s), top = _mm_set1_ps(vmax);
        __m128 a, b, c, d;
        ANNLEARN_FS_LOAD(a, 0)
        ANNLEARN_FS_LOAD(b, 4)
        ANNLEARN_FS_LOAD(c, 8)
        ANNLEARN_FS_LOAD(d, 12)
#define ANNLEARN_FS_Q(v) \
    _mm_cvtps_epi32(_mm_min_ps(_mm_mul_ps(_mm_sub_ps(v, vlo), vs), top))
        _mm_storeu_si128(
            (__m128i*)o,
            _mm_packus_epi16(_mm_packs_epi32(ANNLEARN_FS_Q(a), ANNLEARN_FS_Q(b)),
                             _mm_packs_epi32(ANNLEARN_FS_Q(c), ANNLEARN_FS_Q(d))));
#undef ANNLEARN_FS_Q
#else
        const float lo = lo_buf[m];
        int j;
        for (j = 0; j < 16; j++) {
            float x = A[m * 16 + j] + (B == NULL ? 0.0f : B[m * 16 + j]);
            x = (x - lo) * s;
            o[j] = (uint8_t)lrintf(x < vmax ? x : vmax);
        }
#endif
    }
#if defined(__SSE2__)
#undef ANNLEARN_FS_LOAD
#endif
    return 0;
}

#if ANNLEARN_HAVE_X86_DISPATCH

/* The same with one table per zmm register. */
__attribute__((target("avx512f")))
static inline int annlearn_fs_table_probe_avx512(
    const float* A, const float* B, ptrdiff_t M, float vmax, float* lo_buf,
    uint8_t* out, float* scale, double* lo_sum) {
    ptrdiff_t m;
    __m512 check = _mm512_setzero_ps(), vspan = _mm512_setzero_ps();
    float span, s;
    double total = 0.0;
#define ANNLEARN_FS_LOAD512(dst)           \
    dst = _mm512_loadu_ps(A + m * 16);     \
    if (B != NULL) dst = _mm512_add_ps(dst, _mm512_loadu_ps(B + m * 16));
    for (m = 0; m < M; m++) {
        __m512 t;
        float lo, hi;
        ANNLEARN_FS_LOAD512(t)
        check = _mm512_add_ps(check, _mm512_mul_ps(t, _mm512_setzero_ps()));
        lo = _mm512_reduce_min_ps(t);
        hi = _mm512_reduce_max_ps(t);
        lo_buf[m] = lo;
        total += lo;
        vspan = _mm512_max_ps(vspan, _mm512_set1_ps(hi - lo));
    }
    if (_mm512_cmpneq_ps_mask(check, _mm512_setzero_ps())) return 1;
    span = _mm512_cvtss_f32(vspan);
    if (!(span <= 3.4e38f)) return 1;
    s = span > 1e-30f ? vmax / span : 1.0f;
    *scale = s;
    *lo_sum = total;
    {
        const __m512 vs = _mm512_set1_ps(s), top = _mm512_set1_ps(vmax);
        for (m = 0; m < M; m++) {
            __m512 t;
            ANNLEARN_FS_LOAD512(t)
            t = _mm512_mul_ps(_mm512_sub_ps(t, _mm512_set1_ps(lo_buf[m])), vs);
            _mm_storeu_si128((__m128i*)(out + m * 16),
                             _mm512_cvtusepi32_epi8(
                                 _mm512_cvtps_epi32(_mm512_min_ps(t, top))));
        }
    }
#undef ANNLEARN_FS_LOAD512
    return 0;
}

#endif

static inline int annlearn_fs_table_probe(
    int isa, const float* A, const float* B, ptrdiff_t M, float vmax,
    float* lo_buf, uint8_t* out, float* scale, double* lo_sum) {
#if ANNLEARN_HAVE_X86_DISPATCH
    if (isa == ANNLEARN_ISA_AVX512)
        return annlearn_fs_table_probe_avx512(A, B, M, vmax, lo_buf, out, scale,
                                              lo_sum);
#endif
    (void)isa;
    return annlearn_fs_table_probe_base(A, B, M, vmax, lo_buf, out, scale, lo_sum);
}

/* Every probe of a query: probe p from A[p] and B[p] (A[p] == NULL: a
 * skipped probe, given a zero table, scale 1 and bias base[p]) into
 * out + p * M * 16, scale[p] and bias[p]. Returns 1 if an entry is not
 * finite, else 0. */
static inline int annlearn_fs_tables_query(
    int isa, const float** A, const float** B, ptrdiff_t nprobe,
    ptrdiff_t M, const float* base, float vmax, float* lo_buf, uint8_t* out,
    float* scale, float* bias) {
    ptrdiff_t p;
    double lo_sum;
    for (p = 0; p < nprobe; p++) {
        uint8_t* o = out + p * M * 16;
        if (A[p] == NULL) {
            memset(o, 0, (size_t)(M * 16));
            scale[p] = 1.0f;
            bias[p] = base[p];
        } else if (annlearn_fs_table_probe(isa, A[p], B[p], M, vmax, lo_buf, o,
                                           scale + p, &lo_sum)) {
            return 1;
        } else {
            bias[p] = (float)((double)base[p] + lo_sum);
        }
    }
    return 0;
}

/* The reference: plain loops over the same layout and image. */
static inline ptrdiff_t annlearn_fs_scan_portable(
    const uint8_t* codes, ptrdiff_t b, ptrdiff_t end, ptrdiff_t n_pairs,
    const uint8_t* image, uint16_t threshold, uint16_t* sums,
    uint32_t* mask, const uint32_t* allowed) {
    static const uint8_t lane_vector[32] = {
        0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
        8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    for (; b < end; b++) {
        const uint8_t* block = codes + b * n_pairs * 32;
        uint16_t acc[32];
        uint32_t passing = 0, allow = allowed ? allowed[b] : 0xFFFFFFFFu;
        ptrdiff_t j;
        int t;
        if (!allow) continue;
        memset(acc, 0, sizeof(acc));
        for (j = 0; j < n_pairs; j++) {
            const uint8_t* lo = image + (j >> 1) * 128 + (j & 1) * 32;
            const uint8_t* hi = lo + 64;
            const uint8_t* src = block + j * 32;
            for (t = 0; t < 32; t++)
                acc[lane_vector[t]] = (uint16_t)(acc[lane_vector[t]] +
                                                 lo[src[t] & 15] + hi[src[t] >> 4]);
        }
        for (t = 0; t < 32; t++)
            if (acc[t] <= threshold) passing |= 1u << t;
        passing &= allow;
        if (passing) {
            memcpy(sums, acc, sizeof(acc));
            *mask = passing;
            return b;
        }
    }
    return end;
}

#if ANNLEARN_HAVE_X86_DISPATCH

__attribute__((target("avx2")))
static inline ptrdiff_t annlearn_fs_scan_avx2(
    const uint8_t* codes, ptrdiff_t b, ptrdiff_t end, ptrdiff_t n_pairs,
    const uint8_t* image, uint16_t threshold, uint16_t* sums,
    uint32_t* mask, const uint32_t* allowed) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    const __m256i thr = _mm256_set1_epi16((short)threshold);
    for (; b < end; b++) {
        const uint8_t* block = codes + b * n_pairs * 32;
        __m256i acc_e = _mm256_setzero_si256(), acc_o = _mm256_setzero_si256();
        __m256i sum_e, pass_e, pass_o;
        uint32_t passing, allow = allowed ? allowed[b] : 0xFFFFFFFFu;
        ptrdiff_t j;
        if (!allow) continue;
        for (j = 0; j < n_pairs; j++) {
            const uint8_t* lut = image + (j >> 1) * 128 + (j & 1) * 32;
            const __m256i c = _mm256_loadu_si256((const __m256i*)(block + j * 32));
            const __m256i lo = _mm256_and_si256(c, low4);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(c, 4), low4);
            const __m256i r_lo = _mm256_shuffle_epi8(
                _mm256_loadu_si256((const __m256i*)lut), lo);
            const __m256i r_hi = _mm256_shuffle_epi8(
                _mm256_loadu_si256((const __m256i*)(lut + 64)), hi);
            acc_e = _mm256_add_epi16(acc_e, _mm256_add_epi16(r_lo, r_hi));
            acc_o = _mm256_add_epi16(acc_o,
                                     _mm256_add_epi16(_mm256_srli_epi16(r_lo, 8),
                                                      _mm256_srli_epi16(r_hi, 8)));
        }
        sum_e = _mm256_sub_epi16(acc_e, _mm256_slli_epi16(acc_o, 8));
        /* x <= thr (unsigned) as min(x, thr) == x; packing the two word masks
         * to bytes interleaves their 64-bit quarters, which one permute puts
         * back in vector order. */
        pass_e = _mm256_cmpeq_epi16(_mm256_min_epu16(sum_e, thr), sum_e);
        pass_o = _mm256_cmpeq_epi16(_mm256_min_epu16(acc_o, thr), acc_o);
        passing = (uint32_t)_mm256_movemask_epi8(_mm256_permute4x64_epi64(
            _mm256_packs_epi16(pass_e, pass_o), 0xD8)) & allow;
        if (passing) {
            _mm256_storeu_si256((__m256i*)sums, sum_e);
            _mm256_storeu_si256((__m256i*)(sums + 16), acc_o);
            *mask = passing;
            return b;
        }
    }
    return end;
}

/* Two pairs (64 bytes of codes, four sub-quantizers) per step; an odd last
 * pair takes one AVX2-width step. The two 256-bit halves of the accumulators
 * hold partial sums of the same 32 vectors and are added at the end. */
__attribute__((target("avx512f,avx512bw,avx512vl")))
static inline ptrdiff_t annlearn_fs_scan_avx512(
    const uint8_t* codes, ptrdiff_t b, ptrdiff_t end, ptrdiff_t n_pairs,
    const uint8_t* image, uint16_t threshold, uint16_t* sums,
    uint32_t* mask, const uint32_t* allowed) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    const __m256i low4_256 = _mm256_set1_epi8(0x0F);
    const __m256i thr = _mm256_set1_epi16((short)threshold);
    const ptrdiff_t n_even = n_pairs & ~(ptrdiff_t)1;
    for (; b < end; b++) {
        const uint8_t* block = codes + b * n_pairs * 32;
        __m512i acc_e = _mm512_setzero_si512(), acc_o = _mm512_setzero_si512();
        __m256i e, o, sum_e;
        uint32_t passing, allow = allowed ? allowed[b] : 0xFFFFFFFFu;
        ptrdiff_t j;
        if (!allow) continue;
        for (j = 0; j < n_even; j += 2) {
            const uint8_t* lut = image + (j >> 1) * 128;
            const __m512i c = _mm512_loadu_si512((const void*)(block + j * 32));
            const __m512i lo = _mm512_and_si512(c, low4);
            const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(c, 4), low4);
            const __m512i r_lo =
                _mm512_shuffle_epi8(_mm512_loadu_si512((const void*)lut), lo);
            const __m512i r_hi =
                _mm512_shuffle_epi8(_mm512_loadu_si512((const void*)(lut + 64)), hi);
            acc_e = _mm512_add_epi16(acc_e, _mm512_add_epi16(r_lo, r_hi));
            acc_o = _mm512_add_epi16(acc_o,
                                     _mm512_add_epi16(_mm512_srli_epi16(r_lo, 8),
                                                      _mm512_srli_epi16(r_hi, 8)));
        }
        e = _mm256_add_epi16(_mm512_castsi512_si256(acc_e),
                             _mm512_extracti64x4_epi64(acc_e, 1));
        o = _mm256_add_epi16(_mm512_castsi512_si256(acc_o),
                             _mm512_extracti64x4_epi64(acc_o, 1));
        if (n_pairs & 1) {
            const uint8_t* lut = image + (n_even >> 1) * 128;
            const __m256i c =
                _mm256_loadu_si256((const __m256i*)(block + n_even * 32));
            const __m256i r_lo = _mm256_shuffle_epi8(
                _mm256_loadu_si256((const __m256i*)lut), _mm256_and_si256(c, low4_256));
            const __m256i r_hi = _mm256_shuffle_epi8(
                _mm256_loadu_si256((const __m256i*)(lut + 64)),
                _mm256_and_si256(_mm256_srli_epi16(c, 4), low4_256));
            e = _mm256_add_epi16(e, _mm256_add_epi16(r_lo, r_hi));
            o = _mm256_add_epi16(o, _mm256_add_epi16(_mm256_srli_epi16(r_lo, 8),
                                                     _mm256_srli_epi16(r_hi, 8)));
        }
        sum_e = _mm256_sub_epi16(e, _mm256_slli_epi16(o, 8));
        passing = (uint32_t)_mm256_cmple_epu16_mask(sum_e, thr) |
                  ((uint32_t)_mm256_cmple_epu16_mask(o, thr) << 16);
        passing &= allow;
        if (passing) {
            _mm256_storeu_si256((__m256i*)sums, sum_e);
            _mm256_storeu_si256((__m256i*)(sums + 16), o);
            *mask = passing;
            return b;
        }
    }
    return end;
}

/* The widest kernel this CPU runs: annlearn_isa() (which ANNLEARN_ISA=avx2 or
 * =none lowers), except that AVX-512 also needs the BW and VL extensions. */
static inline int annlearn_fs_best_isa(void) {
    static int cached = -1;
    if (cached < 0) {
        int isa = annlearn_isa();
        if (isa == ANNLEARN_ISA_AVX512 && !(__builtin_cpu_supports("avx512bw") &&
                                            __builtin_cpu_supports("avx512vl")))
            isa = ANNLEARN_ISA_AVX2;
        cached = isa;
    }
    return cached;
}

#else

static inline int annlearn_fs_best_isa(void) { return ANNLEARN_ISA_NONE; }

#endif

/* Scan with the kernel of `isa` (at most annlearn_fs_best_isa()). */
static inline ptrdiff_t annlearn_fs_scan(int isa, const uint8_t* codes,
                                         ptrdiff_t b, ptrdiff_t end,
                                         ptrdiff_t n_pairs, const uint8_t* image,
                                         uint16_t threshold, uint16_t* sums,
                                         uint32_t* mask,
                                         const uint32_t* allowed) {
#if ANNLEARN_HAVE_X86_DISPATCH
    if (isa == ANNLEARN_ISA_AVX512)
        return annlearn_fs_scan_avx512(codes, b, end, n_pairs, image, threshold,
                                       sums, mask, allowed);
    if (isa == ANNLEARN_ISA_AVX2)
        return annlearn_fs_scan_avx2(codes, b, end, n_pairs, image, threshold,
                                     sums, mask, allowed);
#endif
    (void)isa;
    return annlearn_fs_scan_portable(codes, b, end, n_pairs, image, threshold,
                                     sums, mask, allowed);
}

#endif
