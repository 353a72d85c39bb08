// A8W8 GEMM with AVX-512 VNNI and its fused prologue / epilogue, built by npu/backends/cpu/vnni.py with gcc.
//
// out[m, n] = residual[m, n] + ((sum_k q_a[m, k] * q_w[n, k]) * s_a[m] * s_w[n] + bias[n]), INT32 accumulation,
// fp32 out (bias and residual optional; the order of the adds is transformers': residual + linear(x)).
// a = prologue(x) is what the layer feeds the linear:
//   PROLOGUE_NONE     a = x
//   PROLOGUE_RMSNORM  a = w * (x * 1/sqrt(mean(x^2) + eps))          (transformers' RMSNorm in fp32)
//   PROLOGUE_SILU_MUL a = silu(x[:, :K]) * x[:, K:]                    (x has 2K columns: gate | up)
// and is quantized here, per token, exactly as loaders.quantization.quantize_activations:
//   s = absmax / 127; q = clamp(round_half_even(a / max(s, 1e-30)), -127, 127).
// vpdpbusd multiplies unsigned by signed bytes, so q_a is stored as q_a + 128 and the product is
// corrected with 128 * sum_k q_w[n, k] (precomputed per output channel): exact in INT32.
// Weights are packed as [N/16][K/4][16][4]: one 64-byte load gives 4 consecutive k of 16 channels,
// so a broadcast of 4 activation bytes and one vpdpbusd advance 16 accumulators, with no horizontal sums.
// The micro-kernel keeps a tile of such accumulators in registers (4 rows x 4 column blocks for M <= 4, passes
// of 8 rows x 2 column blocks above), so each weight load feeds one multiply-add per row and each activation
// broadcast one per column block.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"
#include "row_prologue.h"
#include "tile_dispatch.h"

#define NB 16          // output channels per block (one zmm of int32)
#define KG 4           // k values per vpdpbusd lane
#define NR 4           // column blocks per register tile
#define MR 4           // activation rows per register tile: 16 accumulators (6 x 4 = 24 spilled with gcc, measured)
// Rows per pass when M > MR: an 8 x 2 tile (16 accumulators; each weight load feeds 8 rows). A/B against
// 4 x 4 passes, [3072 x 1024] weights from DRAM: 11 % faster at M = 16, 3-5 % at M = 64, the same at M = 2048.
#define MR_WIDE 8
#define NR_WIDE 2
#define PANEL_ROWS MR_WIDE
// Rows per block above MR: a thread computes its column tiles for one block of rows before the next, so its
// output stores stay within a few pages (each output row of a large M is its own 4 KiB page; sweeping all
// M rows per column tile missed the TLB on nearly every store). 32..256 rows timed alike in a C harness
// (not kept; the M = 2048 row of benchmarks/kernels.py shows the combined effect with STREAM_MIN_BYTES).
#define ROW_BLOCK 128
// Outputs of at least this many bytes are written with non-temporal stores: larger than half the 32 MiB
// L3, they would not stay cached for the next kernel anyway, and streaming skips the read-for-ownership
// (the larger part of the M = 2048 gain in that harness).
#define STREAM_MIN_BYTES (16L << 20)
#define MIN_DIVISOR 1e-30f
#define QMAX 127.0f
// Rows are quantized in parallel from this many on; below it the thread start costs more than it saves.
#define PARALLEL_QUANTIZE_MIN_ROWS 4

_Static_assert(MR == 4 && MR_WIDE == 8, "the row dispatch (tile_dispatch.h) covers MR and MR_WIDE rows");

int a8w8_packed_k(int K) { return (K + KG - 1) / KG * KG; }
int a8w8_packed_n(int N) { return (N + NB * NR - 1) / (NB * NR) * (NB * NR); }
// Bytes of the quantized activation panels for M rows (the xq scratch of a8w8_gemm).
long a8w8_panel_bytes(int M, int K) { return (long)(M + PANEL_ROWS - 1) / PANEL_ROWS * PANEL_ROWS * a8w8_packed_k(K); }

// w: [N, K] int8 row-major -> wp: [Np/16][Kp/4][16][4], wsum: [Np]. Blocks of 16 output channels are packed in
// parallel (each writes its own Kp * 16 bytes): repacking is most of a large model's load time otherwise.
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
                int k = 0;
                for (; k + KG <= K; k += KG) {  // a whole group of KG values is one 4-byte move
                    memcpy(blk + ((size_t)(k / KG) * NB + j) * KG, row + k, KG);
                    s += row[k] + row[k + 1] + row[k + 2] + row[k + 3];
                }
                for (; k < K; k++) {
                    s += row[k];
                    blk[((size_t)(k / KG) * NB + j) * KG + k % KG] = row[k];
                }
            }
            wsum[n] = s;
        }
    }
}

static inline void store_groups(uint8_t *out, size_t gstride, __m128i bytes) {
    uint32_t w[4];
    _mm_storeu_si128((__m128i *)w, bytes);
    for (int i = 0; i < 4; i++) memcpy(out + i * gstride, &w[i], 4);
}

// a[0:K] fp32 -> one row of an activation panel (q + 128, k-group g at out + g * gstride, K..Kp padded with
// q = 0); returns the scale.
static float quantize_row(const float *a, int K, int Kp, uint8_t *out, size_t gstride) {
    __m512 vmax = _mm512_setzero_ps();
    int k = 0;
    for (; k + 16 <= K; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(a + k)));
    float absmax = _mm512_reduce_max_ps(vmax);
    for (; k < K; k++) absmax = fmaxf(absmax, fabsf(a[k]));
    const float s = absmax / QMAX, div = s > MIN_DIVISOR ? s : MIN_DIVISOR;
    const __m512 vdiv = _mm512_set1_ps(div), lo = _mm512_set1_ps(-QMAX), hi = _mm512_set1_ps(QMAX);
    for (k = 0; k + 16 <= K; k += 16) {
        __m512 q = _mm512_div_ps(_mm512_loadu_ps(a + k), vdiv);
        q = _mm512_roundscale_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        q = _mm512_min_ps(_mm512_max_ps(q, lo), hi);
        __m512i qi = _mm512_add_epi32(_mm512_cvtps_epi32(q), _mm512_set1_epi32(128));
        store_groups(out + (size_t)(k / KG) * gstride, gstride, _mm512_cvtepi32_epi8(qi));
    }
    for (; k < K; k++) {
        float q = nearbyintf(a[k] / div);
        q = fminf(fmaxf(q, -QMAX), QMAX);
        out[(size_t)(k / KG) * gstride + k % KG] = (uint8_t)((int)q + 128);
    }
    for (; k < Kp; k++) out[(size_t)(k / KG) * gstride + k % KG] = 128;  // q = 0 (weight is 0 there too)
    return s;
}

// Quantized activations are stored in panels of P rows, [M / P][Kp / 4][P][4]: the k-group g of all rows of a
// panel is one run of 4P bytes, so the micro-kernel broadcasts row r's bytes from one pointer plus a constant
// (r * 4) instead of keeping a pointer per row (gcc spilled them at 8 rows). P = M when M <= MR (one pass, the
// activations stay one compact run; a wider panel measured 3-8 % slower at M = 1..4), else PANEL_ROWS.
static inline int panel_rows(int M) { return M <= MR ? M : PANEL_ROWS; }

static inline uint8_t *panel_row(uint8_t *xq, int m, int M, int Kp) {
    const int P = panel_rows(M);
    return xq + (size_t)(m / P) * P * Kp + (size_t)(m % P) * KG;
}

static void quantize_rows(const float *x, int M, int K, int Kp, int prologue, const float *norm_w, float eps,
                          uint8_t *xq, float *sx) {
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

// One MR_ x NR_ register tile: the first MR_ rows of panel xp (of PR_ rows) against NR_ consecutive packed column blocks
// starting at w0. MR_ and NR_ are compile-time constants at every call site, so the accumulators stay in registers.
// Pass p of the P row passes over one column tile also prefetches every P-th k-group of the next tile
// (next != NULL), so that its DRAM reads overlap the passes that compute from cache; with one pass
// that is the whole next tile, one tile ahead of the hardware prefetcher (4 % faster at M = 1, 2 in an A/B run).
static inline __attribute__((always_inline)) void tile(const uint8_t *xp, int PR_, int Kp, const int8_t *w0, int MR_, int NR_,
                                                       __m512i acc[MR_WIDE][NR], const int8_t *next, int pass,
                                                       int npasses) {
    const size_t bstride = (size_t)Kp * NB;
    for (int r = 0; r < MR_; r++)
        for (int j = 0; j < NR_; j++) acc[r][j] = _mm512_setzero_si512();
    const int ngroups = Kp / KG;
    int prefetch_at = next ? pass : ngroups;  // the next k-group whose lines of the next tile this pass fetches
#pragma GCC unroll 4  // measured: +5-20 % at M = 16..2048 over the rolled loop
    for (int g = 0; g < ngroups; g++) {
        if (g == prefetch_at) {
            for (int j = 0; j < NR_; j++) _mm_prefetch((const char *)(next + j * bstride + (size_t)g * NB * KG), _MM_HINT_T1);
            prefetch_at += npasses;
        }
        __m512i wv[NR];
        for (int j = 0; j < NR_; j++) wv[j] = _mm512_loadu_si512((const void *)(w0 + j * bstride + (size_t)g * NB * KG));
        const uint8_t *xg = xp + (size_t)g * PR_ * KG;
        for (int r = 0; r < MR_; r++) {
            int32_t xb;
            memcpy(&xb, xg + r * KG, 4);
            const __m512i b = _mm512_set1_epi32(xb);
            for (int j = 0; j < NR_; j++) acc[r][j] = _mm512_dpbusd_epi32(acc[r][j], b, wv[j]);
        }
    }
}

// Epilogue of one tile: rows m0..m0+mr of NR_ column blocks starting at block column n0, row by row (a row's
// blocks are adjacent in memory). stream: write with non-temporal stores (see STREAM_MIN_BYTES).
static inline __attribute__((always_inline)) void store_tile(__m512i acc[MR_WIDE][NR], int mr, int NR_, int m0,
                                                             int n0, const int32_t *wsum, const float *sw,
                                                             const float *sx, int N, const float *bias,
                                                             const float *residual, float *out, int stream) {
    __m512i comp[NR];  // 128 * wsum, the correction for the + 128 stored with the activations
    __m512 vsw[NR], vb[NR];
    for (int j = 0; j < NR_; j++) {
        const int n = n0 + j * NB < N ? n0 + j * NB : 0;  // (blocks past N are not stored)
        comp[j] = _mm512_slli_epi32(_mm512_loadu_si512((const void *)(wsum + n)), 7);
        vsw[j] = _mm512_loadu_ps(sw + n);
        if (bias) vb[j] = _mm512_loadu_ps(bias + n);  // padded to Np like sw
    }
    for (int r = 0; r < mr; r++) {
        const __m512 vsx = _mm512_set1_ps(sx[m0 + r]);
        for (int j = 0; j < NR_; j++) {
            const int n = n0 + j * NB;
            if (n >= N) break;
            const __mmask16 mask = N - n >= NB ? (__mmask16)0xFFFF : (__mmask16)((1u << (N - n)) - 1u);
            __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][j], comp[j]));
            v = _mm512_mul_ps(_mm512_mul_ps(v, vsx), vsw[j]);
            if (bias) v = _mm512_add_ps(v, vb[j]);
            const size_t at = (size_t)(m0 + r) * N + n;
            if (residual) v = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, residual + at), v);
            if (stream && mask == 0xFFFF)
                _mm512_stream_ps(out + at, v);
            else
                _mm512_mask_storeu_ps(out + at, mask, v);
        }
    }
}

// x [M, K] fp32 ([M, 2K] for PROLOGUE_SILU_MUL); wp/wsum/sw packed by a8w8_pack (sw padded to Np);
// bias [Np] fp32 (padded like sw) or NULL; residual [M, N] fp32 or NULL; out [M, N] fp32 (may alias residual).
// xq (a8w8_panel_bytes(M, K) bytes, 64-byte aligned) and sx [M] fp32 are caller-provided scratch.
void a8w8_gemm(const float *x, int M, int K, int prologue, const float *norm_w, float eps, const int8_t *wp,
               const int32_t *wsum, const float *sw, const float *bias, int N, const float *residual, float *out,
               uint8_t *xq, float *sx) {
    const int Kp = a8w8_packed_k(K), ntiles = a8w8_packed_n(N) / (NB * NR);
    quantize_rows(x, M, K, Kp, prologue, norm_w, eps, xq, sx);
    if (M <= MR) {  // one pass: every weight byte read once, feeding M multiply-adds
#pragma omp parallel for schedule(static)
        for (int t = 0; t < ntiles; t++) {
            const int8_t *w0 = wp + (size_t)t * NR * Kp * NB;
            const int8_t *next = t + 1 < ntiles ? w0 + (size_t)NR * Kp * NB : NULL;
            __m512i acc[MR_WIDE][NR];
#define ONE_PASS_TILE(R) tile(xq, R, Kp, w0, R, NR, acc, next, 0, 1)
            DISPATCH_ROWS_4(M, ONE_PASS_TILE)
#undef ONE_PASS_TILE
            store_tile(acc, M, NR, 0, t * NR * NB, wsum, sw, sx, N, bias, residual, out, 0);
        }
        return;
    }
    // More rows: passes of up to MR_WIDE rows over NR_WIDE column blocks at a time, ROW_BLOCK rows at a time.
    const int stream = (size_t)M * N * sizeof(float) >= STREAM_MIN_BYTES && N % NB == 0 && (uintptr_t)out % 64 == 0;
#pragma omp parallel
    {
        for (int mb0 = 0; mb0 < M; mb0 += ROW_BLOCK) {
            const int mb1 = mb0 + ROW_BLOCK < M ? mb0 + ROW_BLOCK : M, npasses = (mb1 - mb0 + MR_WIDE - 1) / MR_WIDE;
            // static schedule: every row block gives a thread the same column tiles (and no barrier is needed:
            // the blocks write disjoint rows)
#pragma omp for schedule(static) nowait
            for (int t = 0; t < ntiles; t++) {
                const int8_t *w0 = wp + (size_t)t * NR * Kp * NB;
                const int8_t *next = t + 1 < ntiles ? w0 + (size_t)NR * Kp * NB : NULL;
                __m512i acc[MR_WIDE][NR];
                for (int s = 0; s < NR / NR_WIDE; s++) {
                    const int8_t *ws = w0 + (size_t)s * NR_WIDE * Kp * NB;
                    const int8_t *nx = s + 1 < NR / NR_WIDE ? ws + (size_t)NR_WIDE * Kp * NB : next;
                    for (int m0 = mb0; m0 < mb1; m0 += MR_WIDE) {
                        const int mr = mb1 - m0 < MR_WIDE ? mb1 - m0 : MR_WIDE, pass = (m0 - mb0) / MR_WIDE;
                        const uint8_t *xt = panel_row(xq, m0, M, Kp);  // m0 starts a panel (MR_WIDE == PANEL_ROWS)
#define WIDE_TILE(R) tile(xt, PANEL_ROWS, Kp, ws, R, NR_WIDE, acc, nx, pass, npasses)
                        DISPATCH_ROWS_8(mr, WIDE_TILE)
#undef WIDE_TILE
                        store_tile(acc, mr, NR_WIDE, m0, t * NR * NB + s * NR_WIDE * NB, wsum, sw, sx, N, bias,
                                   residual, out, stream);
                    }
                }
            }
        }
        if (stream) _mm_sfence();  // non-temporal stores are weakly ordered: drain them before the join
    }
}
