// What the A8W8 GEMMs of the kernel families with signed activation codes (a8w8_avx2.c, a8w8_neon.c) share: the
// packed layout, the activation panels, the per-row quantization loop and the loop over column tiles and row
// passes. The family defines NB (output channels per block), KG (k values per 32-bit lane), NR (blocks per
// register tile), MR (rows per tile), acc_t (one block's INT32 accumulators) and code_t (an activation code in a
// panel: int8_t, or int16_t where the products are int16 multiplies) before including this, and quantize_row, tile
// and store_tile after it (declared here).
//
// Interface and results are a8w8_vnni.c's (npu/backends/cpu/vnni.py calls any family alike): weights packed as
// [N/NB][K/KG][NB][KG], wsum filled (for avx-vnni, whose activations are biased to unsigned inside its tile;
// the others' stay signed, so nothing needs correcting),
// activations in panels [M / P][Kp / KG][P][KG] of code_t with P = M <= MR ? M : MR.
#pragma once
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "prologue_common.h"

#define PARALLEL_QUANTIZE_MIN_ROWS 4  // rows are quantized in parallel from this many on
_Static_assert(MR == 4, "a8w8_gemm's row dispatch covers MR = 4 rows");

int a8w8_packed_k(int K) { return (K + KG - 1) / KG * KG; }
int a8w8_packed_n(int N) { return (N + NB * NR - 1) / (NB * NR) * (NB * NR); }
long a8w8_panel_bytes(int M, int K) { return (long)(M + MR - 1) / MR * MR * a8w8_packed_k(K) * (long)sizeof(code_t); }

// w: [N, K] int8 row-major -> wp: [Np/NB][Kp/KG][NB][KG]; wsum [Np] (as a8w8_vnni.c writes it).
void a8w8_pack(const int8_t *w, int N, int K, int8_t *wp, int32_t *wsum) {
    const int Kp = a8w8_packed_k(K), nblocks = a8w8_packed_n(N) / NB;
#pragma omp parallel for schedule(static)
    for (int b = 0; b < nblocks; b++) {
        int8_t *blk = wp + (size_t)b * Kp * NB;
        memset(blk, 0, (size_t)Kp * NB);
        for (int j = 0; j < NB; j++) {
            const int n = b * NB + j;
            int32_t s = 0;
            if (n < N) {
                const int8_t *row = w + (size_t)n * K;
                for (int k = 0; k < K; k++) {
                    s += row[k];
                    blk[((size_t)(k / KG) * NB + j) * KG + k % KG] = row[k];
                }
            }
            wsum[n] = s;
        }
    }
}

static inline int panel_rows(int M) { return M <= MR ? M : MR; }

static inline code_t *panel_row(code_t *xq, int m, int M, int Kp) {
    const int P = panel_rows(M);
    return xq + (size_t)(m / P) * P * Kp + (size_t)(m % P) * KG;
}

// The family's: a[0:K] -> one row of a panel (codes as a8w8_vnni.c's quantize_row, signed), returning the scale;
// MR_ rows of panel xp (of PR_ rows) against NR blocks from w0 (prefetching next, when given); the epilogue.
static float quantize_row(const float *a, int K, int Kp, code_t *out, size_t gstride);
static inline void tile(const code_t *xp, int PR_, int Kp, const int8_t *w0, int MR_, acc_t acc[MR][NR],
                        const int8_t *next);
static inline void store_tile(acc_t acc[MR][NR], int mr, int m0, int n0, const int32_t *wsum, const float *sw,
                              const float *sx, int N, const float *bias, const float *residual, float *out);

static void quantize_rows(const float *x, int M, int K, int Kp, int prologue, const float *norm_w, float eps,
                          code_t *xq, float *sx) {
#pragma omp parallel if (M >= PARALLEL_QUANTIZE_MIN_ROWS)
    {
        float *buf = prologue == PROLOGUE_NONE ? NULL : (float *)aligned_alloc(64, ((size_t)K * 4 + 63) / 64 * 64);
#pragma omp for schedule(static)
        for (int m = 0; m < M; m++)
            sx[m] = quantize_row(prologue_row(x, m, K, prologue, norm_w, eps, buf), K, Kp, panel_row(xq, m, M, Kp),
                                 (size_t)panel_rows(M) * KG);
        free(buf);
    }
}

// Rows of activation panels a thread keeps in its L2 cache while it runs them against its column tiles: chunks of
// this many bytes of panel (a Zen 3 core has 512 KiB of L2; the weights of one column tile, a few KiB, stay in L1)
#define PANEL_CHUNK_BYTES (192 * 1024)

// As a8w8_vnni.c a8w8_gemm (wsum for a family whose store_tile corrects biased activations); xq (a8w8_panel_bytes(M, K)
// bytes) and sx [M] are scratch. Each thread takes whole column tiles and runs the rows over one before the next (its
// weights stay in cache), in chunks of rows whose panels fit its L2 (without them a long prompt's panels would be
// read from L3 once per column tile); a single pass prefetches the next tile.
void a8w8_gemm(const float *x, int M, int K, int prologue, const float *norm_w, float eps, const int8_t *wp,
               const int32_t *wsum, const float *sw, const float *bias, int N, const float *residual, float *out,
               int8_t *xq, float *sx) {
    const int Kp = a8w8_packed_k(K), ntiles = a8w8_packed_n(N) / (NB * NR), pr = panel_rows(M);
    code_t *panels = (code_t *)xq;  // (scratch bytes; the workspace aligns them)
    quantize_rows(x, M, K, Kp, prologue, norm_w, eps, panels, sx);
    const long row_bytes = (long)Kp * (long)sizeof(code_t);
    int chunk = (int)(PANEL_CHUNK_BYTES / row_bytes) / MR * MR;
    if (chunk < MR) chunk = MR;
#pragma omp parallel
    for (int c0 = 0; c0 < M; c0 += chunk) {
        const int c1 = M - c0 < chunk ? M : c0 + chunk;
#pragma omp for schedule(static) nowait
        for (int t = 0; t < ntiles; t++) {
            const int8_t *w0 = wp + (size_t)t * NR * Kp * NB;
            const int8_t *next = M <= MR && t + 1 < ntiles ? w0 + (size_t)NR * Kp * NB : NULL;
            acc_t acc[MR][NR];
            for (int m0 = c0; m0 < c1; m0 += MR) {
                const int mr = c1 - m0 < MR ? c1 - m0 : MR;
                const code_t *xt = panel_row(panels, m0, M, Kp);
                switch (mr) {  // (a constant row count at each call, so the accumulators stay in registers)
                    case 1: tile(xt, pr, Kp, w0, 1, acc, next); break;
                    case 2: tile(xt, pr, Kp, w0, 2, acc, next); break;
                    case 3: tile(xt, pr, Kp, w0, 3, acc, next); break;
                    default: tile(xt, pr, Kp, w0, 4, acc, next); break;
                }
                store_tile(acc, mr, m0, t * NR * NB, wsum, sw, sx, N, bias, residual, out);
            }
        }
    }
}
