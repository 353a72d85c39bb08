// A8W8 GEMM for aarch64 with the dot-product extension (sdot: ARMv8.2 "asimddp", every Graviton 2+, Ampere
// Altra, Apple M1+), the "neon" kernel family: the same entry points, arguments and results as a8w8_vnni.c, bit
// for bit. sdot multiplies signed by signed bytes and adds each 4 into an int32 lane, so the activations stay
// signed and no correction is needed: the exact INT32 dot product, as VNNI's.
//
// out[m, n] = residual[m, n] + ((sum_k q_a[m, k] * q_w[n, k]) * s_a[m] * s_w[n] + bias[n]), with a = prologue(x)
// (row_prologue_neon.h) quantized per token exactly as a8w8_vnni.c does.
// Weights are packed as [N/4][K/4][4][4]: one 16-byte load gives 4 consecutive k of 4 channels.
#include <arm_neon.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "row_prologue_neon.h"

#define NB 4  // output channels per block (one 128-bit register of int32)
#define KG 4  // k values per int32 lane
#define NR 4  // column blocks per register tile
#define MR 4  // activation rows per register tile (16 accumulators of the 32 registers)
typedef int32x4_t acc_t;
typedef int8_t code_t;  // (sdot multiplies signed bytes)
#include "a8w8_signed.h"

#define MIN_DIVISOR 1e-30f
#define QMAX 127.0f

// a[0:K] fp32 -> one row of an activation panel (signed codes, k-group g at out + g * gstride, K..Kp zero);
// returns the scale. The same operations as a8w8_vnni.c quantize_row, so the same codes.
static float quantize_row(const float *a, int K, int Kp, code_t *out, size_t gstride) {
    float absmax = 0.0f;
    for (int k = 0; k < K; k++) absmax = fmaxf(absmax, fabsf(a[k]));
    const float s = absmax / QMAX, div = s > MIN_DIVISOR ? s : MIN_DIVISOR;
    int k = 0;
    for (; k + 4 <= K; k += 4) {
        float32x4_t q = vrndnq_f32(vdivq_f32(vld1q_f32(a + k), vdupq_n_f32(div)));
        q = vminq_f32(vmaxq_f32(q, vdupq_n_f32(-QMAX)), vdupq_n_f32(QMAX));
        int32_t codes[4];
        vst1q_s32(codes, vcvtq_s32_f32(q));
        for (int i = 0; i < 4; i++) out[(size_t)((k + i) / KG) * gstride + (k + i) % KG] = (int8_t)codes[i];
    }
    for (; k < K; k++) {
        float q = nearbyintf(a[k] / div);
        q = fminf(fmaxf(q, -QMAX), QMAX);
        out[(size_t)(k / KG) * gstride + k % KG] = (int8_t)(int)q;
    }
    for (; k < Kp; k++) out[(size_t)(k / KG) * gstride + k % KG] = 0;
    return s;
}

// acc + the sums of 4 adjacent products of w and b (signed bytes), exact in INT32: one sdot, or on plain NEON
// (the "neon-plain" family, built without +dotprod) widening products (|w * b| <= 128 * 127 fits INT16) added
// pairwise twice.
static inline int32x4_t dot4_add(int32x4_t acc, int8x16_t w, int8x16_t b) {
#if defined(__ARM_FEATURE_DOTPROD)
    return vdotq_s32(acc, w, b);
#else
    const int16x8_t lo = vmull_s8(vget_low_s8(w), vget_low_s8(b)), hi = vmull_high_s8(w, b);
    return vaddq_s32(acc, vpaddq_s32(vpaddlq_s16(lo), vpaddlq_s16(hi)));
#endif
}

// One MR_ x NR register tile: MR_ rows of panel xp (of PR_ rows) against NR packed column blocks from w0 (next: the
// next column tile on a single row pass, prefetched alongside).
static inline __attribute__((always_inline)) void tile(const code_t *xp, int PR_, int Kp, const int8_t *w0, int MR_,
                                                       acc_t acc[MR][NR], const int8_t *next) {
    const size_t bstride = (size_t)Kp * NB;
    for (int r = 0; r < MR_; r++)
        for (int j = 0; j < NR; j++) acc[r][j] = vdupq_n_s32(0);
    const int ngroups = Kp / KG;
    for (int g = 0; g < ngroups; g++) {
        if (next && g % 4 == 0)  // (a k-group of a block is a quarter of a 64-byte line)
            for (int j = 0; j < NR; j++) __builtin_prefetch(next + j * bstride + (size_t)g * NB * KG, 0, 2);
        int8x16_t w[NR];
        for (int j = 0; j < NR; j++) w[j] = vld1q_s8(w0 + j * bstride + (size_t)g * NB * KG);
        const int8_t *xg = xp + (size_t)g * PR_ * KG;
        for (int r = 0; r < MR_; r++) {
            int32_t xb;
            memcpy(&xb, xg + r * KG, 4);
            const int8x16_t b = vreinterpretq_s8_s32(vdupq_n_s32(xb));
            for (int j = 0; j < NR; j++) acc[r][j] = dot4_add(acc[r][j], w[j], b);
        }
    }
}

// Epilogue of rows m0..m0+mr of the NR column blocks from column n0, in a8w8_vnni.c's order of operations.
static inline void store_tile(acc_t acc[MR][NR], int mr, int m0, int n0, const int32_t *wsum, const float *sw,
                              const float *sx, int N, const float *bias, const float *residual, float *out) {
    (void)wsum;  // (the activations stay signed: nothing to correct)
    for (int r = 0; r < mr; r++) {
        const float32x4_t vsx = vdupq_n_f32(sx[m0 + r]);
        for (int j = 0; j < NR; j++) {
            const int n = n0 + j * NB;
            if (n >= N) break;
            float32x4_t v = vmulq_f32(vmulq_f32(vcvtq_f32_s32(acc[r][j]), vsx), vld1q_f32(sw + n));
            if (bias) v = vaddq_f32(v, vld1q_f32(bias + n));  // padded to Np like sw
            const size_t at = (size_t)(m0 + r) * N + n;
            float vals[NB];
            vst1q_f32(vals, v);
            for (int i = 0; i < NB && n + i < N; i++) out[at + i] = residual ? residual[at + i] + vals[i] : vals[i];
        }
    }
}
