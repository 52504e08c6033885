/*
 * Small vector kernels of the IVF-PQ search, with AVX-512 and AVX2+FMA
 * versions selected at run time by annlearn_isa() (see _packed_gemm.h for why
 * annlearn dispatches itself rather than compiling with -march=native).
 *
 * annlearn_l2sqr / annlearn_inner_product
 *     ||x - y||^2 and <x, y> of two float32 vectors: the exact re-ranking.
 *     The portable versions keep 8 independent partial sums so that the
 *     compiler can vectorise them without -ffast-math.
 *
 * annlearn_l2sqr_f64 / annlearn_inner_product_f64
 *     The same in float64 (each float32 widened, products and sums in
 *     double): the exact distances of the flat search's results. Eight
 *     partial sums (lanes) on every path; the order of the final additions
 *     differs between paths, which moves the double by an ulp or so, far
 *     below the float32 it is rounded to.
 *
 * annlearn_pq_tables
 *     The per-query lookup tables of ADC (term 3 in _ivf.pyx):
 *         table[m * ksub + j] = alpha * <x_m, codebook_m[j]>
 *     from the codebooks stored transposed, (M, dsub, ksub): the inner loop
 *     runs over the ksub codewords, contiguous, as an axpy (no horizontal
 *     reduction), which vectorises at any width.
 */
#ifndef ANNLEARN_SIMD_H
#define ANNLEARN_SIMD_H

#include <math.h>
#include <stddef.h>

#include "_packed_gemm.h"

static inline float annlearn_l2sqr_portable(const float* x, const float* y,
                                            ptrdiff_t d) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    ptrdiff_t i, j, d8 = d / 8 * 8;
    float total = 0.0f;
    for (i = 0; i < d8; i += 8)
        for (j = 0; j < 8; j++) {
            float diff = x[i + j] - y[i + j];
            acc[j] += diff * diff;
        }
    for (i = d8; i < d; i++) {
        float diff = x[i] - y[i];
        total += diff * diff;
    }
    for (j = 0; j < 8; j++) total += acc[j];
    return total;
}

static inline float annlearn_inner_product_portable(const float* x,
                                                    const float* y,
                                                    ptrdiff_t d) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    ptrdiff_t i, j, d8 = d / 8 * 8;
    float total = 0.0f;
    for (i = 0; i < d8; i += 8)
        for (j = 0; j < 8; j++) acc[j] += x[i + j] * y[i + j];
    for (i = d8; i < d; i++) total += x[i] * y[i];
    for (j = 0; j < 8; j++) total += acc[j];
    return total;
}

static inline double annlearn_l2sqr_f64_portable(const float* x, const float* y,
                                                 ptrdiff_t d) {
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}, total = 0.0;
    ptrdiff_t i, j, d8 = d / 8 * 8;
    for (i = 0; i < d8; i += 8)
        for (j = 0; j < 8; j++) {
            double diff = (double)x[i + j] - (double)y[i + j];
            acc[j] += diff * diff;
        }
    for (i = d8; i < d; i++) {
        double diff = (double)x[i] - (double)y[i];
        total += diff * diff;
    }
    for (j = 0; j < 8; j++) total += acc[j];
    return total;
}

static inline double annlearn_inner_product_f64_portable(const float* x,
                                                        const float* y,
                                                        ptrdiff_t d) {
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}, total = 0.0;
    ptrdiff_t i, j, d8 = d / 8 * 8;
    for (i = 0; i < d8; i += 8)
        for (j = 0; j < 8; j++) acc[j] += (double)x[i + j] * (double)y[i + j];
    for (i = d8; i < d; i++) total += (double)x[i] * (double)y[i];
    for (j = 0; j < 8; j++) total += acc[j];
    return total;
}

static inline void annlearn_pq_tables_portable(
    const float* x, const float* codebooks_t, ptrdiff_t M, ptrdiff_t dsub,
    ptrdiff_t ksub, float alpha, float* table) {
    ptrdiff_t m, f, j;
    for (m = 0; m < M; m++) {
        float* out = table + m * ksub;
        const float* cb = codebooks_t + m * dsub * ksub;
        for (j = 0; j < ksub; j++) out[j] = 0.0f;
        for (f = 0; f < dsub; f++) {
            const float xf = alpha * x[m * dsub + f];
            const float* row = cb + f * ksub;
            for (j = 0; j < ksub; j++) out[j] += xf * row[j];
        }
    }
}

static inline void annlearn_add_portable(const float* x, const float* y,
                                         ptrdiff_t n, float* out) {
    ptrdiff_t i;
    for (i = 0; i < n; i++) out[i] = x[i] + y[i];
}

#if ANNLEARN_HAVE_X86_DISPATCH

__attribute__((target("avx512f")))
static inline void annlearn_add_avx512(const float* x, const float* y,
                                       ptrdiff_t n, float* out) {
    ptrdiff_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(out + i, _mm512_add_ps(_mm512_loadu_ps(x + i),
                                                _mm512_loadu_ps(y + i)));
    for (; i < n; i++) out[i] = x[i] + y[i];
}

__attribute__((target("avx2,fma")))
static inline void annlearn_add_avx2(const float* x, const float* y,
                                     ptrdiff_t n, float* out) {
    ptrdiff_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_add_ps(_mm256_loadu_ps(x + i),
                                                _mm256_loadu_ps(y + i)));
    for (; i < n; i++) out[i] = x[i] + y[i];
}

__attribute__((target("avx512f")))
static inline float annlearn_l2sqr_avx512(const float* x, const float* y,
                                          ptrdiff_t d) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    ptrdiff_t i = 0;
    for (; i + 32 <= d; i += 32) {
        __m512 d0 = _mm512_sub_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i));
        __m512 d1 = _mm512_sub_ps(_mm512_loadu_ps(x + i + 16),
                                  _mm512_loadu_ps(y + i + 16));
        a0 = _mm512_fmadd_ps(d0, d0, a0);
        a1 = _mm512_fmadd_ps(d1, d1, a1);
    }
    for (; i < d; i += 16) {
        __mmask16 mask = d - i >= 16 ? (__mmask16)0xFFFF
                                     : (__mmask16)((1u << (d - i)) - 1u);
        __m512 d0 = _mm512_sub_ps(_mm512_maskz_loadu_ps(mask, x + i),
                                  _mm512_maskz_loadu_ps(mask, y + i));
        a0 = _mm512_fmadd_ps(d0, d0, a0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

__attribute__((target("avx512f")))
static inline float annlearn_inner_product_avx512(const float* x,
                                                  const float* y, ptrdiff_t d) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    ptrdiff_t i = 0;
    for (; i + 32 <= d; i += 32) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 16),
                             _mm512_loadu_ps(y + i + 16), a1);
    }
    for (; i < d; i += 16) {
        __mmask16 mask = d - i >= 16 ? (__mmask16)0xFFFF
                                     : (__mmask16)((1u << (d - i)) - 1u);
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, x + i),
                             _mm512_maskz_loadu_ps(mask, y + i), a0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

/* Eight float32 of x and y widened to double (masked: the first n). */
#define ANNLEARN_F64_LOAD512(p, i, n)                                      \
    _mm512_cvtps_pd(_mm512_castps512_ps256(_mm512_maskz_loadu_ps(          \
        (__mmask16)((n) >= 8 ? 0xFF : ((1u << (n)) - 1u)), (p) + (i))))

__attribute__((target("avx512f")))
static inline double annlearn_l2sqr_f64_avx512(const float* x, const float* y,
                                               ptrdiff_t d) {
    __m512d a0 = _mm512_setzero_pd(), a1 = _mm512_setzero_pd();
    ptrdiff_t i = 0;
    for (; i + 16 <= d; i += 16) {
        __m512d d0 = _mm512_sub_pd(ANNLEARN_F64_LOAD512(x, i, 8),
                                   ANNLEARN_F64_LOAD512(y, i, 8));
        __m512d d1 = _mm512_sub_pd(ANNLEARN_F64_LOAD512(x, i + 8, 8),
                                   ANNLEARN_F64_LOAD512(y, i + 8, 8));
        a0 = _mm512_fmadd_pd(d0, d0, a0);
        a1 = _mm512_fmadd_pd(d1, d1, a1);
    }
    for (; i < d; i += 8) {
        __m512d d0 = _mm512_sub_pd(ANNLEARN_F64_LOAD512(x, i, d - i),
                                   ANNLEARN_F64_LOAD512(y, i, d - i));
        a0 = _mm512_fmadd_pd(d0, d0, a0);
    }
    return _mm512_reduce_add_pd(_mm512_add_pd(a0, a1));
}

__attribute__((target("avx512f")))
static inline double annlearn_inner_product_f64_avx512(const float* x,
                                                       const float* y,
                                                       ptrdiff_t d) {
    __m512d a0 = _mm512_setzero_pd(), a1 = _mm512_setzero_pd();
    ptrdiff_t i = 0;
    for (; i + 16 <= d; i += 16) {
        a0 = _mm512_fmadd_pd(ANNLEARN_F64_LOAD512(x, i, 8),
                             ANNLEARN_F64_LOAD512(y, i, 8), a0);
        a1 = _mm512_fmadd_pd(ANNLEARN_F64_LOAD512(x, i + 8, 8),
                             ANNLEARN_F64_LOAD512(y, i + 8, 8), a1);
    }
    for (; i < d; i += 8)
        a0 = _mm512_fmadd_pd(ANNLEARN_F64_LOAD512(x, i, d - i),
                             ANNLEARN_F64_LOAD512(y, i, d - i), a0);
    return _mm512_reduce_add_pd(_mm512_add_pd(a0, a1));
}

#undef ANNLEARN_F64_LOAD512

__attribute__((target("avx512f")))
static inline void annlearn_pq_tables_avx512(
    const float* x, const float* codebooks_t, ptrdiff_t M, ptrdiff_t dsub,
    ptrdiff_t ksub, float alpha, float* table) {
    ptrdiff_t m, f, j;
    if (ksub % 16) {
        annlearn_pq_tables_portable(x, codebooks_t, M, dsub, ksub, alpha, table);
        return;
    }
    for (m = 0; m < M; m++) {
        float* out = table + m * ksub;
        const float* cb = codebooks_t + m * dsub * ksub;
        for (j = 0; j < ksub; j += 16) {
            __m512 acc = _mm512_setzero_ps();
            for (f = 0; f < dsub; f++)
                acc = _mm512_fmadd_ps(_mm512_set1_ps(x[m * dsub + f]),
                                      _mm512_loadu_ps(cb + f * ksub + j), acc);
            _mm512_storeu_ps(out + j, _mm512_mul_ps(_mm512_set1_ps(alpha), acc));
        }
    }
}

__attribute__((target("avx2,fma")))
static inline float annlearn_l2sqr_avx2(const float* x, const float* y,
                                        ptrdiff_t d) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    ptrdiff_t i = 0;
    float total;
    for (; i + 16 <= d; i += 16) {
        __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i));
        __m256 d1 = _mm256_sub_ps(_mm256_loadu_ps(x + i + 8),
                                  _mm256_loadu_ps(y + i + 8));
        a0 = _mm256_fmadd_ps(d0, d0, a0);
        a1 = _mm256_fmadd_ps(d1, d1, a1);
    }
    for (; i + 8 <= d; i += 8) {
        __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i));
        a0 = _mm256_fmadd_ps(d0, d0, a0);
    }
    total = annlearn_hsum_avx2(_mm256_add_ps(a0, a1));
    /* Explicit FMAs: left to itself the compiler vectorises part of this
     * tail with separate multiplies and adds and contracts the rest, which
     * the compact-row kernels of _compact.h could not reproduce bit for bit. */
    for (; i < d; i++) total = fmaf(x[i] - y[i], x[i] - y[i], total);
    return total;
}

__attribute__((target("avx2,fma")))
static inline float annlearn_inner_product_avx2(const float* x, const float* y,
                                                ptrdiff_t d) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    ptrdiff_t i = 0;
    float total;
    for (; i + 16 <= d; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8),
                             _mm256_loadu_ps(y + i + 8), a1);
    }
    for (; i + 8 <= d; i += 8)
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i), a0);
    total = annlearn_hsum_avx2(_mm256_add_ps(a0, a1));
    for (; i < d; i++) total = fmaf(x[i], y[i], total); /* as in l2sqr */
    return total;
}

/* Four float32 widened to double. */
#define ANNLEARN_F64_LOAD256(p, i) _mm256_cvtps_pd(_mm_loadu_ps((p) + (i)))

__attribute__((target("avx2,fma")))
static inline double annlearn_hsum_pd_avx2(__m256d a, __m256d b) {
    double lanes[4];
    _mm256_storeu_pd(lanes, _mm256_add_pd(a, b));
    return (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
}

__attribute__((target("avx2,fma")))
static inline double annlearn_l2sqr_f64_avx2(const float* x, const float* y,
                                             ptrdiff_t d) {
    __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();
    double total = 0.0;
    ptrdiff_t i = 0;
    for (; i + 8 <= d; i += 8) {
        __m256d d0 = _mm256_sub_pd(ANNLEARN_F64_LOAD256(x, i),
                                   ANNLEARN_F64_LOAD256(y, i));
        __m256d d1 = _mm256_sub_pd(ANNLEARN_F64_LOAD256(x, i + 4),
                                   ANNLEARN_F64_LOAD256(y, i + 4));
        a0 = _mm256_fmadd_pd(d0, d0, a0);
        a1 = _mm256_fmadd_pd(d1, d1, a1);
    }
    for (; i < d; i++) {
        double diff = (double)x[i] - (double)y[i];
        total += diff * diff;
    }
    return annlearn_hsum_pd_avx2(a0, a1) + total;
}

__attribute__((target("avx2,fma")))
static inline double annlearn_inner_product_f64_avx2(const float* x,
                                                     const float* y,
                                                     ptrdiff_t d) {
    __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();
    double total = 0.0;
    ptrdiff_t i = 0;
    for (; i + 8 <= d; i += 8) {
        a0 = _mm256_fmadd_pd(ANNLEARN_F64_LOAD256(x, i), ANNLEARN_F64_LOAD256(y, i),
                             a0);
        a1 = _mm256_fmadd_pd(ANNLEARN_F64_LOAD256(x, i + 4),
                             ANNLEARN_F64_LOAD256(y, i + 4), a1);
    }
    for (; i < d; i++) total += (double)x[i] * (double)y[i];
    return annlearn_hsum_pd_avx2(a0, a1) + total;
}

#undef ANNLEARN_F64_LOAD256

__attribute__((target("avx2,fma")))
static inline void annlearn_pq_tables_avx2(
    const float* x, const float* codebooks_t, ptrdiff_t M, ptrdiff_t dsub,
    ptrdiff_t ksub, float alpha, float* table) {
    ptrdiff_t m, f, j;
    if (ksub % 32) {
        annlearn_pq_tables_portable(x, codebooks_t, M, dsub, ksub, alpha, table);
        return;
    }
    for (m = 0; m < M; m++) {
        float* out = table + m * ksub;
        const float* cb = codebooks_t + m * dsub * ksub;
        /* Four accumulators (32 codewords) per pass over the sub-vector: four
         * independent FMA chains, one broadcast for four loads. */
        for (j = 0; j < ksub; j += 32) {
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
            const __m256 va = _mm256_set1_ps(alpha);
            for (f = 0; f < dsub; f++) {
                const __m256 xf = _mm256_set1_ps(x[m * dsub + f]);
                const float* row = cb + f * ksub + j;
                a0 = _mm256_fmadd_ps(xf, _mm256_loadu_ps(row), a0);
                a1 = _mm256_fmadd_ps(xf, _mm256_loadu_ps(row + 8), a1);
                a2 = _mm256_fmadd_ps(xf, _mm256_loadu_ps(row + 16), a2);
                a3 = _mm256_fmadd_ps(xf, _mm256_loadu_ps(row + 24), a3);
            }
            _mm256_storeu_ps(out + j, _mm256_mul_ps(va, a0));
            _mm256_storeu_ps(out + j + 8, _mm256_mul_ps(va, a1));
            _mm256_storeu_ps(out + j + 16, _mm256_mul_ps(va, a2));
            _mm256_storeu_ps(out + j + 24, _mm256_mul_ps(va, a3));
        }
    }
}

#define ANNLEARN_DISPATCH(name, args)                                  \
    (annlearn_isa() == ANNLEARN_ISA_AVX512 ? name##_avx512 args        \
     : annlearn_isa() == ANNLEARN_ISA_AVX2 ? name##_avx2 args          \
                                           : name##_portable args)

#else

#define ANNLEARN_DISPATCH(name, args) (name##_portable args)

#endif

static inline float annlearn_l2sqr(const float* x, const float* y, ptrdiff_t d) {
    return ANNLEARN_DISPATCH(annlearn_l2sqr, (x, y, d));
}

static inline float annlearn_inner_product(const float* x, const float* y,
                                           ptrdiff_t d) {
    return ANNLEARN_DISPATCH(annlearn_inner_product, (x, y, d));
}

static inline double annlearn_l2sqr_f64(const float* x, const float* y,
                                         ptrdiff_t d) {
    return ANNLEARN_DISPATCH(annlearn_l2sqr_f64, (x, y, d));
}

static inline double annlearn_inner_product_f64(const float* x, const float* y,
                                                ptrdiff_t d) {
    return ANNLEARN_DISPATCH(annlearn_inner_product_f64, (x, y, d));
}

/* out[i] = x[i] + y[i] (out may be x): term 2 into the lookup table. */
static inline void annlearn_add(const float* x, const float* y, ptrdiff_t n,
                                float* out) {
    ANNLEARN_DISPATCH(annlearn_add, (x, y, n, out));
}

static inline void annlearn_pq_tables(const float* x, const float* codebooks_t,
                                      ptrdiff_t M, ptrdiff_t dsub,
                                      ptrdiff_t ksub, float alpha,
                                      float* table) {
    ANNLEARN_DISPATCH(annlearn_pq_tables,
                      (x, codebooks_t, M, dsub, ksub, alpha, table));
}

#endif
