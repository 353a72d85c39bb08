// The NEON family's copy of row_prologue.h (aarch64): the same prologues (PROLOGUE_NONE, PROLOGUE_RMSNORM,
// PROLOGUE_SILU_MUL, then R4's Hadamard where the code's bits from PROLOGUE_HADAMARD_SHIFT up hold log2 of its
// block) computing the same bits as the AVX-512 version: every element goes through the same fp32 operations in
// the same order (-ffp-contract=off; the fused multiply-adds are the explicit ones exp512 has too), the
// RMSNorm's sum of squares is accumulated in 16 lanes (four 4-lane quarters) and reduced in the order gcc's
// _mm512_reduce_add_ps uses, and exp_neon is exp512 with NEON's instructions (scalef becomes two exact
// power-of-two multiplications, the second one rounding as scalef does).
#pragma once
#include <arm_neon.h>
#include <math.h>
#include <stddef.h>
#include <string.h>

#include "prologue_common.h"

// 2^n for integer n in [-75, 64] (a normal float), built from its exponent bits.
static inline float32x4_t pow2_neon(int32x4_t n) {
    return vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(n, vdupq_n_s32(127)), 23));
}

// simd_math.h's exp512, operation by operation (vfmsq_f32(a, b, c) = a - b * c fused, as _mm512_fnmadd_ps).
static inline float32x4_t exp_neon(float32x4_t x) {
    x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-103.0f)), vdupq_n_f32(88.7f));
    const float32x4_t n = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(1.44269504088896341f)));
    float32x4_t r = vfmsq_f32(x, n, vdupq_n_f32(0.693359375f));
    r = vfmsq_f32(r, n, vdupq_n_f32(-2.12194440e-4f));
    float32x4_t p = vdupq_n_f32(1.9875691500e-4f);
    p = vfmaq_f32(vdupq_n_f32(1.3981999507e-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(8.3334519073e-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(4.1665795894e-2f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.6666665459e-1f), p, r);
    p = vfmaq_f32(vdupq_n_f32(5.0000001201e-1f), p, r);
    p = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.0f)), p, vmulq_f32(r, r));
    const int32x4_t ni = vcvtq_s32_f32(n), half = vshrq_n_s32(ni, 1);
    return vmulq_f32(vmulq_f32(p, pow2_neon(half)), pow2_neon(vsubq_s32(ni, half)));
}

// _mm512_reduce_add_ps of the 16 lanes q0 | q1 | q2 | q3 (4 each), in gcc's order.
static inline float reduce_add_16(float32x4_t q0, float32x4_t q1, float32x4_t q2, float32x4_t q3) {
    const float32x4_t t6 = vaddq_f32(vaddq_f32(q3, q1), vaddq_f32(q2, q0));  // (256-bit halves), then 128-bit halves
    const float32x4_t t8 = vaddq_f32(t6, vextq_f32(t6, t6, 2));              // lanes (0, 2) and (1, 3)
    return vgetq_lane_f32(t8, 0) + vgetq_lane_f32(t8, 1);
}

// The normalized block-diagonal Hadamard transform of a[0:K] in place (row_prologue.h hadamard_row): the same
// butterflies (a + b, a - b) in the same stage order.
static inline void hadamard_row(float *a, int K, int log2_block) {
    const int B = 1 << log2_block;
    hadamard_stages_scalar(a, K, 1, B);
    const float scale = hadamard_scale(B);
    for (int k = 0; k < K; k++) a[k] *= scale;
}

static inline const float *prologue_kind_row(const float *x, int m, int K, int prologue, const float *norm_w,
                                             float eps, float *buf) {
    if (prologue == PROLOGUE_NONE) return x + (size_t)m * K;
    int k = 0;
    if (prologue == PROLOGUE_SILU_MUL) {
        const float *g = x + (size_t)m * 2 * K, *u = g + K;
        const int vector_end = K / 16 * 16;  // as the AVX-512 kernel's vector loop; the scalar SiLU after it
        for (; k < vector_end; k += 4) {
            const float32x4_t gv = vld1q_f32(g + k);
            const float32x4_t s = vdivq_f32(gv, vaddq_f32(vdupq_n_f32(1.0f), exp_neon(vsubq_f32(vdupq_n_f32(0.0f), gv))));
            vst1q_f32(buf + k, vmulq_f32(s, vld1q_f32(u + k)));
        }
        for (; k < K; k++) buf[k] = silu_scalar(g[k]) * u[k];
        return buf;
    }
    const float *row = x + (size_t)m * K;  // PROLOGUE_RMSNORM
    float32x4_t q[4] = {vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f), vdupq_n_f32(0.0f)};
    for (; k + 16 <= K; k += 16)
        for (int i = 0; i < 4; i++) {
            const float32x4_t v = vld1q_f32(row + k + 4 * i);
            q[i] = vaddq_f32(q[i], vmulq_f32(v, v));
        }
    float ss = reduce_add_16(q[0], q[1], q[2], q[3]);
    for (; k < K; k++) ss += row[k] * row[k];
    const float r = 1.0f / sqrtf(ss / (float)K + eps);
    for (k = 0; k < K; k++) buf[k] = norm_w[k] * (row[k] * r);
    return buf;
}
