/*
 * Packed single-precision GEMM for C = alpha * A . B^T (A: m x k, B: n x k,
 * both row-major), with an AVX-512 micro-kernel selected at run time.
 *
 * Why annlearn has its own: BLAS is chosen by whoever built SciPy and can be
 * told at run time to use a kernel narrower than the CPU supports (OpenBLAS
 * honours OPENBLAS_CORETYPE, so an AVX-512 machine may run its AVX2 kernel at
 * half speed). The distance kernels only need this one GEMM shape, k-contiguous
 * rows on both sides, so a compact packed kernel compiled for AVX-512 and
 * dispatched on the CPU's actual features gives them the full width.
 *
 * Layout (the classic Goto/BLIS scheme, restricted to what we need):
 *
 *   A (queries)  --pack-->  groups of MR rows, k-major:  Ap[g][p][0..MR)
 *   B (database) --pack-->  panels of NR rows, k-major:  Bp[q][p][0..NR)
 *
 *   micro-kernel (MR x NR tile of C):
 *     for p in 0..k:   y0, y1 = Bp[q][p][0..16), Bp[q][p][16..32)
 *                      for i in 0..MR: c[i][*] += broadcast(Ap[g][p][i]) * y*
 *
 * With MR = 12 and NR = 32 the tile is 24 zmm accumulators (of 32 registers),
 * so each step issues 24 independent FMAs against 2 vector loads and 12
 * broadcasts: enough independent chains to hide the FMA latency on both FMA
 * pipes. Packing costs one pass over each block and is amortised over the
 * other side of the block (hundreds of rows). Padding rows are zero and their
 * results are never stored.
 *
 * Everything here is plain C called without the GIL. The AVX-512 code is
 * compiled through the target attribute, so the rest of the extension keeps
 * the portable baseline flags (no -march=native) and still runs anywhere.
 */
#ifndef ANNLEARN_PACKED_GEMM_H
#define ANNLEARN_PACKED_GEMM_H

#include <stddef.h>
#include <string.h>

#define ANNLEARN_GEMM_MR 12
#define ANNLEARN_GEMM_NR 32

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define ANNLEARN_HAVE_X86_DISPATCH 1
#include <immintrin.h>
#else
#define ANNLEARN_HAVE_X86_DISPATCH 0
#endif

static inline ptrdiff_t annlearn_round_up(ptrdiff_t n, ptrdiff_t m) {
    return (n + m - 1) / m * m;
}

/* Floats needed to pack `rows` rows of `k` features in blocks of `width`. */
static inline ptrdiff_t annlearn_packed_size(ptrdiff_t rows, ptrdiff_t k,
                                             ptrdiff_t width) {
    return annlearn_round_up(rows, width) * k;
}

/* Pack rows [0, rows) of X (row stride ldx) into blocks of `width` rows,
 * k-major: out[b * width * k + p * width + r] = X[(b * width + r) * ldx + p].
 * Rows past `rows` in the last block are zero. */
static inline void annlearn_pack_rows(const float* X, ptrdiff_t ldx,
                                      ptrdiff_t rows, ptrdiff_t k,
                                      ptrdiff_t width, float* out) {
    ptrdiff_t b, r, p;
    ptrdiff_t n_blocks = (rows + width - 1) / width;
    for (b = 0; b < n_blocks; b++) {
        float* block = out + b * width * k;
        const float* src = X + b * width * ldx;
        ptrdiff_t r_end = rows - b * width < width ? rows - b * width : width;
        if (r_end == width) {
            /* Writes are sequential; the `width` rows are read as as many
             * sequential streams, which the hardware prefetchers follow. */
            for (p = 0; p < k; p++)
                for (r = 0; r < width; r++)
                    block[p * width + r] = src[r * ldx + p];
        } else {
            for (p = 0; p < k; p++) {
                for (r = 0; r < r_end; r++)
                    block[p * width + r] = src[r * ldx + p];
                for (r = r_end; r < width; r++) block[p * width + r] = 0.0f;
            }
        }
    }
}

#if ANNLEARN_HAVE_X86_DISPATCH

__attribute__((target("avx512f")))
static inline void annlearn_kernel_12x32_avx512(
    const float* Ap, const float* Bp, ptrdiff_t k, float alpha,
    const float* bias, float* C, ptrdiff_t ldc, ptrdiff_t m_valid,
    ptrdiff_t n_valid)
{
    __m512 c00 = _mm512_setzero_ps(), c01 = _mm512_setzero_ps();
    __m512 c10 = _mm512_setzero_ps(), c11 = _mm512_setzero_ps();
    __m512 c20 = _mm512_setzero_ps(), c21 = _mm512_setzero_ps();
    __m512 c30 = _mm512_setzero_ps(), c31 = _mm512_setzero_ps();
    __m512 c40 = _mm512_setzero_ps(), c41 = _mm512_setzero_ps();
    __m512 c50 = _mm512_setzero_ps(), c51 = _mm512_setzero_ps();
    __m512 c60 = _mm512_setzero_ps(), c61 = _mm512_setzero_ps();
    __m512 c70 = _mm512_setzero_ps(), c71 = _mm512_setzero_ps();
    __m512 c80 = _mm512_setzero_ps(), c81 = _mm512_setzero_ps();
    __m512 c90 = _mm512_setzero_ps(), c91 = _mm512_setzero_ps();
    __m512 ca0 = _mm512_setzero_ps(), ca1 = _mm512_setzero_ps();
    __m512 cb0 = _mm512_setzero_ps(), cb1 = _mm512_setzero_ps();
    ptrdiff_t p;
    for (p = 0; p < k; p++) {
        const __m512 y0 = _mm512_loadu_ps(Bp);
        const __m512 y1 = _mm512_loadu_ps(Bp + 16);
        __m512 x;
#define ANNLEARN_STEP(i, r0, r1)                  \
        x = _mm512_set1_ps(Ap[i]);                \
        r0 = _mm512_fmadd_ps(x, y0, r0);          \
        r1 = _mm512_fmadd_ps(x, y1, r1);
        ANNLEARN_STEP(0, c00, c01)
        ANNLEARN_STEP(1, c10, c11)
        ANNLEARN_STEP(2, c20, c21)
        ANNLEARN_STEP(3, c30, c31)
        ANNLEARN_STEP(4, c40, c41)
        ANNLEARN_STEP(5, c50, c51)
        ANNLEARN_STEP(6, c60, c61)
        ANNLEARN_STEP(7, c70, c71)
        ANNLEARN_STEP(8, c80, c81)
        ANNLEARN_STEP(9, c90, c91)
        ANNLEARN_STEP(10, ca0, ca1)
        ANNLEARN_STEP(11, cb0, cb1)
#undef ANNLEARN_STEP
        Ap += ANNLEARN_GEMM_MR;
        Bp += ANNLEARN_GEMM_NR;
    }
    {
        const __m512 va = _mm512_set1_ps(alpha);
        __m512 rows[ANNLEARN_GEMM_MR][2] = {
            {c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}, {c40, c41},
            {c50, c51}, {c60, c61}, {c70, c71}, {c80, c81}, {c90, c91},
            {ca0, ca1}, {cb0, cb1}};
        __mmask16 m0, m1;
        ptrdiff_t i;
        if (n_valid >= 32) {
            m0 = 0xFFFF; m1 = 0xFFFF;
        } else if (n_valid >= 16) {
            m0 = 0xFFFF; m1 = (__mmask16)((1u << (n_valid - 16)) - 1u);
        } else {
            m0 = (__mmask16)((1u << n_valid) - 1u); m1 = 0;
        }
        /* Epilogue: C = alpha * A.B^T + bias[column] (the database norms of
         * the L2 score), saving the search a pass over C. */
        __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
        if (bias != NULL) {
            b0 = _mm512_maskz_loadu_ps(m0, bias);
            b1 = _mm512_maskz_loadu_ps(m1, bias + 16);
        }
        for (i = 0; i < m_valid; i++) {
            float* row = C + i * ldc;
            _mm512_mask_storeu_ps(row, m0, _mm512_fmadd_ps(va, rows[i][0], b0));
            _mm512_mask_storeu_ps(row + 16, m1,
                                  _mm512_fmadd_ps(va, rows[i][1], b1));
        }
    }
}

/* Pack like annlearn_pack_rows for width == NR, gathering each k-slice of
 * 16 rows with one instruction: several times faster than the scalar
 * transpose, and packing the database block is on the search's hot path. */
__attribute__((target("avx512f")))
static inline void annlearn_pack_panels_avx512(const float* X, ptrdiff_t ldx,
                                               ptrdiff_t rows, ptrdiff_t k,
                                               float* out) {
    const ptrdiff_t NR = ANNLEARN_GEMM_NR;
    ptrdiff_t full = rows / NR * NR, b, p;
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8,
                                          7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i idx0 = _mm512_mullo_epi32(lane, _mm512_set1_epi32((int)ldx));
    const __m512i idx1 = _mm512_add_epi32(idx0, _mm512_set1_epi32((int)(16 * ldx)));
    for (b = 0; b < full; b += NR) {
        const float* src = X + b * ldx;
        float* block = out + b * k;
        for (p = 0; p < k; p++) {
            _mm512_storeu_ps(block + p * NR, _mm512_i32gather_ps(idx0, src + p, 4));
            _mm512_storeu_ps(block + p * NR + 16,
                             _mm512_i32gather_ps(idx1, src + p, 4));
        }
    }
    if (full < rows)
        annlearn_pack_rows(X + full * ldx, ldx, rows - full, k, NR, out + full * k);
}

/* C[i * ldc + j] = alpha * <X[i], Y[j]> for a few queries (i < m): no
 * packing. With few queries the work is bound by reading Y once from memory,
 * so Y is streamed four rows at a time and each group of four rows is used by
 * every query while it sits in L1. */
__attribute__((target("avx512f")))
static inline void annlearn_dot_rows_avx512(
    ptrdiff_t m, ptrdiff_t n, ptrdiff_t k, float alpha,
    const float* X, ptrdiff_t ldx, const float* Y, ptrdiff_t ldy,
    float* C, ptrdiff_t ldc)
{
    ptrdiff_t i, j, r, p;
    const ptrdiff_t k16 = k / 16 * 16;
    const __mmask16 tail = (__mmask16)((1u << (k - k16)) - 1u);
    for (j = 0; j < n; j += 4) {
        ptrdiff_t rows = n - j < 4 ? n - j : 4;
        const float* y[4];
        for (r = 0; r < 4; r++) y[r] = Y + (j + (r < rows ? r : 0)) * ldy;
        for (i = 0; i < m; i++) {
            const float* x = X + i * ldx;
            __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
            __m512 a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
            __m512 xv;
            for (p = 0; p < k16; p += 16) {
                xv = _mm512_loadu_ps(x + p);
                a0 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(y[0] + p), a0);
                a1 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(y[1] + p), a1);
                a2 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(y[2] + p), a2);
                a3 = _mm512_fmadd_ps(xv, _mm512_loadu_ps(y[3] + p), a3);
            }
            if (tail) {
                xv = _mm512_maskz_loadu_ps(tail, x + p);
                a0 = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(tail, y[0] + p), a0);
                a1 = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(tail, y[1] + p), a1);
                a2 = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(tail, y[2] + p), a2);
                a3 = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(tail, y[3] + p), a3);
            }
            {
                float out[4];
                out[0] = _mm512_reduce_add_ps(a0);
                out[1] = _mm512_reduce_add_ps(a1);
                out[2] = _mm512_reduce_add_ps(a2);
                out[3] = _mm512_reduce_add_ps(a3);
                for (r = 0; r < rows; r++) C[i * ldc + j + r] = alpha * out[r];
            }
        }
    }
}

static inline int annlearn_cpu_has_avx512f(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
}

#else

static inline void annlearn_kernel_12x32_avx512(
    const float* Ap, const float* Bp, ptrdiff_t k, float alpha,
    const float* bias, float* C, ptrdiff_t ldc, ptrdiff_t m_valid,
    ptrdiff_t n_valid)
{
    (void)Ap; (void)Bp; (void)k; (void)alpha; (void)bias; (void)C; (void)ldc;
    (void)m_valid; (void)n_valid;
}

static inline void annlearn_pack_panels_avx512(const float* X, ptrdiff_t ldx,
                                               ptrdiff_t rows, ptrdiff_t k,
                                               float* out) {
    annlearn_pack_rows(X, ldx, rows, k, ANNLEARN_GEMM_NR, out);
}

static inline void annlearn_dot_rows_avx512(
    ptrdiff_t m, ptrdiff_t n, ptrdiff_t k, float alpha,
    const float* X, ptrdiff_t ldx, const float* Y, ptrdiff_t ldy,
    float* C, ptrdiff_t ldc)
{
    (void)m; (void)n; (void)k; (void)alpha; (void)X; (void)ldx; (void)Y;
    (void)ldy; (void)C; (void)ldc;
}

static inline int annlearn_cpu_has_avx512f(void) { return 0; }

#endif

/* C[:m, :n] = alpha * A . B^T (+ bias[j] on column j when bias is not NULL)
 * from packed operands (see annlearn_pack_rows): Ap holds round_up(m, MR)
 * rows in groups of MR, Bp round_up(n, NR) rows in panels of NR. Requires
 * annlearn_cpu_has_avx512f(). */
static inline void annlearn_packed_gemm_abt(
    ptrdiff_t m, ptrdiff_t n, ptrdiff_t k, float alpha,
    const float* Ap, const float* Bp, const float* bias, float* C,
    ptrdiff_t ldc)
{
    ptrdiff_t g, q;
    const ptrdiff_t MR = ANNLEARN_GEMM_MR, NR = ANNLEARN_GEMM_NR;
    /* Panel-major: one B panel (NR x k) is reused by every group of A while
     * it is hot in L1/L2. */
    for (q = 0; q * NR < n; q++) {
        ptrdiff_t n_valid = n - q * NR < NR ? n - q * NR : NR;
        for (g = 0; g * MR < m; g++) {
            ptrdiff_t m_valid = m - g * MR < MR ? m - g * MR : MR;
            annlearn_kernel_12x32_avx512(
                Ap + g * MR * k, Bp + q * NR * k, k, alpha,
                bias == NULL ? NULL : bias + q * NR,
                C + g * MR * ldc + q * NR, ldc, m_valid, n_valid);
        }
    }
}

#endif
