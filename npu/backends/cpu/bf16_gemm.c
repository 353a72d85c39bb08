// BF16-weight GEMM for few rows (the BF16 lm_head of a decode step), AVX-512 BF16, built by vnni.py.
//
// out[m, n] = sum_k bf16(a[m, k]) * w[n, k] with a = prologue(x) (row_prologue.h), accumulated and returned in
// fp32: the logits are not rounded to BF16 (as transformers and vLLM leave a BF16 lm_head's; llama.cpp keeps
// fp32). On the default model that rounding cost perplexity +0.29 % -> +0.38 % against the float model and mean
// KLD 0.0024 -> 0.0028 (docs/quality.md): a logit of 20 moved by up to 1/16.
// Weights are packed as [N/16][K/2][16][2]: one 64-byte load gives 2 consecutive k of 16 channels, so a broadcast
// of one activation pair and one vdpbf16ps advance 16 accumulators.
// PyTorch's BF16 F.linear streams this weight at about 17 GB/s here; the kernel reads it at the memory
// bandwidth (benchmarks/kernels.py).
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "row_prologue.h"
#include "tile_dispatch.h"

#define NB 16          // output channels per block (one zmm of fp32)
#define KG 2           // k values per vdpbf16ps lane
#define NR 4           // column blocks per register tile
#define MR 4           // rows per register tile when M <= MR (one pass)
#define MR_WIDE 8      // more rows: passes of an 8 x 2 tile, as in a8w8_vnni.c
#define NR_WIDE 2
#define PANEL_ROWS MR_WIDE  // activations in panels [M / P][Kp / 2][P][2], P = M <= MR ? M : 8 (as in a8w8_vnni.c)

_Static_assert(MR == 4 && MR_WIDE == 8, "the row dispatch (tile_dispatch.h) covers MR and MR_WIDE rows");

#include "bf16_packing.h"

// Bytes of the BF16 activation panels for M rows (the xb scratch of bf16_gemm).
long bf16_panel_bytes(int M, int K) { return (long)(M + PANEL_ROWS - 1) / PANEL_ROWS * PANEL_ROWS * bf16_packed_k(K) * 2; }

// As in a8w8_vnni.c: an MR_ x NR_ tile from panel xp of PR_ rows; with several row passes, pass p prefetches every P-th
// k-group of the next tile (with one pass it does not: measured no faster for this kernel, unlike the INT8 one).
static inline __attribute__((always_inline)) void tile(const uint16_t *xp, int PR_, int Kp, const uint16_t *w0, int MR_, int NR_,
                                                       __m512 acc[MR_WIDE][NR], const uint16_t *next, int pass,
                                                       int npasses) {
    const size_t bstride = (size_t)Kp * NB;
    for (int r = 0; r < MR_; r++)
        for (int j = 0; j < NR_; j++) acc[r][j] = _mm512_setzero_ps();
    const int ngroups = Kp / KG;
    int prefetch_at = next ? pass : ngroups;
#pragma GCC unroll 4  // as in a8w8_vnni.c
    for (int g = 0; g < ngroups; g++) {
        if (g == prefetch_at) {
            for (int j = 0; j < NR_; j++) _mm_prefetch((const char *)(next + j * bstride + (size_t)g * NB * KG), _MM_HINT_T1);
            prefetch_at += npasses;
        }
        __m512bh wv[NR];
        for (int j = 0; j < NR_; j++) wv[j] = (__m512bh)_mm512_loadu_si512((const void *)(w0 + j * bstride + (size_t)g * NB * KG));
        const uint16_t *xg = xp + (size_t)g * PR_ * KG;
        for (int r = 0; r < MR_; r++) {
            int32_t pair;
            memcpy(&pair, xg + r * KG, 4);
            const __m512bh b = (__m512bh)_mm512_set1_epi32(pair);
            for (int j = 0; j < NR_; j++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], b, wv[j]);
        }
    }
}

// Stores a tile (plus residual), fp32: rows m0..m0+mr, NR_ column blocks from column n0.
static inline __attribute__((always_inline)) void store_tile(__m512 acc[MR_WIDE][NR], int mr, int NR_, int m0, int n0,
                                                             int N, const float *residual, float *out) {
    for (int r = 0; r < mr; r++)
        for (int j = 0; j < NR_; j++) {
            const int n = n0 + j * NB;
            if (n >= N) break;
            const __mmask16 mask = N - n >= NB ? (__mmask16)0xFFFF : (__mmask16)((1u << (N - n)) - 1u);
            __m512 v = acc[r][j];
            const size_t at = (size_t)(m0 + r) * N + n;
            if (residual) v = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, residual + at), v);
            _mm512_mask_storeu_ps(out + at, mask, v);
        }
}

// x [M, K] fp32 (prologue as in row_prologue.h); out [M, N] fp32, plus residual [M, N] when not NULL;
// xb (bf16_panel_bytes(M, K) bytes) is caller-provided scratch.
void bf16_gemm(const float *x, int M, int K, int prologue, const float *norm_w, float eps, const uint16_t *wp, int N,
               const float *residual, float *out, uint16_t *xb) {
    const int Kp = bf16_packed_k(K), ntiles = bf16_packed_n(N) / (NB * NR);
    const int P = M <= MR ? M : PANEL_ROWS;
    float *buf = prologue == PROLOGUE_NONE ? NULL : (float *)aligned_alloc(64, ((size_t)K * 4 + 63) / 64 * 64);
    for (int m = 0; m < M; m++) {
        const float *a = prologue_row(x, m, K, prologue, norm_w, eps, buf);
        uint16_t *row = xb + (size_t)(m / P) * P * Kp + (size_t)(m % P) * KG;
        for (int k = 0; k < Kp; k++) row[(size_t)(k / KG) * P * KG + k % KG] = k < K ? bf16_round_scalar(a[k]) : 0;
    }
    free(buf);
#pragma omp parallel for schedule(static)
    for (int t = 0; t < ntiles; t++) {
        const uint16_t *w0 = wp + (size_t)t * NR * Kp * NB;
        const int n0 = t * NR * NB;
        __m512 acc[MR_WIDE][NR];
        if (M <= MR) {
#define ONE_PASS_TILE(R) tile(xb, R, Kp, w0, R, NR, acc, NULL, 0, 1)
            DISPATCH_ROWS_4(M, ONE_PASS_TILE)
#undef ONE_PASS_TILE
            store_tile(acc, M, NR, 0, n0, N, residual, out);
            continue;
        }
        const int npasses = (M + MR_WIDE - 1) / MR_WIDE;
        const uint16_t *next = t + 1 < ntiles ? w0 + (size_t)NR * Kp * NB : NULL;
        for (int s = 0; s < NR / NR_WIDE; s++) {
            const uint16_t *ws = w0 + (size_t)s * NR_WIDE * Kp * NB;
            const uint16_t *nx = s + 1 < NR / NR_WIDE ? ws + (size_t)NR_WIDE * Kp * NB : next;
            for (int m0 = 0; m0 < M; m0 += MR_WIDE) {
                const int mr = M - m0 < MR_WIDE ? M - m0 : MR_WIDE, pass = m0 / MR_WIDE;
                const uint16_t *xt = xb + (size_t)m0 * Kp;  // m0 starts a panel
#define WIDE_TILE(R) tile(xt, PANEL_ROWS, Kp, ws, R, NR_WIDE, acc, nx, pass, npasses)
                DISPATCH_ROWS_8(mr, WIDE_TILE)
#undef WIDE_TILE
                store_tile(acc, mr, NR_WIDE, m0, n0 + s * NR_WIDE * NB, N, residual, out);
            }
        }
    }
}
