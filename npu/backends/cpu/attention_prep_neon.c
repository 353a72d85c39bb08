// The NEON family's attention_prep.c (aarch64): the steps of q/k norm + RoPE (+ R3), the INT8 KV write and greedy
// argmax (attention_prep_common.h's loops) with 4-lane vectors, the same results as the AVX-512 and AVX2 kernels
// (every element through the same fp32 operations; the norm's sum of squares in 16 lanes reduced in gcc's
// _mm512_reduce_add_ps order).
#include <arm_neon.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "attention_prep_common.h"
#include "row_prologue_neon.h"

#define VEC 4

static void norm_head(const float *x, const float *w, int D, float eps, float *y) {
    float32x4_t q[4] = {vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)};
    for (int d = 0; d < D; d += 16)
        for (int i = 0; i < 4; i++) {
            const float32x4_t a = vld1q_f32(x + d + 4 * i);
            q[i] = vaddq_f32(q[i], vmulq_f32(a, a));
        }
    const float32x4_t r = vdupq_n_f32(1.0f / sqrtf(reduce_add_16(q[0], q[1], q[2], q[3]) / (float)D + eps));
    for (int d = 0; d < D; d += VEC) vst1q_f32(y + d, vmulq_f32(vld1q_f32(w + d), vmulq_f32(vld1q_f32(x + d), r)));
}

static void rope_head(const float *y, const float *c, const float *s, int D, float *x) {
    const int half = D / 2;
    for (int d = 0; d < D; d += VEC) {
        const int partner = d < half ? d + half : d - half;
        const float32x4_t a = vmulq_f32(vld1q_f32(y + d), vld1q_f32(c + d));
        const float32x4_t b = vmulq_f32(vld1q_f32(y + partner), vld1q_f32(s + d));
        vst1q_f32(x + d, vaddq_f32(a, b));
    }
}

// attention_prep_common.h's per-head quantization (4 lanes at a time; vrndnq rounds half to even as roundscale)
static void quantize_head(const float *x, int D, int8_t *q, float *scale) {
    float32x4_t vmax = vdupq_n_f32(0.0f);
    for (int d = 0; d < D; d += VEC) vmax = vmaxq_f32(vmax, vabsq_f32(vld1q_f32(x + d)));
    const float s = vmaxvq_f32(vmax) / QMAX, div = s > MIN_DIVISOR ? s : MIN_DIVISOR;
    const float32x4_t vdiv = vdupq_n_f32(div), lo = vdupq_n_f32(-QMAX), hi = vdupq_n_f32(QMAX);
    for (int d = 0; d < D; d += VEC) {
        float32x4_t v = vrndnq_f32(vdivq_f32(vld1q_f32(x + d), vdiv));
        v = vminq_f32(vmaxq_f32(v, lo), hi);
        int32_t codes[VEC];
        vst1q_s32(codes, vcvtq_s32_f32(v));
        for (int i = 0; i < VEC; i++) q[d + i] = (int8_t)codes[i];
    }
    *scale = s;
}

static float row_max(const float *row, int V) {
    float32x4_t best = vdupq_n_f32(-INFINITY);
    int v = 0;
    for (; v + VEC <= V; v += VEC) best = vmaxq_f32(best, vld1q_f32(row + v));
    float m = vmaxvq_f32(best);
    for (; v < V; v++) m = row[v] > m ? row[v] : m;
    return m;
}

// the first index holding m (or a NaN); -1 for none
static int64_t first_at(const float *row, int V, float m) {
    for (int v = 0; v < V; v++)
        if (row[v] == m || row[v] != row[v]) return v;
    return -1;
}
