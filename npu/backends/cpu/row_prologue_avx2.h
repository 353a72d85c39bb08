// The AVX2 family's copy of row_prologue.h: the same prologues (PROLOGUE_NONE, PROLOGUE_RMSNORM,
// PROLOGUE_SILU_MUL, then R4's Hadamard where the code's bits from PROLOGUE_HADAMARD_SHIFT up hold log2 of its
// block) with 8-lane vectors, computing the same bits as the AVX-512 version: every element goes through the
// same fp32 operations in the same order (no implicit fused multiply-adds: -ffp-contract=off), the RMSNorm's
// sum of squares is accumulated in 16 lanes (two 8-lane halves) and reduced in the order gcc's
// _mm512_reduce_add_ps uses, and exp256 is exp512 with AVX2's instructions (scalef becomes two exact
// power-of-two multiplications, the second one rounding as scalef does).
#pragma once
#include <immintrin.h>
#include <math.h>
#include <stddef.h>
#include <string.h>

#include "prologue_common.h"

// 2^n for integer-valued n in [-75, 64] (a normal float), built from its exponent bits.
static inline __m256 pow2_256(__m256i n) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127)), 23));
}

// simd_math.h's exp512, operation by operation.
static inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-103.0f)), _mm256_set1_ps(88.7f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    // scalef(p, n) = p * 2^n with one rounding: n is in [-149, 128]; p * 2^(n/2) is exact (p is near 1), and
    // the second factor rounds once, where a result below the normal range is rounded
    const __m256i ni = _mm256_cvtps_epi32(n), half = _mm256_srai_epi32(ni, 1);
    return _mm256_mul_ps(_mm256_mul_ps(p, pow2_256(half)), pow2_256(_mm256_sub_epi32(ni, half)));
}

// The largest of the 8 lanes (the order of a max does not matter for values without NaN).
static inline float reduce_max_8(__m256 v) {
    float lanes[8];
    _mm256_storeu_ps(lanes, v);
    float m = lanes[0];
    for (int i = 1; i < 8; i++) m = fmaxf(m, lanes[i]);
    return m;
}

// _mm512_reduce_add_ps of the 16 lanes lo | hi, in gcc's order: the halves added, then the 128-bit halves, then
// lanes (0, 2) and (1, 3), then the two.
static inline float reduce_add_16(__m256 lo, __m256 hi) {
    const __m256 t3 = _mm256_add_ps(hi, lo);
    const __m128 t6 = _mm_add_ps(_mm256_extractf128_ps(t3, 1), _mm256_castps256_ps128(t3));
    const __m128 t8 = _mm_add_ps(t6, _mm_shuffle_ps(t6, t6, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_cvtss_f32(t8) + _mm_cvtss_f32(_mm_shuffle_ps(t8, t8, 1));
}

// The normalized block-diagonal Hadamard transform of a[0:K] in place (row_prologue.h hadamard_row): the same
// butterflies (a + b, a - b) in the same stage order; strides below 8 inside one 8-lane vector.
static inline void hadamard_row(float *a, int K, int log2_block) {
    const int B = 1 << log2_block;
    int h = 1;
    if (B >= 8) {
        const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        for (; h < 8; h *= 2) {
            const __m256i partner = _mm256_xor_si256(lane, _mm256_set1_epi32(h));
            const __m256 high = _mm256_castsi256_ps(
                _mm256_cmpeq_epi32(_mm256_and_si256(lane, _mm256_set1_epi32(h)), _mm256_set1_epi32(h)));
            for (int k = 0; k < K; k += 8) {
                const __m256 v = _mm256_loadu_ps(a + k), p = _mm256_permutevar8x32_ps(v, partner);
                _mm256_storeu_ps(a + k, _mm256_blendv_ps(_mm256_add_ps(v, p), _mm256_sub_ps(p, v), high));
            }
        }
        for (; h < B; h *= 2)
            for (int k0 = 0; k0 < K; k0 += 2 * h)
                for (int k = k0; k < k0 + h; k += 8) {
                    const __m256 u = _mm256_loadu_ps(a + k), w = _mm256_loadu_ps(a + k + h);
                    _mm256_storeu_ps(a + k, _mm256_add_ps(u, w));
                    _mm256_storeu_ps(a + k + h, _mm256_sub_ps(u, w));
                }
    } else {
        hadamard_stages_scalar(a, K, h, B);
    }
    const float scale = hadamard_scale(B);
    int k = 0;
    for (; k + 8 <= K; k += 8) _mm256_storeu_ps(a + k, _mm256_mul_ps(_mm256_loadu_ps(a + k), _mm256_set1_ps(scale)));
    for (; k < K; k++) a[k] *= scale;
}

static inline const float *prologue_kind_row(const float *x, int m, int K, int prologue, const float *norm_w,
                                             float eps, float *buf) {
    if (prologue == PROLOGUE_NONE) return x + (size_t)m * K;
    int k = 0;
    if (prologue == PROLOGUE_SILU_MUL) {
        const float *g = x + (size_t)m * 2 * K, *u = g + K;
        // (up to a multiple of 16, as the AVX-512 kernel's vector loop: the columns after it take the scalar SiLU
        // there, whose expf differs from exp512 in the last bit)
        const int vector_end = K / 16 * 16;
        for (; k < vector_end; k += 8) {
            __m256 gv = _mm256_loadu_ps(g + k);
            __m256 s = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0f), exp256(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
            _mm256_storeu_ps(buf + k, _mm256_mul_ps(s, _mm256_loadu_ps(u + k)));
        }
        for (; k < K; k++) buf[k] = silu_scalar(g[k]) * u[k];
        return buf;
    }
    const float *row = x + (size_t)m * K;  // PROLOGUE_RMSNORM
    __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
    for (; k + 16 <= K; k += 16) {
        const __m256 a = _mm256_loadu_ps(row + k), b = _mm256_loadu_ps(row + k + 8);
        lo = _mm256_add_ps(lo, _mm256_mul_ps(a, a));
        hi = _mm256_add_ps(hi, _mm256_mul_ps(b, b));
    }
    float ss = reduce_add_16(lo, hi);
    for (; k < K; k++) ss += row[k] * row[k];
    const float r = 1.0f / sqrtf(ss / (float)K + eps);
    const __m256 vr = _mm256_set1_ps(r);
    for (k = 0; k + 8 <= K; k += 8)
        _mm256_storeu_ps(buf + k, _mm256_mul_ps(_mm256_loadu_ps(norm_w + k), _mm256_mul_ps(_mm256_loadu_ps(row + k), vr)));
    for (; k < K; k++) buf[k] = norm_w[k] * (row[k] * r);
    return buf;
}
