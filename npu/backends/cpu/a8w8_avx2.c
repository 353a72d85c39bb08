// A8W8 GEMM for CPUs with AVX2 (and FMA) but without AVX-512 VNNI, built by npu/backends/cpu/vnni.py as the
// "avx2" kernel family, and with AVX-VNNI's vpdpbusd as the "avx-vnni" family (dot4_add): the same entry points,
// arguments and results as a8w8_vnni.c, bit for bit.
//
// out[m, n] = residual[m, n] + ((sum_k q_a[m, k] * q_w[n, k]) * s_a[m] * s_w[n] + bias[n]), INT32 accumulation,
// with a = prologue(x) (row_prologue_avx2.h) quantized per token exactly as a8w8_vnni.c does.
//
// The products: vpmaddubsw multiplies unsigned by signed bytes and adds adjacent pairs into saturating int16.
// With the weight's magnitude as the unsigned side (|q_w| <= 128) and the activation carrying the weight's sign
// as the signed side (q_a * sign(q_w), |q_a| <= 127: no overflow on negation), a pair sums to at most
// 2 * 128 * 127 = 32512 < 32767, so nothing saturates (llama.cpp's Q8_0 dot product puts the sign on the other
// side, which needs weights in -127..127; ours reach -128). vpmaddwd against ones then sums pairs into int32:
// the exact INT32 dot product, so the result equals the VNNI kernel's.
// Weights are packed as [N/8][K/4][8][4]: one 32-byte load gives 4 consecutive k of 8 channels.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "row_prologue_avx2.h"

#define NB 8  // output channels per block (one ymm of int32)
#define KG 4  // k values per 32-bit lane
#define NR 2  // column blocks per register tile
#define MR 4  // activation rows per register tile (8 accumulators of the 16 ymm registers)
typedef __m256i acc_t;
#include "a8w8_signed.h"

#define MIN_DIVISOR 1e-30f
#define QMAX 127.0f

// a[0:K] fp32 -> one row of an activation panel (signed codes, k-group g at out + g * gstride, K..Kp zero);
// returns the scale. The same operations as a8w8_vnni.c quantize_row, so the same codes.
static float quantize_row(const float *a, int K, int Kp, int8_t *out, size_t gstride) {
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
        for (int i = 0; i < 8; i++) out[(size_t)((k + i) / KG) * gstride + (k + i) % KG] = (int8_t)codes[i];
    }
    for (; k < K; k++) {
        float q = nearbyintf(a[k] / div);
        q = fminf(fmaxf(q, -QMAX), QMAX);
        out[(size_t)(k / KG) * gstride + k % KG] = (int8_t)(int)q;
    }
    for (; k < Kp; k++) out[(size_t)(k / KG) * gstride + k % KG] = 0;
    return s;
}

// The products of one k-group: acc + the sums of 4 adjacent products of the broadcast activation codes b and one
// column block's weight codes w (aw = |w|), exact in INT32.
//   avx2: vpmaddubsw(|w|, b * sign(w)) then vpmaddwd against ones (no pair saturates: see above).
//   avx-vnni (built with -DA8W8_AVX_VNNI): the activations biased to unsigned as a8w8_vnni.c does (code + 128, one
//   xor per broadcast: biased_codes), then one vpdpbusd against the weights as packed; store_tile takes the bias's
//   share, 128 * wsum[n], off. A8W8_AVX_VNNI_EVEX makes that the AVX-512 VL encoding of the same instruction, so
//   that the tests run this family on AVX-512 VNNI CPUs too.
#if defined(A8W8_AVX_VNNI)
#define ACTIVATION_BIAS_LOG2 7  // codes + 128
static inline __m256i biased_codes(int32_t xb) {
    return _mm256_xor_si256(_mm256_set1_epi32(xb), _mm256_set1_epi8((char)0x80));
}
static inline __m256i dot4_add(__m256i acc, __m256i w, __m256i aw, __m256i b, __m256i ones) {
    (void)aw, (void)ones;
#if defined(A8W8_AVX_VNNI_EVEX)
    return _mm256_dpbusd_epi32(acc, b, w);
#else
    return _mm256_dpbusd_avx_epi32(acc, b, w);
#endif
}
#else
#define ACTIVATION_BIAS_LOG2 0  // none
static inline __m256i biased_codes(int32_t xb) { return _mm256_set1_epi32(xb); }
static inline __m256i dot4_add(__m256i acc, __m256i w, __m256i aw, __m256i b, __m256i ones) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(b, w)), ones));
}
#endif

// One MR_ x NR register tile: MR_ rows of panel xp (of PR_ rows) against NR packed column blocks from w0. With
// next (the next column tile, on a single row pass) its lines are prefetched alongside, one tile ahead of the
// hardware prefetcher, as a8w8_vnni.c does.
static inline __attribute__((always_inline)) void tile(const int8_t *xp, int PR_, int Kp, const int8_t *w0, int MR_,
                                                       acc_t acc[MR][NR], const int8_t *next) {
    const size_t bstride = (size_t)Kp * NB;
    const __m256i ones = _mm256_set1_epi16(1);
    for (int r = 0; r < MR_; r++)
        for (int j = 0; j < NR; j++) acc[r][j] = _mm256_setzero_si256();
    const int ngroups = Kp / KG;
#pragma GCC unroll 2
    for (int g = 0; g < ngroups; g++) {
        if (next && g % 2 == 0)  // (a k-group of a block is half a 64-byte line)
            for (int j = 0; j < NR; j++) _mm_prefetch((const char *)(next + j * bstride + (size_t)g * NB * KG), _MM_HINT_T1);
        __m256i w[NR], aw[NR];
        for (int j = 0; j < NR; j++) {
            w[j] = _mm256_loadu_si256((const __m256i *)(w0 + j * bstride + (size_t)g * NB * KG));
            aw[j] = _mm256_abs_epi8(w[j]);  // |q_w| as unsigned bytes (128 for -128)
        }
        const int8_t *xg = xp + (size_t)g * PR_ * KG;
        for (int r = 0; r < MR_; r++) {
            int32_t xb;
            memcpy(&xb, xg + r * KG, 4);
            const __m256i b = biased_codes(xb);
            for (int j = 0; j < NR; j++) acc[r][j] = dot4_add(acc[r][j], w[j], aw[j], b, ones);
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
            __m256i dot = acc[r][j];
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
