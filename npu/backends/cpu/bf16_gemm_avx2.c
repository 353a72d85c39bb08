// The AVX2 family's bf16_gemm.c: the BF16-weight GEMM for few rows (the BF16 lm_head of a decode step) with the
// same interface, weight packing and output (fp32 logits), for CPUs without AVX-512 BF16.
//
// out[m, n] = sum_k bf16(a[m, k]) * w[n, k] with a = prologue(x) (row_prologue_avx2.h), accumulated
// in fp32 by fused multiply-adds, per pair of k the odd product first and then the even one: the order of
// vdpbf16ps in Intel's definition. Each product of two BF16 values is exact in fp32, so every step rounds once,
// as there; vdpbf16ps also treats denormal inputs and results as zero, and hardware need not follow the
// definition's order, so the two families' logits are compared with a bound, not bit for bit (tests).
// Weights are bf16_gemm.c's packing, [N/16][K/2][16][2]: a k pair of 16 channels is two 32-byte loads, whose
// even BF16 halves widen to fp32 by a 16-bit shift and odd halves by a mask. Activations are kept as the fp32
// values of their BF16 rounding, row-major.
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "row_prologue_avx2.h"

#define NB 16  // output channels per block (bf16_gemm.c's packing)
#define KG 2   // k values per packed pair
#define NR 4   // column blocks per work item (bf16_gemm.c's tile: the padded N is a multiple of NB * NR)
#define MR 4   // rows per register tile (2 x MR accumulators, 4 weight vectors, 2 broadcasts: 14 of 16 ymm)

#include "bf16_packing.h"

typedef __m256 bf16_acc_row[2];  // one row's accumulators of a block

// fp32 -> the fp32 value of its BF16 rounding (to nearest even; NaN stays NaN), 8 lanes.
static inline __m256 bf16_round_256(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd));
    const __m256i rounded = _mm256_and_si256(r, _mm256_set1_epi32((int)0xffff0000u));
    const __m256i quiet = _mm256_and_si256(_mm256_or_si256(u, _mm256_set1_epi32(0x400000)), _mm256_set1_epi32((int)0xffff0000u));
    return _mm256_blendv_ps(_mm256_castsi256_ps(rounded), _mm256_castsi256_ps(quiet), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}

// rows [MR_] of x (fp32, BF16 values, row stride Kp) times one block of 16 channels: acc[r][0] channels 0-7, [1] 8-15.
static inline __attribute__((always_inline)) void tile(const float *xr, int Kp, const uint16_t *blk, int MR_,
                                                       __m256 acc[MR][2]) {
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    for (int r = 0; r < MR_; r++) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
#pragma GCC unroll 2
    for (int g = 0; g < Kp / KG; g++) {
        const __m256i w0 = _mm256_loadu_si256((const __m256i *)(blk + (size_t)g * NB * KG));
        const __m256i w1 = _mm256_loadu_si256((const __m256i *)(blk + (size_t)g * NB * KG + NB));
        const __m256 even0 = _mm256_castsi256_ps(_mm256_slli_epi32(w0, 16)), odd0 = _mm256_castsi256_ps(_mm256_and_si256(w0, high));
        const __m256 even1 = _mm256_castsi256_ps(_mm256_slli_epi32(w1, 16)), odd1 = _mm256_castsi256_ps(_mm256_and_si256(w1, high));
        for (int r = 0; r < MR_; r++) {
            const __m256 xo = _mm256_broadcast_ss(xr + (size_t)r * Kp + 2 * g + 1);
            const __m256 xe = _mm256_broadcast_ss(xr + (size_t)r * Kp + 2 * g);
            acc[r][0] = _mm256_fmadd_ps(xe, even0, _mm256_fmadd_ps(xo, odd0, acc[r][0]));
            acc[r][1] = _mm256_fmadd_ps(xe, even1, _mm256_fmadd_ps(xo, odd1, acc[r][1]));
        }
    }
}

// Stores a tile (plus residual), fp32: rows m0..m0+mr of the block at column n.
static inline void store_tile(__m256 acc[MR][2], int mr, int m0, int n, int N, const float *residual, float *out) {
    for (int r = 0; r < mr; r++)
        for (int h = 0; h < 2; h++) {
            const int c = n + h * 8;
            if (c >= N) break;
            const __m256i in_n = _mm256_cmpgt_epi32(_mm256_set1_epi32(N - c), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
            __m256 v = acc[r][h];
            const size_t at = (size_t)(m0 + r) * N + c;
            if (residual) v = _mm256_add_ps(_mm256_maskload_ps(residual + at, in_n), v);
            _mm256_maskstore_ps(out + at, in_n, v);
        }
}

// row[0:k] = the BF16 rounding of a[0:k] for whole vectors; returns k (bf16_gemm_fma.h rounds the rest).
static inline int bf16_round_run(const float *a, int K, float *row) {
    int k = 0;
    for (; k + 8 <= K; k += 8) _mm256_storeu_ps(row + k, bf16_round_256(_mm256_loadu_ps(a + k)));
    return k;
}

#include "bf16_gemm_fma.h"
