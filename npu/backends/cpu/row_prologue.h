// The AVX-512 family's row prologue (prologue_common.h says what each code computes): 16-lane vectors.
#pragma once
#include <immintrin.h>
#include <math.h>
#include <stddef.h>
#include <string.h>

#include "prologue_common.h"
#include "simd_math.h"

// The normalized block-diagonal Hadamard transform of a[0:K] in place (blocks of 1 << log2_block, which divides K).
// Strides below 16 are butterflies inside one 16-lane vector: each lane adds its partner (lane ^ h, fetched with a
// permute) where bit h of its index is clear, and subtracts itself from it where set: a + b and a - b as above.
static inline void hadamard_row(float *a, int K, int log2_block) {
    const int B = 1 << log2_block;
    int h = 1;
    if (B >= 16) {
        const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
        for (; h < 16; h *= 2) {
            const __m512i partner = _mm512_xor_si512(lane, _mm512_set1_epi32(h));
            const __mmask16 high = _mm512_test_epi32_mask(lane, _mm512_set1_epi32(h));
            for (int k = 0; k < K; k += 16) {
                const __m512 v = _mm512_loadu_ps(a + k), p = _mm512_permutexvar_ps(partner, v);
                _mm512_storeu_ps(a + k, _mm512_mask_sub_ps(_mm512_add_ps(v, p), high, p, v));
            }
        }
        for (; h < B; h *= 2)
            for (int k0 = 0; k0 < K; k0 += 2 * h)
                for (int k = k0; k < k0 + h; k += 16) {
                    const __m512 u = _mm512_loadu_ps(a + k), w = _mm512_loadu_ps(a + k + h);
                    _mm512_storeu_ps(a + k, _mm512_add_ps(u, w));
                    _mm512_storeu_ps(a + k + h, _mm512_sub_ps(u, w));
                }
    } else {
        hadamard_stages_scalar(a, K, h, B);
    }
    const float scale = hadamard_scale(B);
    int k = 0;
    for (; k + 16 <= K; k += 16) _mm512_storeu_ps(a + k, _mm512_mul_ps(_mm512_loadu_ps(a + k), _mm512_set1_ps(scale)));
    for (; k < K; k++) a[k] *= scale;
}

static inline const float *prologue_kind_row(const float *x, int m, int K, int prologue, const float *norm_w,
                                             float eps, float *buf) {
    if (prologue == PROLOGUE_NONE) return x + (size_t)m * K;
    int k = 0;
    if (prologue == PROLOGUE_SILU_MUL) {
        const float *g = x + (size_t)m * 2 * K, *u = g + K;
        for (; k + 16 <= K; k += 16) {
            __m512 gv = _mm512_loadu_ps(g + k);
            __m512 s = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
            _mm512_storeu_ps(buf + k, _mm512_mul_ps(s, _mm512_loadu_ps(u + k)));
        }
        for (; k < K; k++) buf[k] = silu_scalar(g[k]) * u[k];
        return buf;
    }
    const float *row = x + (size_t)m * K;  // PROLOGUE_RMSNORM
    __m512 acc = _mm512_setzero_ps();
    for (; k + 16 <= K; k += 16) {
        __m512 v = _mm512_loadu_ps(row + k);
        acc = _mm512_add_ps(acc, _mm512_mul_ps(v, v));
    }
    float ss = _mm512_reduce_add_ps(acc);
    for (; k < K; k++) ss += row[k] * row[k];
    const float r = 1.0f / sqrtf(ss / (float)K + eps);
    const __m512 vr = _mm512_set1_ps(r);
    for (k = 0; k + 16 <= K; k += 16)
        _mm512_storeu_ps(buf + k, _mm512_mul_ps(_mm512_loadu_ps(norm_w + k), _mm512_mul_ps(_mm512_loadu_ps(row + k), vr)));
    for (; k < K; k++) buf[k] = norm_w[k] * (row[k] * r);
    return buf;
}

