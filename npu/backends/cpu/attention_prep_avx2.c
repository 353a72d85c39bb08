// The AVX2 family's attention_prep.c: the steps of q/k norm + RoPE (+ R3), the INT8 KV write and greedy argmax
// (attention_prep_common.h's loops) with 8-lane vectors, the same results as the AVX-512 kernels (every element
// through the same fp32 operations; the norm's sum of squares in 16 lanes reduced in gcc's _mm512_reduce_add_ps
// order).
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "attention_prep_common.h"
#include "row_prologue_avx2.h"

#define VEC 8

static void norm_head(const float *x, const float *w, int D, float eps, float *y) {
    __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
    for (int d = 0; d < D; d += 16) {
        const __m256 a = _mm256_loadu_ps(x + d), b = _mm256_loadu_ps(x + d + 8);
        lo = _mm256_add_ps(lo, _mm256_mul_ps(a, a));
        hi = _mm256_add_ps(hi, _mm256_mul_ps(b, b));
    }
    const __m256 r = _mm256_set1_ps(1.0f / sqrtf(reduce_add_16(lo, hi) / (float)D + eps));
    for (int d = 0; d < D; d += VEC)
        _mm256_storeu_ps(y + d, _mm256_mul_ps(_mm256_loadu_ps(w + d), _mm256_mul_ps(_mm256_loadu_ps(x + d), r)));
}

static void rope_head(const float *y, const float *c, const float *s, int D, float *x) {
    const int half = D / 2;
    for (int d = 0; d < D; d += VEC) {
        const int partner = d < half ? d + half : d - half;
        const __m256 a = _mm256_mul_ps(_mm256_loadu_ps(y + d), _mm256_loadu_ps(c + d));
        const __m256 b = _mm256_mul_ps(_mm256_loadu_ps(y + partner), _mm256_loadu_ps(s + d));
        _mm256_storeu_ps(x + d, _mm256_add_ps(a, b));
    }
}

// attention_prep_common.h's per-head quantization (8 lanes at a time)
static void quantize_head(const float *x, int D, int8_t *q, float *scale) {
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 vmax = _mm256_setzero_ps();
    for (int d = 0; d < D; d += VEC) vmax = _mm256_max_ps(vmax, _mm256_and_ps(_mm256_loadu_ps(x + d), abs_mask));
    const float s = reduce_max_8(vmax) / QMAX, div = s > MIN_DIVISOR ? s : MIN_DIVISOR;
    const __m256 vdiv = _mm256_set1_ps(div), lo = _mm256_set1_ps(-QMAX), hi = _mm256_set1_ps(QMAX);
    for (int d = 0; d < D; d += VEC) {
        __m256 v = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + d), vdiv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
        int32_t codes[VEC];
        _mm256_storeu_si256((__m256i *)codes, _mm256_cvtps_epi32(v));
        for (int i = 0; i < VEC; i++) q[d + i] = (int8_t)codes[i];
    }
    *scale = s;
}

static float row_max(const float *row, int V) {
    __m256 best = _mm256_set1_ps(-INFINITY);
    int v = 0;
    for (; v + VEC <= V; v += VEC) best = _mm256_max_ps(best, _mm256_loadu_ps(row + v));
    float m = reduce_max_8(best);
    for (; v < V; v++) m = row[v] > m ? row[v] : m;
    return m;
}

// the first index holding m (or a NaN), 8 lanes at a time; -1 for none
static int64_t first_at(const float *row, int V, float m) {
    const __m256 vm = _mm256_set1_ps(m);
    int v = 0;
    for (; v + VEC <= V; v += VEC) {
        const __m256 x = _mm256_loadu_ps(row + v);
        const int hit = _mm256_movemask_ps(_mm256_or_ps(_mm256_cmp_ps(x, vm, _CMP_EQ_OQ), _mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
        if (hit) return v + __builtin_ctz(hit);
    }
    for (; v < V; v++)
        if (row[v] == m || row[v] != row[v]) return v;
    return -1;
}
