/*
 * Exact distances between a float32 query and a compact stored row: the
 * re-ranking of IVF-PQ when its vectors are kept as float16 or uint8
 * (annlearn/_quantizers/_scalar.py), AVX-512 and AVX2 versions selected at
 * run time as in _simd.h, with a portable fallback.
 *
 * annlearn_l2sqr_f16 / annlearn_inner_product_f16
 *     y holds IEEE half floats (as uint16 bits), widened with F16C
 *     (vcvtph2ps) where the CPU has it.
 * annlearn_l2sqr_sq8 / annlearn_inner_product_sq8
 *     y holds uint8 codes of the per-feature scalar quantizer, the stored
 *     vector being offset + scale * code. Each code is decoded in a register
 *     (one FMA) before the usual difference: the same number of operations
 *     as moving the query into code space (q' = (q - offset) / scale with
 *     weights scale^2), and on 8-bit data (scale 1, integer offsets) the
 *     decoded values are the data themselves, so the distance is the float32
 *     one bit for bit whatever the query.
 *
 * Every kernel keeps the loop structure and the accumulation order of its
 * float32 twin in _simd.h (same accumulators, same tails), so that a row that
 * decodes exactly gives exactly the float32 distance.
 */
#ifndef ANNLEARN_COMPACT_H
#define ANNLEARN_COMPACT_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "_simd.h"

/* Ask for the cache lines of [p, p + bytes) ahead of their use: a stored row
 * re-ranked is at a random address, so without this each candidate waits for
 * its first lines (and a page walk) before the hardware prefetcher streams
 * the rest, and the rows' sizes hardly matter. */
static inline void annlearn_prefetch(const void* p, ptrdiff_t bytes) {
#if ANNLEARN_HAVE_X86_DISPATCH
    const char* c = (const char*)p;
    ptrdiff_t i;
    /* volatile: GCC 12 at -O3 deletes _mm_prefetch and __builtin_prefetch
     * loops inlined into the OpenMP region of refine. */
    for (i = 0; i < bytes; i += 64)
        __asm__ volatile("prefetcht0 %0" : : "m"(*(c + i)));
#elif defined(__GNUC__)
    const char* c = (const char*)p;
    ptrdiff_t i;
    for (i = 0; i < bytes; i += 64) __builtin_prefetch(c + i, 0, 3);
#else
    (void)p;
    (void)bytes;
#endif
}

/* IEEE half (binary16) bits -> float, exact (normals, subnormals, inf, NaN). */
static inline float annlearn_half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1Fu;
    uint32_t mantissa = h & 0x3FFu;
    uint32_t bits;
    float out;
    if (exponent == 0x1Fu) {
        bits = sign | 0x7F800000u | (mantissa << 13);
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {
        bits = sign;
    } else {
        /* Subnormal half: normalise the mantissa. */
        exponent = 113u;
        while (!(mantissa & 0x400u)) {
            mantissa <<= 1;
            exponent--;
        }
        bits = sign | (exponent << 23) | ((mantissa & 0x3FFu) << 13);
    }
    memcpy(&out, &bits, sizeof(out));
    return out;
}

static inline float annlearn_sq8_value(const uint8_t* y, const float* offset,
                                       const float* scale, ptrdiff_t i) {
    return offset[i] + scale[i] * (float)y[i];
}

/* -- portable: the loops of annlearn_l2sqr_portable, y decoded per element. */

#define ANNLEARN_COMPACT_PORTABLE(name, DECODE, PARAMS)                       \
    static inline float annlearn_l2sqr_##name##_portable PARAMS {            \
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};                             \
        ptrdiff_t i, j, d8 = d / 8 * 8;                                      \
        float total = 0.0f;                                                  \
        for (i = 0; i < d8; i += 8)                                          \
            for (j = 0; j < 8; j++) {                                        \
                float diff = x[i + j] - DECODE(i + j);                       \
                acc[j] += diff * diff;                                       \
            }                                                                \
        for (i = d8; i < d; i++) {                                           \
            float diff = x[i] - DECODE(i);                                   \
            total += diff * diff;                                            \
        }                                                                    \
        for (j = 0; j < 8; j++) total += acc[j];                             \
        return total;                                                        \
    }                                                                        \
    static inline float annlearn_inner_product_##name##_portable PARAMS {    \
        float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};                             \
        ptrdiff_t i, j, d8 = d / 8 * 8;                                      \
        float total = 0.0f;                                                  \
        for (i = 0; i < d8; i += 8)                                          \
            for (j = 0; j < 8; j++) acc[j] += x[i + j] * DECODE(i + j);      \
        for (i = d8; i < d; i++) total += x[i] * DECODE(i);                  \
        for (j = 0; j < 8; j++) total += acc[j];                             \
        return total;                                                        \
    }

#define ANNLEARN_F16_AT(i) annlearn_half_to_float(y[i])
#define ANNLEARN_SQ8_AT(i) annlearn_sq8_value(y, offset, scale, i)

ANNLEARN_COMPACT_PORTABLE(f16, ANNLEARN_F16_AT,
                          (const float* x, const uint16_t* y, ptrdiff_t d))
ANNLEARN_COMPACT_PORTABLE(sq8, ANNLEARN_SQ8_AT,
                          (const float* x, const uint8_t* y,
                           const float* offset, const float* scale,
                           ptrdiff_t d))

#if ANNLEARN_HAVE_X86_DISPATCH

/* The AVX2 kernels of float16 rows need F16C besides AVX2 and FMA (every CPU
 * with AVX2 has it in practice; checked all the same). */
static inline int annlearn_f16_isa(void) {
    static int cached = -1;
    if (cached < 0) {
        int isa = annlearn_isa();
        if (isa == ANNLEARN_ISA_AVX2 && !__builtin_cpu_supports("f16c"))
            isa = ANNLEARN_ISA_NONE;
        cached = isa;
    }
    return cached;
}

/* 16 (AVX-512) or 8 (AVX2) stored values as floats; the masked forms read
 * only the first n values and give zero for the others. */
__attribute__((target("avx512f")))
static inline __m512 annlearn_f16_load16(const uint16_t* y) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)y));
}

__attribute__((target("avx512f")))
static inline __m512 annlearn_f16_load16_mask(const uint16_t* y, ptrdiff_t n) {
    uint16_t buf[16] = {0};
    memcpy(buf, y, (size_t)n * sizeof(uint16_t));
    return annlearn_f16_load16(buf);
}

__attribute__((target("avx512f")))
static inline __m512 annlearn_sq8_load16(const uint8_t* y, const float* offset,
                                         const float* scale) {
    __m512 codes = _mm512_cvtepi32_ps(
        _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)y)));
    return _mm512_fmadd_ps(codes, _mm512_loadu_ps(scale), _mm512_loadu_ps(offset));
}

__attribute__((target("avx512f")))
static inline __m512 annlearn_sq8_load16_mask(const uint8_t* y,
                                              const float* offset,
                                              const float* scale, ptrdiff_t n) {
    uint8_t buf[16] = {0};
    __mmask16 mask = (__mmask16)((1u << n) - 1u);
    __m512 codes;
    memcpy(buf, y, (size_t)n);
    codes = _mm512_cvtepi32_ps(
        _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)buf)));
    return _mm512_maskz_fmadd_ps(mask, codes,
                                 _mm512_maskz_loadu_ps(mask, scale),
                                 _mm512_maskz_loadu_ps(mask, offset));
}

/* The AVX-512 kernels: annlearn_l2sqr_avx512 / annlearn_inner_product_avx512
 * with LOAD(i) (16 values from element i) and LOAD_TAIL(i, n) in place of
 * the loads of y. */
#define ANNLEARN_COMPACT_AVX512(name, LOAD, LOAD_TAIL, PARAMS)                \
    __attribute__((target("avx512f"))) static inline float                   \
        annlearn_l2sqr_##name##_avx512 PARAMS {                              \
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();           \
        ptrdiff_t i = 0;                                                     \
        for (; i + 32 <= d; i += 32) {                                       \
            __m512 d0 = _mm512_sub_ps(_mm512_loadu_ps(x + i), LOAD(i));      \
            __m512 d1 = _mm512_sub_ps(_mm512_loadu_ps(x + i + 16),           \
                                      LOAD(i + 16));                         \
            a0 = _mm512_fmadd_ps(d0, d0, a0);                                \
            a1 = _mm512_fmadd_ps(d1, d1, a1);                                \
        }                                                                    \
        for (; i < d; i += 16) {                                             \
            ptrdiff_t n = d - i >= 16 ? 16 : d - i;                          \
            __mmask16 mask = n == 16 ? (__mmask16)0xFFFF                     \
                                     : (__mmask16)((1u << n) - 1u);          \
            __m512 d0 = _mm512_sub_ps(_mm512_maskz_loadu_ps(mask, x + i),    \
                                      LOAD_TAIL(i, n));                      \
            a0 = _mm512_fmadd_ps(d0, d0, a0);                                \
        }                                                                    \
        return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));                  \
    }                                                                        \
    __attribute__((target("avx512f"))) static inline float                   \
        annlearn_inner_product_##name##_avx512 PARAMS {                      \
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();           \
        ptrdiff_t i = 0;                                                     \
        for (; i + 32 <= d; i += 32) {                                       \
            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i), LOAD(i), a0);       \
            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + i + 16), LOAD(i + 16),  \
                                 a1);                                        \
        }                                                                    \
        for (; i < d; i += 16) {                                             \
            ptrdiff_t n = d - i >= 16 ? 16 : d - i;                          \
            __mmask16 mask = n == 16 ? (__mmask16)0xFFFF                     \
                                     : (__mmask16)((1u << n) - 1u);          \
            a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, x + i),         \
                                 LOAD_TAIL(i, n), a0);                       \
        }                                                                    \
        return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));                  \
    }

#define ANNLEARN_F16_LOAD512(i) annlearn_f16_load16(y + (i))
#define ANNLEARN_F16_TAIL512(i, n)                                            \
    ((n) == 16 ? annlearn_f16_load16(y + (i))                                 \
               : annlearn_f16_load16_mask(y + (i), (n)))
#define ANNLEARN_SQ8_LOAD512(i) annlearn_sq8_load16(y + (i), offset + (i), scale + (i))
#define ANNLEARN_SQ8_TAIL512(i, n)                                            \
    ((n) == 16 ? ANNLEARN_SQ8_LOAD512(i)                                      \
               : annlearn_sq8_load16_mask(y + (i), offset + (i), scale + (i), (n)))

ANNLEARN_COMPACT_AVX512(f16, ANNLEARN_F16_LOAD512, ANNLEARN_F16_TAIL512,
                        (const float* x, const uint16_t* y, ptrdiff_t d))
ANNLEARN_COMPACT_AVX512(sq8, ANNLEARN_SQ8_LOAD512, ANNLEARN_SQ8_TAIL512,
                        (const float* x, const uint8_t* y, const float* offset,
                         const float* scale, ptrdiff_t d))

__attribute__((target("avx2,fma,f16c")))
static inline __m256 annlearn_f16_load8(const uint16_t* y) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)y));
}

__attribute__((target("avx2,fma")))
static inline __m256 annlearn_sq8_load8(const uint8_t* y, const float* offset,
                                        const float* scale) {
    __m256 codes = _mm256_cvtepi32_ps(
        _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)y)));
    return _mm256_fmadd_ps(codes, _mm256_loadu_ps(scale), _mm256_loadu_ps(offset));
}

/* The AVX2 kernels: annlearn_l2sqr_avx2 / annlearn_inner_product_avx2 with
 * LOAD(i) (8 values) for the loads of y and AT(i) for the scalar tail. */
#define ANNLEARN_COMPACT_AVX2(name, TARGET, LOAD, AT, PARAMS)                 \
    __attribute__((target(TARGET))) static inline float                      \
        annlearn_l2sqr_##name##_avx2 PARAMS {                                \
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();           \
        ptrdiff_t i = 0;                                                     \
        float total;                                                         \
        for (; i + 16 <= d; i += 16) {                                       \
            __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(x + i), LOAD(i));      \
            __m256 d1 = _mm256_sub_ps(_mm256_loadu_ps(x + i + 8),            \
                                      LOAD(i + 8));                          \
            a0 = _mm256_fmadd_ps(d0, d0, a0);                                \
            a1 = _mm256_fmadd_ps(d1, d1, a1);                                \
        }                                                                    \
        for (; i + 8 <= d; i += 8) {                                         \
            __m256 d0 = _mm256_sub_ps(_mm256_loadu_ps(x + i), LOAD(i));      \
            a0 = _mm256_fmadd_ps(d0, d0, a0);                                \
        }                                                                    \
        total = annlearn_hsum_avx2(_mm256_add_ps(a0, a1));                   \
        for (; i < d; i++) {                                                 \
            float diff = x[i] - AT(i);                                       \
            total = fmaf(diff, diff, total);                                 \
        }                                                                    \
        return total;                                                        \
    }                                                                        \
    __attribute__((target(TARGET))) static inline float                      \
        annlearn_inner_product_##name##_avx2 PARAMS {                        \
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();           \
        ptrdiff_t i = 0;                                                     \
        float total;                                                         \
        for (; i + 16 <= d; i += 16) {                                       \
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), LOAD(i), a0);       \
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8), LOAD(i + 8),    \
                                 a1);                                        \
        }                                                                    \
        for (; i + 8 <= d; i += 8)                                           \
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), LOAD(i), a0);       \
        total = annlearn_hsum_avx2(_mm256_add_ps(a0, a1));                   \
        for (; i < d; i++) total = fmaf(x[i], AT(i), total);                 \
        return total;                                                        \
    }

#define ANNLEARN_F16_LOAD256(i) annlearn_f16_load8(y + (i))
#define ANNLEARN_SQ8_LOAD256(i) annlearn_sq8_load8(y + (i), offset + (i), scale + (i))

ANNLEARN_COMPACT_AVX2(f16, "avx2,fma,f16c", ANNLEARN_F16_LOAD256,
                      ANNLEARN_F16_AT,
                      (const float* x, const uint16_t* y, ptrdiff_t d))
ANNLEARN_COMPACT_AVX2(sq8, "avx2,fma", ANNLEARN_SQ8_LOAD256, ANNLEARN_SQ8_AT,
                      (const float* x, const uint8_t* y, const float* offset,
                       const float* scale, ptrdiff_t d))

#define ANNLEARN_F16_DISPATCH(name, args)                                     \
    (annlearn_f16_isa() == ANNLEARN_ISA_AVX512 ? name##_avx512 args           \
     : annlearn_f16_isa() == ANNLEARN_ISA_AVX2 ? name##_avx2 args             \
                                               : name##_portable args)

#else

#define ANNLEARN_F16_DISPATCH(name, args) (name##_portable args)

#endif

static inline float annlearn_l2sqr_f16(const float* x, const uint16_t* y,
                                       ptrdiff_t d) {
    return ANNLEARN_F16_DISPATCH(annlearn_l2sqr_f16, (x, y, d));
}

static inline float annlearn_inner_product_f16(const float* x,
                                               const uint16_t* y, ptrdiff_t d) {
    return ANNLEARN_F16_DISPATCH(annlearn_inner_product_f16, (x, y, d));
}

static inline float annlearn_l2sqr_sq8(const float* x, const uint8_t* y,
                                       const float* offset, const float* scale,
                                       ptrdiff_t d) {
    return ANNLEARN_DISPATCH(annlearn_l2sqr_sq8, (x, y, offset, scale, d));
}

static inline float annlearn_inner_product_sq8(const float* x, const uint8_t* y,
                                               const float* offset,
                                               const float* scale,
                                               ptrdiff_t d) {
    return ANNLEARN_DISPATCH(annlearn_inner_product_sq8, (x, y, offset, scale, d));
}

#endif
