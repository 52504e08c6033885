/*
 * Packed single-precision GEMM for C = alpha * A . B^T (A: m x k, B: n x k,
 * both row-major), with an AVX-512 or an AVX2+FMA micro-kernel selected at
 * run time (annlearn_gemm_isa()).
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
 * AVX-512: with MR = 12 and NR = 32 the tile is 24 zmm accumulators (of 32
 * registers), so each step issues 24 independent FMAs against 2 vector loads
 * and 12 broadcasts: enough independent chains to hide the FMA latency on both
 * FMA pipes. AVX2 (16 ymm registers): MR = 6 and NR = 16, 12 accumulators,
 * 2 loads and 6 broadcasts per step, the classic Haswell shape. Packing costs one pass over each block and is amortised over the
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
#include <stdlib.h>
#include <string.h>

/* Tile shapes per instruction set (annlearn_gemm_isa()). */
#define ANNLEARN_GEMM_MR 12 /* AVX-512 */
#define ANNLEARN_GEMM_NR 32
#define ANNLEARN_GEMM_MR_AVX2 6
#define ANNLEARN_GEMM_NR_AVX2 16

#define ANNLEARN_ISA_NONE 0
#define ANNLEARN_ISA_AVX2 1
#define ANNLEARN_ISA_AVX512 2

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

/* The AVX-512 loop nest (tuned with 1 MiB of L2 per core): panel-major, one
 * B panel (NR x k) is reused by every group of A while it is hot in L2. */
__attribute__((target("avx512f")))
static inline void annlearn_packed_gemm_abt_avx512(
    ptrdiff_t m, ptrdiff_t n, ptrdiff_t k, float alpha,
    const float* Ap, const float* Bp, const float* bias, float* C,
    ptrdiff_t ldc)
{
    const ptrdiff_t MR = ANNLEARN_GEMM_MR, NR = ANNLEARN_GEMM_NR;
    ptrdiff_t g, q;
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

/* Pack like annlearn_pack_rows for width == NR, gathering each k-slice of
 * 16 rows with one instruction instead of a scalar transpose: packing the
 * database block is on the search's hot path. */
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

/* ---- AVX2 + FMA: 6 x 16 tiles ------------------------------------------ */

/* One 6 x 16 tile over a k-block of kc steps (Ap and Bp point at the block's
 * first step). The tile accumulates across k-blocks in C itself: the first
 * block starts from zero, later ones from C; the last one writes
 * alpha * sum + bias, earlier ones the raw sum. */
__attribute__((target("avx2,fma")))
static inline void annlearn_kernel_6x16_avx2(
    const float* Ap, const float* Bp, ptrdiff_t kc, float alpha,
    const float* bias, float* C, ptrdiff_t ldc, ptrdiff_t m_valid,
    ptrdiff_t n_valid, int first, int last)
{
    const ptrdiff_t MR = ANNLEARN_GEMM_MR_AVX2, NR = ANNLEARN_GEMM_NR_AVX2;
    __m256 acc[ANNLEARN_GEMM_MR_AVX2][2];
    __m256 c00, c01, c10, c11, c20, c21, c30, c31, c40, c41, c50, c51;
    float tail[ANNLEARN_GEMM_NR_AVX2];
    ptrdiff_t i, j, p;
    for (i = 0; i < MR; i++) {
        if (first || i >= m_valid) {
            acc[i][0] = _mm256_setzero_ps();
            acc[i][1] = _mm256_setzero_ps();
        } else if (n_valid >= NR) {
            acc[i][0] = _mm256_loadu_ps(C + i * ldc);
            acc[i][1] = _mm256_loadu_ps(C + i * ldc + 8);
        } else {
            for (j = 0; j < NR; j++) tail[j] = j < n_valid ? C[i * ldc + j] : 0.0f;
            acc[i][0] = _mm256_loadu_ps(tail);
            acc[i][1] = _mm256_loadu_ps(tail + 8);
        }
    }
    c00 = acc[0][0]; c01 = acc[0][1]; c10 = acc[1][0]; c11 = acc[1][1];
    c20 = acc[2][0]; c21 = acc[2][1]; c30 = acc[3][0]; c31 = acc[3][1];
    c40 = acc[4][0]; c41 = acc[4][1]; c50 = acc[5][0]; c51 = acc[5][1];
    for (p = 0; p < kc; p++) {
        const __m256 y0 = _mm256_loadu_ps(Bp);
        const __m256 y1 = _mm256_loadu_ps(Bp + 8);
        __m256 x;
#define ANNLEARN_STEP(i, r0, r1)                  \
        x = _mm256_broadcast_ss(Ap + i);          \
        r0 = _mm256_fmadd_ps(x, y0, r0);          \
        r1 = _mm256_fmadd_ps(x, y1, r1);
        ANNLEARN_STEP(0, c00, c01)
        ANNLEARN_STEP(1, c10, c11)
        ANNLEARN_STEP(2, c20, c21)
        ANNLEARN_STEP(3, c30, c31)
        ANNLEARN_STEP(4, c40, c41)
        ANNLEARN_STEP(5, c50, c51)
#undef ANNLEARN_STEP
        Ap += MR;
        Bp += NR;
    }
    acc[0][0] = c00; acc[0][1] = c01; acc[1][0] = c10; acc[1][1] = c11;
    acc[2][0] = c20; acc[2][1] = c21; acc[3][0] = c30; acc[3][1] = c31;
    acc[4][0] = c40; acc[4][1] = c41; acc[5][0] = c50; acc[5][1] = c51;
    {
        __m256 va = _mm256_set1_ps(1.0f);
        __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
        if (last) {
            /* Epilogue as in the AVX-512 kernel: C = alpha * A.B^T + bias. */
            va = _mm256_set1_ps(alpha);
            if (bias != NULL) {
                for (j = 0; j < NR; j++) tail[j] = j < n_valid ? bias[j] : 0.0f;
                b0 = _mm256_loadu_ps(tail);
                b1 = _mm256_loadu_ps(tail + 8);
            }
        }
        for (i = 0; i < m_valid; i++) {
            float* row = C + i * ldc;
            const __m256 r0 = _mm256_fmadd_ps(va, acc[i][0], b0);
            const __m256 r1 = _mm256_fmadd_ps(va, acc[i][1], b1);
            if (n_valid >= NR) {
                _mm256_storeu_ps(row, r0);
                _mm256_storeu_ps(row + 8, r1);
            } else {
                _mm256_storeu_ps(tail, r0);
                _mm256_storeu_ps(tail + 8, r1);
                for (j = 0; j < n_valid; j++) row[j] = tail[j];
            }
        }
    }
}

/* The AVX2 loop nest, blocked like GotoBLAS for caches of a few hundred KiB
 * of L2 per core: k in blocks of at most ANNLEARN_GEMM_KC_AVX2 steps, so that
 * a B micro-panel (NR x kc, 16 KiB) stays in L1 while it meets every A group
 * of an A block of ANNLEARN_GEMM_MC_AVX2 rows (MC x kc, ~150 KiB, in L2). The
 * packed layouts are those of the unblocked kernels: a k-block of a group or
 * a panel is a contiguous slice of it. */
#define ANNLEARN_GEMM_KC_AVX2 512
#define ANNLEARN_GEMM_MC_AVX2 144

__attribute__((target("avx2,fma")))
static inline void annlearn_packed_gemm_abt_avx2(
    ptrdiff_t m, ptrdiff_t n, ptrdiff_t k, float alpha,
    const float* Ap, const float* Bp, const float* bias, float* C,
    ptrdiff_t ldc)
{
    const ptrdiff_t MR = ANNLEARN_GEMM_MR_AVX2, NR = ANNLEARN_GEMM_NR_AVX2;
    /* Equal k-blocks (784 = 4 x 196 rather than 3 x 256 + 16). */
    const ptrdiff_t n_kb = (k + ANNLEARN_GEMM_KC_AVX2 - 1) / ANNLEARN_GEMM_KC_AVX2;
    const ptrdiff_t kc = n_kb ? (k + n_kb - 1) / n_kb : 0;
    ptrdiff_t p0, m0, g, q;
    if (k == 0) return;
    for (p0 = 0; p0 < k; p0 += kc) {
        const ptrdiff_t kb = k - p0 < kc ? k - p0 : kc;
        const int first = p0 == 0, last = p0 + kb >= k;
        for (m0 = 0; m0 < m; m0 += ANNLEARN_GEMM_MC_AVX2) {
            const ptrdiff_t m1 = m - m0 < ANNLEARN_GEMM_MC_AVX2
                                     ? m : m0 + ANNLEARN_GEMM_MC_AVX2;
            for (q = 0; q * NR < n; q++) {
                const ptrdiff_t n_valid = n - q * NR < NR ? n - q * NR : NR;
                const float* b = Bp + q * NR * k + p0 * NR;
                const float* bq = bias == NULL ? NULL : bias + q * NR;
                for (g = m0 / MR; g * MR < m1; g++) {
                    const ptrdiff_t m_valid = m - g * MR < MR ? m - g * MR : MR;
                    annlearn_kernel_6x16_avx2(
                        Ap + g * MR * k + p0 * MR, b, kb, alpha, bq,
                        C + g * MR * ldc + q * NR, ldc, m_valid, n_valid,
                        first, last);
                }
            }
        }
    }
}

/* annlearn_pack_rows for width == NR_AVX2, by 8-lane gathers. */
__attribute__((target("avx2,fma")))
static inline void annlearn_pack_panels_avx2(const float* X, ptrdiff_t ldx,
                                             ptrdiff_t rows, ptrdiff_t k,
                                             float* out) {
    const ptrdiff_t NR = ANNLEARN_GEMM_NR_AVX2;
    ptrdiff_t full = rows / NR * NR, b, p;
    const __m256i lane = _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0);
    const __m256i idx0 = _mm256_mullo_epi32(lane, _mm256_set1_epi32((int)ldx));
    const __m256i idx1 = _mm256_add_epi32(idx0, _mm256_set1_epi32((int)(8 * ldx)));
    for (b = 0; b < full; b += NR) {
        const float* src = X + b * ldx;
        float* block = out + b * k;
        for (p = 0; p < k; p++) {
            _mm256_storeu_ps(block + p * NR, _mm256_i32gather_ps(src + p, idx0, 4));
            _mm256_storeu_ps(block + p * NR + 8,
                             _mm256_i32gather_ps(src + p, idx1, 4));
        }
    }
    if (full < rows)
        annlearn_pack_rows(X + full * ldx, ldx, rows - full, k, NR, out + full * k);
}

__attribute__((target("avx2,fma")))
static inline float annlearn_hsum_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* annlearn_dot_rows_avx512 at 8 lanes. */
__attribute__((target("avx2,fma")))
static inline void annlearn_dot_rows_avx2(
    ptrdiff_t m, ptrdiff_t n, ptrdiff_t k, float alpha,
    const float* X, ptrdiff_t ldx, const float* Y, ptrdiff_t ldy,
    float* C, ptrdiff_t ldc)
{
    ptrdiff_t i, j, r, p;
    const ptrdiff_t k8 = k / 8 * 8;
    for (j = 0; j < n; j += 4) {
        ptrdiff_t rows = n - j < 4 ? n - j : 4;
        const float* y[4];
        for (r = 0; r < 4; r++) y[r] = Y + (j + (r < rows ? r : 0)) * ldy;
        for (i = 0; i < m; i++) {
            const float* x = X + i * ldx;
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
            float out[4];
            for (p = 0; p < k8; p += 8) {
                const __m256 xv = _mm256_loadu_ps(x + p);
                a0 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(y[0] + p), a0);
                a1 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(y[1] + p), a1);
                a2 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(y[2] + p), a2);
                a3 = _mm256_fmadd_ps(xv, _mm256_loadu_ps(y[3] + p), a3);
            }
            out[0] = annlearn_hsum_avx2(a0);
            out[1] = annlearn_hsum_avx2(a1);
            out[2] = annlearn_hsum_avx2(a2);
            out[3] = annlearn_hsum_avx2(a3);
            for (p = k8; p < k; p++)
                for (r = 0; r < 4; r++) out[r] += x[p] * y[r][p];
            for (r = 0; r < rows; r++) C[i * ldc + j + r] = alpha * out[r];
        }
    }
}

/* The widest instruction set the kernels may use: AVX-512F, else AVX2 with
 * FMA, else none (BLAS and portable C only). ANNLEARN_ISA=avx2 or =none in
 * the environment lowers it (tests and comparisons); it is read once. */
static inline int annlearn_isa(void) {
    static int cached = -1;
    if (cached < 0) {
        int isa = ANNLEARN_ISA_NONE;
        const char* env = getenv("ANNLEARN_ISA");
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx512f"))
            isa = ANNLEARN_ISA_AVX512;
        else if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
            isa = ANNLEARN_ISA_AVX2;
        if (env != NULL && strcmp(env, "avx2") == 0 && isa > ANNLEARN_ISA_AVX2)
            isa = ANNLEARN_ISA_AVX2;
        else if (env != NULL && strcmp(env, "none") == 0)
            isa = ANNLEARN_ISA_NONE;
        cached = isa;
    }
    return cached;
}


#else

static inline int annlearn_isa(void) { return ANNLEARN_ISA_NONE; }

#endif

/* Whether the packed GEMM can run here (an AVX2 or AVX-512 kernel). */
static inline int annlearn_packed_gemm_available(void) {
    return annlearn_isa() != ANNLEARN_ISA_NONE;
}

/* Rows per group of the packed A and per panel of the packed B. */
static inline ptrdiff_t annlearn_gemm_mr(void) {
    return annlearn_isa() == ANNLEARN_ISA_AVX512 ? ANNLEARN_GEMM_MR
                                                 : ANNLEARN_GEMM_MR_AVX2;
}

static inline ptrdiff_t annlearn_gemm_nr(void) {
    return annlearn_isa() == ANNLEARN_ISA_AVX512 ? ANNLEARN_GEMM_NR
                                                 : ANNLEARN_GEMM_NR_AVX2;
}

/* Pack B rows into panels of annlearn_gemm_nr() rows. */
static inline void annlearn_pack_panels(const float* X, ptrdiff_t ldx,
                                        ptrdiff_t rows, ptrdiff_t k,
                                        float* out) {
#if ANNLEARN_HAVE_X86_DISPATCH
    if (annlearn_isa() == ANNLEARN_ISA_AVX512) {
        annlearn_pack_panels_avx512(X, ldx, rows, k, out);
        return;
    }
    if (annlearn_isa() == ANNLEARN_ISA_AVX2) {
        annlearn_pack_panels_avx2(X, ldx, rows, k, out);
        return;
    }
#endif
    annlearn_pack_rows(X, ldx, rows, k, annlearn_gemm_nr(), out);
}

/* C[:m, :n] = alpha * A . B^T (+ bias[j] on column j when bias is not NULL)
 * from packed operands (see annlearn_pack_rows): Ap holds round_up(m, MR)
 * rows in groups of MR, Bp round_up(n, NR) rows in panels of NR, with MR and
 * NR from annlearn_gemm_mr()/annlearn_gemm_nr(). Requires
 * annlearn_packed_gemm_available(). */
static inline void annlearn_packed_gemm_abt(
    ptrdiff_t m, ptrdiff_t n, ptrdiff_t k, float alpha,
    const float* Ap, const float* Bp, const float* bias, float* C,
    ptrdiff_t ldc)
{
#if ANNLEARN_HAVE_X86_DISPATCH
    if (annlearn_isa() == ANNLEARN_ISA_AVX512)
        annlearn_packed_gemm_abt_avx512(m, n, k, alpha, Ap, Bp, bias, C, ldc);
    else if (annlearn_isa() == ANNLEARN_ISA_AVX2)
        annlearn_packed_gemm_abt_avx2(m, n, k, alpha, Ap, Bp, bias, C, ldc);
#endif
}

/* C[i * ldc + j] = alpha * <X[i], Y[j]> without packing, for a few queries.
 * Requires annlearn_packed_gemm_available(). */
static inline void annlearn_dot_rows(
    ptrdiff_t m, ptrdiff_t n, ptrdiff_t k, float alpha,
    const float* X, ptrdiff_t ldx, const float* Y, ptrdiff_t ldy,
    float* C, ptrdiff_t ldc)
{
#if ANNLEARN_HAVE_X86_DISPATCH
    if (annlearn_isa() == ANNLEARN_ISA_AVX512)
        annlearn_dot_rows_avx512(m, n, k, alpha, X, ldx, Y, ldy, C, ldc);
    else if (annlearn_isa() == ANNLEARN_ISA_AVX2)
        annlearn_dot_rows_avx2(m, n, k, alpha, X, ldx, Y, ldy, C, ldc);
#endif
}

#endif
