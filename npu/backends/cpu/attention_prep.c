// What happens to the fused q/k/v projection before attention, in one pass each, AVX-512 (the loops:
// attention_prep_common.h):
//   qk_norm_rope:  per (token, q or k head): optional RMSNorm over head_dim (Qwen3's q_norm / k_norm),
//                  then RoPE: y[d] * cos[pos, d] + y[(d + D/2) % D] * sin_signed[pos, d]   (in place),
//                  then, where hadamard_log2 (= log2 D) is set, a rotated checkpoint's R3: each head times the
//                  normalized Sylvester matrix of order D (row_prologue.h hadamard_row, R4's transform)
//   kv_write_int8: per (token, kv head): symmetric INT8 of K and V over head_dim, stored at the token's
//                  slot of the paged cache with its fp32 scale (s = absmax / 127, round half to even)
//   argmax_rows:   greedy sampling
// Both follow the eager PyTorch ops in npu/model.py and npu/kv_cache.py operation by operation (no fused
// multiply-adds: the build uses -ffp-contract=off), so only the order of the norm's sum can differ.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "attention_prep_common.h"
#include "row_prologue.h"

#define VEC 16

static void norm_head(const float *x, const float *w, int D, float eps, float *y) {
    __m512 acc = _mm512_setzero_ps();
    for (int d = 0; d < D; d += VEC) {
        __m512 v = _mm512_loadu_ps(x + d);
        acc = _mm512_add_ps(acc, _mm512_mul_ps(v, v));
    }
    const __m512 r = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)D + eps));
    for (int d = 0; d < D; d += VEC)
        _mm512_storeu_ps(y + d, _mm512_mul_ps(_mm512_loadu_ps(w + d), _mm512_mul_ps(_mm512_loadu_ps(x + d), r)));
}

static void rope_head(const float *y, const float *c, const float *s, int D, float *x) {
    const int half = D / 2;
    for (int d = 0; d < D; d += VEC) {
        const int partner = d < half ? d + half : d - half;
        __m512 a = _mm512_mul_ps(_mm512_loadu_ps(y + d), _mm512_loadu_ps(c + d));
        __m512 b = _mm512_mul_ps(_mm512_loadu_ps(y + partner), _mm512_loadu_ps(s + d));
        _mm512_storeu_ps(x + d, _mm512_add_ps(a, b));
    }
}

// attention_prep_common.h's per-head quantization (16 lanes at a time)
static void quantize_head(const float *x, int D, int8_t *q, float *scale) {
    __m512 vmax = _mm512_setzero_ps();
    for (int d = 0; d < D; d += VEC) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(x + d)));
    const float s = _mm512_reduce_max_ps(vmax) / QMAX, div = s > MIN_DIVISOR ? s : MIN_DIVISOR;
    const __m512 vdiv = _mm512_set1_ps(div), lo = _mm512_set1_ps(-QMAX), hi = _mm512_set1_ps(QMAX);
    for (int d = 0; d < D; d += VEC) {
        __m512 v = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(x + d), vdiv),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
        _mm_storeu_si128((__m128i *)(q + d), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
    }
    *scale = s;
}

static float row_max(const float *row, int V) {
    __m512 best = _mm512_set1_ps(-INFINITY);
    int v = 0;
    for (; v + VEC <= V; v += VEC) best = _mm512_max_ps(best, _mm512_loadu_ps(row + v));
    float m = _mm512_reduce_max_ps(best);
    for (; v < V; v++) m = row[v] > m ? row[v] : m;
    return m;
}

// the first index holding m (or a NaN, as torch.argmax reports NaN), 16 lanes at a time; -1 for none
static int64_t first_at(const float *row, int V, float m) {
    const __m512 vm = _mm512_set1_ps(m);
    int v = 0;
    for (; v + VEC <= V; v += VEC) {
        const __m512 x = _mm512_loadu_ps(row + v);
        const __mmask16 hit = _mm512_cmp_ps_mask(x, vm, _CMP_EQ_OQ) | _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
        if (hit) return v + __builtin_ctz(hit);
    }
    for (; v < V; v++)
        if (row[v] == m || row[v] != row[v]) return v;
    return -1;
}
