// What a linear applies to its input rows before the GEMM, shared by the GEMM kernels:
//   PROLOGUE_NONE     a = x
//   PROLOGUE_RMSNORM  a = w * (x * 1/sqrt(mean(x^2) + eps))          (transformers' RMSNorm in fp32)
//   PROLOGUE_SILU_MUL a = silu(x[:, :K]) * x[:, K:]                    (x has 2K columns: gate | up)
// and then, where the code's bits from PROLOGUE_HADAMARD_SHIFT up hold log2(B) > 0, a rotated checkpoint's R4:
//   a = a * blockdiag(H_B, ..., H_B) / sqrt(B)                          (H_B Sylvester's Hadamard matrix of order B)
// as a fast Walsh-Hadamard transform: butterfly stages of stride 1, 2, 4, ..., B / 2 (a + b, a - b in fp32), then one
// multiplication by the fp32 1/sqrt(B): exactly npu/backends/base.py hadamard_rows' operations, so the same bits.
#pragma once
#include <immintrin.h>
#include <math.h>
#include <stddef.h>
#include <string.h>

#include "simd_math.h"

enum { PROLOGUE_NONE = 0, PROLOGUE_RMSNORM = 1, PROLOGUE_SILU_MUL = 2 };
#define PROLOGUE_KIND_MASK 0xFF
#define PROLOGUE_HADAMARD_SHIFT 8

static inline float silu_scalar(float g) { return g / (1.0f + expf(-g)); }

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
        for (; h < B; h *= 2)
            for (int k0 = 0; k0 < K; k0 += 2 * h)
                for (int k = k0; k < k0 + h; k++) {
                    const float u = a[k], w = a[k + h];
                    a[k] = u + w;
                    a[k + h] = u - w;
                }
    }
    // the fp32 rounding of 1/sqrt(B), as hadamard_scale computes it (exact for even log2_block)
    const float scale = (float)(1.0 / sqrt((double)B));
    int k = 0;
    for (; k + 16 <= K; k += 16) _mm512_storeu_ps(a + k, _mm512_mul_ps(_mm512_loadu_ps(a + k), _mm512_set1_ps(scale)));
    for (; k < K; k++) a[k] *= scale;
}

static const float *prologue_kind_row(const float *x, int m, int K, int prologue, const float *norm_w, float eps,
                                      float *buf);

// Writes the prologue's output row a[0:K] into buf (or returns x's row itself for PROLOGUE_NONE without a rotation).
static inline const float *prologue_row(const float *x, int m, int K, int prologue, const float *norm_w, float eps,
                                        float *buf) {
    const int log2_block = prologue >> PROLOGUE_HADAMARD_SHIFT;
    const float *a = prologue_kind_row(x, m, K, prologue & PROLOGUE_KIND_MASK, norm_w, eps, buf);
    if (!log2_block) return a;
    if (a != buf) memcpy(buf, a, (size_t)K * sizeof(float));
    hadamard_row(buf, K, log2_block);
    return buf;
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

