// What the BF16 GEMMs of every kernel family (bf16_gemm.c, bf16_gemm_avx2.c) share: the packed weight layout
// [N/16][K/2][16][2] (NB channels, KG = 2 consecutive k per 32-bit pair), its padding to whole column tiles of NB * NR
// channels, and the scalar BF16 rounding. The family defines NB, KG and NR before including this.
#pragma once
#include <stdint.h>
#include <string.h>

int bf16_packed_k(int K) { return (K + KG - 1) / KG * KG; }
int bf16_packed_n(int N) { return (N + NB * NR - 1) / (NB * NR) * (NB * NR); }

// w: [N, K] bf16 (as uint16) row-major -> wp: [Np/16][Kp/2][16][2]
void bf16_pack(const uint16_t *w, int N, int K, uint16_t *wp) {  // blocks in parallel, as a8w8_pack
    const int Kp = bf16_packed_k(K), nblocks = bf16_packed_n(N) / NB;
#pragma omp parallel for schedule(static)
    for (int b = 0; b < nblocks; b++) {
        uint16_t *blk = wp + (size_t)b * Kp * NB;
        memset(blk, 0, (size_t)Kp * NB * sizeof(uint16_t));
        for (int j = 0; j < NB && b * NB + j < N; j++) {
            const uint16_t *row = w + (size_t)(b * NB + j) * K;
            for (int k = 0; k < K; k++) blk[((size_t)(k / KG) * NB + j) * KG + k % KG] = row[k];
        }
    }
}

static inline uint16_t bf16_round_scalar(float f) {  // round to nearest even, as torch's .to(bfloat16)
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
