// The NEON family's bf16_gemm.c (aarch64, no BF16 extension needed): the BF16-weight GEMM for few rows (the BF16
// lm_head of a decode step) with the same interface, weight packing and output (fp32 logits).
//
// out[m, n] = sum_k bf16(a[m, k]) * w[n, k] with a = prologue(x) (row_prologue_neon.h), accumulated
// in fp32 by fused multiply-adds, per pair of k the odd product first and then the even one: the order of
// vdpbf16ps in Intel's definition and of bf16_gemm_avx2.c, whose bits these are (each product of two BF16 values
// is exact in fp32, and every step rounds once). The AVX-512 BF16 hardware need not keep that order, so logits are
// compared with it within a bound (tests), with the AVX2 family bit for bit.
// Weights are bf16_gemm.c's packing, [N/16][K/2][16][2]: a k pair of 4 channels is one 16-byte load, whose even
// BF16 halves widen to fp32 by a 16-bit shift and odd halves by a mask. Activations are kept as the fp32 values of
// their BF16 rounding, row-major.
#include <arm_neon.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "row_prologue_neon.h"

#define NB 16  // output channels per block (bf16_gemm.c's packing)
#define KG 2   // k values per packed pair
#define NR 4   // column blocks per work item (bf16_gemm.c's tile: the padded N is a multiple of NB * NR)
#define MR 4   // rows per register tile (4 x MR accumulators, 8 weight vectors of the 32 registers)

#include "bf16_packing.h"

typedef float32x4_t bf16_acc_row[4];  // one row's accumulators of a block

// fp32 -> the fp32 value of its BF16 rounding (to nearest even; NaN stays NaN, made quiet), 4 lanes.
static inline float32x4_t bf16_round_neon(float32x4_t v) {
    const uint32x4_t u = vreinterpretq_u32_f32(v), high = vdupq_n_u32(0xffff0000u);
    const uint32x4_t odd = vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1));
    const uint32x4_t rounded = vandq_u32(vaddq_u32(u, vaddq_u32(vdupq_n_u32(0x7fff), odd)), high);
    const uint32x4_t quiet = vandq_u32(vorrq_u32(u, vdupq_n_u32(0x400000)), high);
    return vreinterpretq_f32_u32(vbslq_u32(vceqq_f32(v, v), rounded, quiet));
}

// rows [MR_] of x (fp32, BF16 values, row stride Kp) times one block of 16 channels: acc[r][q] channels 4q..4q+3.
static inline __attribute__((always_inline)) void tile(const float *xr, int Kp, const uint16_t *blk, int MR_,
                                                       float32x4_t acc[MR][4]) {
    const uint32x4_t high = vdupq_n_u32(0xffff0000u);
    for (int r = 0; r < MR_; r++)
        for (int q = 0; q < 4; q++) acc[r][q] = vdupq_n_f32(0.0f);
    for (int g = 0; g < Kp / KG; g++) {
        float32x4_t even[4], odd[4];
        for (int q = 0; q < 4; q++) {
            const uint32x4_t w = vld1q_u32((const uint32_t *)(const void *)(blk + (size_t)g * NB * KG + q * 4 * KG));
            even[q] = vreinterpretq_f32_u32(vshlq_n_u32(w, 16));
            odd[q] = vreinterpretq_f32_u32(vandq_u32(w, high));
        }
        for (int r = 0; r < MR_; r++) {
            const float32x4_t xo = vdupq_n_f32(xr[(size_t)r * Kp + 2 * g + 1]);
            const float32x4_t xe = vdupq_n_f32(xr[(size_t)r * Kp + 2 * g]);
            for (int q = 0; q < 4; q++) acc[r][q] = vfmaq_f32(vfmaq_f32(acc[r][q], xo, odd[q]), xe, even[q]);
        }
    }
}

// Stores a tile (plus residual), fp32: rows m0..m0+mr of the block at column n.
static inline void store_tile(float32x4_t acc[MR][4], int mr, int m0, int n, int N, const float *residual, float *out) {
    for (int r = 0; r < mr; r++)
        for (int q = 0; q < 4; q++) {
            const int c = n + q * 4;
            if (c >= N) break;
            float vals[4];
            vst1q_f32(vals, acc[r][q]);
            const size_t at = (size_t)(m0 + r) * N + c;
            for (int i = 0; i < 4 && c + i < N; i++) out[at + i] = residual ? residual[at + i] + vals[i] : vals[i];
        }
}

// row[0:k] = the BF16 rounding of a[0:k] for whole vectors; returns k (bf16_gemm_fma.h rounds the rest).
static inline int bf16_round_run(const float *a, int K, float *row) {
    int k = 0;
    for (; k + 4 <= K; k += 4) vst1q_f32(row + k, bf16_round_neon(vld1q_f32(a + k)));
    return k;
}

#include "bf16_gemm_fma.h"
