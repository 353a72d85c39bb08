// What happens to the fused q/k/v projection before attention, in one pass each, AVX-512:
//   qk_norm_rope:  per (token, q or k head): optional RMSNorm over head_dim (Qwen3's q_norm / k_norm),
//                  then RoPE: y[d] * cos[pos, d] + y[(d + D/2) % D] * sin_signed[pos, d]   (in place),
//                  then, where hadamard_log2 (= log2 D) is set, a rotated checkpoint's R3: each head times the
//                  normalized Sylvester matrix of order D (row_prologue.h hadamard_row, R4's transform)
//   kv_write_int8: per (token, kv head): symmetric INT8 of K and V over head_dim, stored at the token's
//                  slot of the paged cache with its fp32 scale (s = absmax / 127, round half to even)
// Both follow the eager PyTorch ops in npu/model.py and npu/kv_cache.py operation by operation (no fused
// multiply-adds: the build uses -ffp-contract=off), so only the order of the norm's sum can differ.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "cpu_kernels.h"
#include "kv_write_common.h"
#include "row_prologue.h"

#define VEC 16
#define MAX_D 512
#define MIN_DIVISOR 1e-30f
#define QMAX 127.0f

// qkv [T, row_stride] fp32: heads 0..H-1 of width D start at column 0 (q heads then k heads).
// norm_w [H, D] or NULL; cos / sin_signed [max_pos, D]; positions [T]; hadamard_log2: 0, or log2 D for R3.
// Returns -1 (nothing done) for head sizes this kernel does not handle.
int qk_norm_rope(float *qkv, int T, int row_stride, int H, int D, const float *norm_w, float eps, const float *cos_t,
                 const float *sin_t, const int64_t *positions, int hadamard_log2) {
    if (D % (2 * VEC) || D > MAX_D || (hadamard_log2 && (1 << hadamard_log2) != D)) return -1;
    const int half = D / 2;
#pragma omp parallel for schedule(static) if (T * H >= 64)
    for (int th = 0; th < T * H; th++) {
        const int t = th / H, h = th % H;
        float *x = qkv + (size_t)t * row_stride + (size_t)h * D;
        float y[MAX_D];
        if (norm_w) {
            __m512 acc = _mm512_setzero_ps();
            for (int d = 0; d < D; d += VEC) {
                __m512 v = _mm512_loadu_ps(x + d);
                acc = _mm512_add_ps(acc, _mm512_mul_ps(v, v));
            }
            const __m512 r = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)D + eps));
            const float *w = norm_w + (size_t)h * D;
            for (int d = 0; d < D; d += VEC)
                _mm512_storeu_ps(y + d, _mm512_mul_ps(_mm512_loadu_ps(w + d), _mm512_mul_ps(_mm512_loadu_ps(x + d), r)));
        } else {
            memcpy(y, x, sizeof(float) * D);
        }
        const float *c = cos_t + (size_t)positions[t] * D, *s = sin_t + (size_t)positions[t] * D;
        for (int d = 0; d < D; d += VEC) {
            const int partner = d < half ? d + half : d - half;
            __m512 a = _mm512_mul_ps(_mm512_loadu_ps(y + d), _mm512_loadu_ps(c + d));
            __m512 b = _mm512_mul_ps(_mm512_loadu_ps(y + partner), _mm512_loadu_ps(s + d));
            _mm512_storeu_ps(x + d, _mm512_add_ps(a, b));
        }
        if (hadamard_log2) hadamard_row(x, D, hadamard_log2);
    }
    return 0;
}

// kv_write_common.h's per-head quantization (16 lanes at a time)
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

// Greedy sampling: out[s] = index of the first maximum of logits[s, 0:V], as torch.argmax for rows
// without NaN (torch's CPU argmax is a scalar loop, 130 us for a 152k vocabulary here).
void argmax_rows(const float *logits, int S, int V, int64_t *out) {
#pragma omp parallel for schedule(static)
    for (int s = 0; s < S; s++) {
        const float *row = logits + (size_t)s * V;
        __m512 best = _mm512_set1_ps(-INFINITY);
        int v = 0;
        for (; v + VEC <= V; v += VEC) best = _mm512_max_ps(best, _mm512_loadu_ps(row + v));
        float m = _mm512_reduce_max_ps(best);
        for (; v < V; v++) m = row[v] > m ? row[v] : m;
        // first index holding the max (or a NaN, as torch.argmax reports NaN), 16 lanes at a time
        const __m512 vm = _mm512_set1_ps(m);
        int64_t idx = -1;
        for (v = 0; v + VEC <= V && idx < 0; v += VEC) {
            const __m512 x = _mm512_loadu_ps(row + v);
            const __mmask16 hit = _mm512_cmp_ps_mask(x, vm, _CMP_EQ_OQ) | _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
            if (hit) idx = v + __builtin_ctz(hit);
        }
        for (; v < V && idx < 0; v++) {
            if (row[v] == m || row[v] != row[v]) idx = v;
        }
        out[s] = idx < 0 ? 0 : idx;
    }
}
