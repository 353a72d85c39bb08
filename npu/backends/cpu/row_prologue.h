// What a linear applies to its input rows before the GEMM, shared by the GEMM kernels:
//   PROLOGUE_NONE     a = x
//   PROLOGUE_RMSNORM  a = w * (x * 1/sqrt(mean(x^2) + eps))          (transformers' RMSNorm in fp32)
//   PROLOGUE_SILU_MUL a = silu(x[:, :K]) * x[:, K:]                    (x has 2K columns: gate | up)
#pragma once
#include <immintrin.h>
#include <math.h>
#include <stddef.h>

#include "simd_math.h"

enum { PROLOGUE_NONE = 0, PROLOGUE_RMSNORM = 1, PROLOGUE_SILU_MUL = 2 };

static inline float silu_scalar(float g) { return g / (1.0f + expf(-g)); }

// Writes the prologue's output row a[0:K] into buf (or returns x's row itself for PROLOGUE_NONE).
static inline const float *prologue_row(const float *x, int m, int K, int prologue, const float *norm_w, float eps,
                                 float *buf) {
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

