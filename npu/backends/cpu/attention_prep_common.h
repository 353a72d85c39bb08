// The loops of attention_prep*.c, the same in every kernel family: q/k norm + RoPE (+ R3) per (token, head), the
// INT8 KV write per (token, kv head), greedy argmax per row. The family defines, after including this, the
// per-head and per-row steps on its vectors:
//   norm_head(x, w, D, eps, y)      y = w * (x * 1/sqrt(mean(x^2) + eps)), the sum of squares in 16 lanes reduced
//                                   in gcc's _mm512_reduce_add_ps order (so every family gives the same bits)
//   rope_head(y, c, s, D, x)        x[d] = y[d] * c[d] + y[(d + D/2) % D] * s[d]
//   quantize_head(x, D, q, scale)   symmetric INT8 over head_dim, s = absmax / 127, round half to even
//   row_max(row, V), first_at(row, V, m)   the largest value of a row; the first index holding m or a NaN
// and hadamard_row (its row_prologue*.h).
#pragma once
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "cpu_kernels.h"
#include "prologue_common.h"

#define MAX_D 512
#define MIN_DIVISOR 1e-30f
#define QMAX 127.0f

static void norm_head(const float *x, const float *w, int D, float eps, float *y);
static void rope_head(const float *y, const float *c, const float *s, int D, float *x);
static void quantize_head(const float *x, int D, int8_t *q, float *scale);
static float row_max(const float *row, int V);
static int64_t first_at(const float *row, int V, float m);

// qkv [T, row_stride] fp32: heads 0..H-1 of width D start at column 0 (q heads then k heads).
// norm_w [H, D] or NULL; cos / sin_signed [max_pos, D]; positions [T]; hadamard_log2: 0, or log2 D for R3.
// Returns -1 (nothing done) for head sizes the kernels do not handle (the same in every family).
int qk_norm_rope(float *qkv, int T, int row_stride, int H, int D, const float *norm_w, float eps, const float *cos_t,
                 const float *sin_t, const int64_t *positions, int hadamard_log2) {
    if (D % 32 || D > MAX_D || (hadamard_log2 && (1 << hadamard_log2) != D)) return -1;
#pragma omp parallel for schedule(static) if (T * H >= 64)
    for (int th = 0; th < T * H; th++) {
        const int t = th / H, h = th % H;
        float *x = qkv + (size_t)t * row_stride + (size_t)h * D;
        float y[MAX_D];
        if (norm_w)
            norm_head(x, norm_w + (size_t)h * D, D, eps, y);
        else
            memcpy(y, x, sizeof(float) * D);
        rope_head(y, cos_t + (size_t)positions[t] * D, sin_t + (size_t)positions[t] * D, D, x);
        if (hadamard_log2) hadamard_row(x, D, hadamard_log2);
    }
    return 0;
}

// k rows [T, k_stride] and v rows [T, v_stride] fp32 (Hkv heads of width D each); caches of one layer:
// kc/vc [slots, Hkv, D] int8, ks/vs [slots, Hkv] fp32; slots [T]. Returns -1 (nothing done) where D is not a
// multiple of 16 (every family the same shapes).
int kv_write_int8(const float *k, const float *v, int T, int k_stride, int v_stride, int Hkv, int D,
                  const int64_t *slots, int8_t *kc, float *ks, int8_t *vc, float *vs) {
    if (D % 16) return -1;
#pragma omp parallel for schedule(static) if (T * Hkv >= 64)
    for (int th = 0; th < T * Hkv; th++) {
        const int t = th / Hkv, h = th % Hkv;
        const size_t dst = (size_t)slots[t] * Hkv + h;
        quantize_head(k + (size_t)t * k_stride + (size_t)h * D, D, kc + dst * D, ks + dst);
        quantize_head(v + (size_t)t * v_stride + (size_t)h * D, D, vc + dst * D, vs + dst);
    }
    return 0;
}

// Greedy sampling: out[s] = index of the first maximum of logits[s, 0:V], as torch.argmax for rows without NaN
// (torch's CPU argmax is a scalar loop, 130 us for a 152k vocabulary on an AVX-512 machine).
void argmax_rows(const float *logits, int S, int V, int64_t *out) {
#pragma omp parallel for schedule(static)
    for (int s = 0; s < S; s++) {
        const float *row = logits + (size_t)s * V;
        const int64_t idx = first_at(row, V, row_max(row, V));
        out[s] = idx < 0 ? 0 : idx;
    }
}
