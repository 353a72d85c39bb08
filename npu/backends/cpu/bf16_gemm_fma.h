// The BF16 GEMM of the families without a BF16 dot-product instruction (bf16_gemm_avx2.c, bf16_gemm_neon.c): the
// entry point, its activation rows (the fp32 values of their BF16 rounding, row-major) and its loop over column
// blocks and row tiles. The family includes this last, after bf16_packing.h and its definitions of NB, KG, NR, MR,
// bf16_acc_row (one row's accumulators of a block) and of:
//   bf16_round_run(a, K, row)                   row[0:k] = bf16 rounding of a[0:k] on its vectors; returns k
//   tile(xr, Kp, blk, R, acc)                   rows [R] of x times one block of NB channels, fused multiply-adds
//                                               per pair of k, the odd product first (vdpbf16ps's defined order)
//   store_tile(acc, mr, m0, n, N, residual, out)   residual, store (fp32)
#pragma once
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tile_dispatch.h"

// Bytes of the activation rows for M rows (the xb scratch of bf16_gemm): fp32 here.
long bf16_panel_bytes(int M, int K) { return (long)M * bf16_packed_k(K) * 4; }

// As bf16_gemm.c bf16_gemm: x [M, K] fp32 (prologue as in the family's row prologue); out [M, N] fp32, plus
// residual [M, N] when not NULL; xb (bf16_panel_bytes(M, K)
// bytes) is caller-provided scratch.
void bf16_gemm(const float *x, int M, int K, int prologue, const float *norm_w, float eps, const uint16_t *wp, int N,
               const float *residual, float *out, uint16_t *xb) {
    const int Kp = bf16_packed_k(K), nblocks = (N + NB - 1) / NB;
    float *xa = (float *)xb;
    float *buf = prologue == PROLOGUE_NONE ? NULL : (float *)aligned_alloc(64, ((size_t)K * 4 + 63) / 64 * 64);
    for (int m = 0; m < M; m++) {
        const float *a = prologue_row(x, m, K, prologue, norm_w, eps, buf);
        float *row = xa + (size_t)m * Kp;
        for (int k = bf16_round_run(a, K, row); k < Kp; k++) {
            const uint32_t bits = k < K ? (uint32_t)bf16_round_scalar(a[k]) << 16 : 0;
            memcpy(row + k, &bits, 4);
        }
    }
    free(buf);
#pragma omp parallel for schedule(static)
    for (int b = 0; b < nblocks; b++) {
        const uint16_t *blk = wp + (size_t)b * Kp * NB;
        bf16_acc_row acc[MR];
        for (int m0 = 0; m0 < M; m0 += MR) {
            const int mr = M - m0 < MR ? M - m0 : MR;
            const float *xr = xa + (size_t)m0 * Kp;
#define ROW_TILE(R) tile(xr, Kp, blk, R, acc)
            DISPATCH_ROWS_4(mr, ROW_TILE)
#undef ROW_TILE
            store_tile(acc, mr, m0, b * NB, N, residual, out);
        }
    }
}
