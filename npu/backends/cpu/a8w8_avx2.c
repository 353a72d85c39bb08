// A8W8 GEMM for CPUs with AVX2 (and FMA) but without AVX-512 VNNI, built by npu/backends/cpu/vnni.py as the
// "avx2" kernel family, and with AVX-VNNI's vpdpbusd as the "avx-vnni" family: the same entry points, arguments and
// results as a8w8_vnni.c, bit for bit.
//
// out[m, n] = residual[m, n] + ((sum_k q_a[m, k] * q_w[n, k]) * s_a[m] * s_w[n] + bias[n]), INT32 accumulation,
// with a = prologue(x) (row_prologue_avx2.h) quantized per token exactly as a8w8_vnni.c does.
//
// The products (avx2): vpmaddwd multiplies int16 by int16 and adds adjacent pairs into int32. The activation codes
// are kept as int16 in the panels, the weights are widened from bytes as they are loaded (vpmovsxbw), and a pair
// sums to at most 2 * 128 * 127 = 32512: the exact INT32 dot product, so the result equals the VNNI kernel's.
// Two instructions per 16 multiply-adds (vpmaddwd, vpaddd) where llama.cpp's Q8_0 dot product, which this file
// used until 2026-12-06, takes four per 32 (vpsignb, vpmaddubsw, vpmaddwd against ones, vpaddd): fewer
// instructions on the vector ALU ports that bound both, and nothing that saturates. On Zen 3 the decoder linears at
// batch 16 take 1/1.2 of the time (docs/performance.md).
// avx-vnni (built with -DA8W8_AVX_VNNI): one 256-bit vpdpbusd per 32 multiply-adds on byte codes biased to unsigned.
// Weights are packed as [N/8][K/4][8][4]: one 32-byte load gives 4 consecutive k of 8 channels.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "row_prologue_avx2.h"

#define NB 8  // output channels per block (one ymm of int32)
#define KG 4  // k values per 32-bit lane
#define MR 4  // activation rows per register tile
#if defined(A8W8_AVX_VNNI)
#define NR 2               // column blocks per register tile (8 accumulators of the 16 ymm registers)
typedef __m256i acc_t;     // the 8 channels' sums
typedef __m256i wblock_t;  // one k-group of a block: 4 k x 8 channels, bytes as packed
typedef int8_t code_t;     // (biased to unsigned per broadcast)
#else
#define NR 1  // column blocks per register tile (8 accumulators of the 16 ymm registers)
// a block's sums as two halves: lo holds channels 0-3, hi 4-7, each channel's sum split over its k-group's first and
// second pair of k (adjacent int32 lanes), added together in block_sums
typedef struct {
    __m256i lo, hi;
} acc_t;
typedef acc_t wblock_t;  // one k-group of a block widened to int16: channels 0-3 (4 k each), then 4-7
typedef int16_t code_t;
#endif
#include "a8w8_signed.h"

#define MIN_DIVISOR 1e-30f
#define QMAX 127.0f

// a[0:K] fp32 -> one row of an activation panel (signed codes, k-group g at out + g * gstride, K..Kp zero);
// returns the scale. The same operations as a8w8_vnni.c quantize_row, so the same codes.
static float quantize_row(const float *a, int K, int Kp, code_t *out, size_t gstride) {
    __m256 vmax = _mm256_setzero_ps();
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    int k = 0;
    for (; k + 8 <= K; k += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(_mm256_loadu_ps(a + k), abs_mask));
    float lanes[8], absmax = 0.0f;
    _mm256_storeu_ps(lanes, vmax);
    for (int i = 0; i < 8; i++) absmax = fmaxf(absmax, lanes[i]);
    for (; k < K; k++) absmax = fmaxf(absmax, fabsf(a[k]));
    const float s = absmax / QMAX, div = s > MIN_DIVISOR ? s : MIN_DIVISOR;
    const __m256 vdiv = _mm256_set1_ps(div), lo = _mm256_set1_ps(-QMAX), hi = _mm256_set1_ps(QMAX);
    for (k = 0; k + 8 <= K; k += 8) {
        __m256 q = _mm256_div_ps(_mm256_loadu_ps(a + k), vdiv);
        q = _mm256_round_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        q = _mm256_min_ps(_mm256_max_ps(q, lo), hi);
        int32_t codes[8];
        _mm256_storeu_si256((__m256i *)codes, _mm256_cvtps_epi32(q));
        for (int i = 0; i < 8; i++) out[(size_t)((k + i) / KG) * gstride + (k + i) % KG] = (code_t)codes[i];
    }
    for (; k < K; k++) {
        float q = nearbyintf(a[k] / div);
        q = fminf(fmaxf(q, -QMAX), QMAX);
        out[(size_t)(k / KG) * gstride + k % KG] = (code_t)(int)q;
    }
    for (; k < Kp; k++) out[(size_t)(k / KG) * gstride + k % KG] = 0;
    return s;
}

// The products of one k-group: load_block reads a block's weights, load_codes broadcasts one row's 4 activation
// codes, dot4_add adds their products to the block's accumulators, block_sums gives the 8 channels' INT32 sums.
//   avx2: the weights widened to int16 (vpmovsxbw), the codes broadcast as 4 int16, vpmaddwd + vpaddd.
//   avx-vnni (built with -DA8W8_AVX_VNNI): the activations biased to unsigned as a8w8_vnni.c does (code + 128, one
//   xor per broadcast), then one vpdpbusd against the weights as packed; store_tile takes the bias's share,
//   128 * wsum[n], off. A8W8_AVX_VNNI_EVEX makes that the AVX-512 VL encoding of the same instruction, so that the
//   tests run this family on AVX-512 VNNI CPUs too.
#if defined(A8W8_AVX_VNNI)
#define ACTIVATION_BIAS_LOG2 7  // codes + 128
static inline acc_t acc_zero(void) { return _mm256_setzero_si256(); }
static inline wblock_t load_block(const int8_t *w) { return _mm256_loadu_si256((const __m256i *)w); }
static inline __m256i load_codes(const code_t *x) {
    int32_t xb;
    memcpy(&xb, x, 4);
    return _mm256_xor_si256(_mm256_set1_epi32(xb), _mm256_set1_epi8((char)0x80));
}
static inline acc_t dot4_add(acc_t acc, wblock_t w, __m256i b) {
#if defined(A8W8_AVX_VNNI_EVEX)
    return _mm256_dpbusd_epi32(acc, b, w);
#else
    return _mm256_dpbusd_avx_epi32(acc, b, w);
#endif
}
static inline __m256i block_sums(acc_t acc) { return acc; }
#else
#define ACTIVATION_BIAS_LOG2 0  // none
static inline acc_t acc_zero(void) { return (acc_t){_mm256_setzero_si256(), _mm256_setzero_si256()}; }
static inline wblock_t load_block(const int8_t *w) {
    return (wblock_t){_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)w)),
                      _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + 16)))};
}
static inline __m256i load_codes(const code_t *x) {
    int64_t xb;
    memcpy(&xb, x, 8);
    return _mm256_set1_epi64x(xb);
}
static inline acc_t dot4_add(acc_t acc, wblock_t w, __m256i b) {
    return (acc_t){_mm256_add_epi32(acc.lo, _mm256_madd_epi16(b, w.lo)),
                   _mm256_add_epi32(acc.hi, _mm256_madd_epi16(b, w.hi))};
}
// lanes (c0 c0' c1 c1' | c2 c2' c3 c3') and (c4 .. | c6 ..): the pairwise sums come out as (c0 c1 c4 c5 | c2 c3 c6
// c7); the 64-bit permute puts them in order
static inline __m256i block_sums(acc_t acc) {
    return _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc.lo, acc.hi), _MM_SHUFFLE(3, 1, 2, 0));
}
#endif

// One MR_ x NR register tile: MR_ rows of panel xp (of PR_ rows) against NR packed column blocks from w0. With
// next (the next column tile, on a single row pass) its lines are prefetched alongside, one tile ahead of the
// hardware prefetcher, as a8w8_vnni.c does.
static inline __attribute__((always_inline)) void tile(const code_t *xp, int PR_, int Kp, const int8_t *w0, int MR_,
                                                       acc_t acc[MR][NR], const int8_t *next) {
    const size_t bstride = (size_t)Kp * NB;
    for (int r = 0; r < MR_; r++)
        for (int j = 0; j < NR; j++) acc[r][j] = acc_zero();
    const int ngroups = Kp / KG;
#pragma GCC unroll 2
    for (int g = 0; g < ngroups; g++) {
        if (next && g % 2 == 0)  // (a k-group of a block is half a 64-byte line)
            for (int j = 0; j < NR; j++) _mm_prefetch((const char *)(next + j * bstride + (size_t)g * NB * KG), _MM_HINT_T1);
        wblock_t w[NR];
        for (int j = 0; j < NR; j++) w[j] = load_block(w0 + j * bstride + (size_t)g * NB * KG);
        const code_t *xg = xp + (size_t)g * PR_ * KG;
        for (int r = 0; r < MR_; r++) {
            const __m256i b = load_codes(xg + r * KG);
            for (int j = 0; j < NR; j++) acc[r][j] = dot4_add(acc[r][j], w[j], b);
        }
    }
}

// Epilogue of rows m0..m0+mr of the NR column blocks from column n0, in a8w8_vnni.c's order of operations.
static inline void store_tile(acc_t acc[MR][NR], int mr, int m0, int n0, const int32_t *wsum, const float *sw,
                              const float *sx, int N, const float *bias, const float *residual, float *out) {
    for (int r = 0; r < mr; r++) {
        const __m256 vsx = _mm256_set1_ps(sx[m0 + r]);
        for (int j = 0; j < NR; j++) {
            const int n = n0 + j * NB;
            if (n >= N) break;
            __m256i dot = block_sums(acc[r][j]);
            if (ACTIVATION_BIAS_LOG2)  // (wsum is padded to Np, as sw)
                dot = _mm256_sub_epi32(
                    dot, _mm256_slli_epi32(_mm256_loadu_si256((const __m256i *)(wsum + n)), ACTIVATION_BIAS_LOG2));
            __m256 v = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(dot), vsx), _mm256_loadu_ps(sw + n));
            if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + n));  // padded to Np like sw
            const size_t at = (size_t)(m0 + r) * N + n;
            if (N - n >= NB) {
                if (residual) v = _mm256_add_ps(_mm256_loadu_ps(residual + at), v);
                _mm256_storeu_ps(out + at, v);
            } else {
                float vals[NB];
                _mm256_storeu_ps(vals, v);
                for (int i = 0; i < N - n; i++) out[at + i] = residual ? residual[at + i] + vals[i] : vals[i];
            }
        }
    }
}
