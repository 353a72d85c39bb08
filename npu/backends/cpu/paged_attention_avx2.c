// The AVX2 family's paged_attention.c: attention straight from the paged INT8 KV cache, decode (one query token
// per sequence) and causal prefill / chunked prefill, with the same entry points, shape limits and work items as
// the AVX-512 kernel and the same results bit for bit:
//   - what is exact there is exact here: q . k and (decode) p . v in INT32, by vpmaddwd (pairs of INT16
//     products, each pair sum exact) instead of vpdpwssd;
//   - every float step is the same fp32 operation on each element (exp256 is exp512 bit for bit,
//     row_prologue_avx2.h), and each float sum adds the same terms in the same order: a decode item's sums
//     follow the AVX-512 kernel's lane layout (paged_attention_common.h ITEM_QV_MAX), the prefill's softmax sum its
//     16 lanes and _mm512_reduce_add_ps's order (reduce_add_16).
// Decode stores the item's scores flat, sv[j * NQV + i] (key j, query vector i): the AVX-512 kernel's lanes
// without its padding, so that lane l of its block b is element b * KPB * NQV + l here.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"
#include "paged_attention_lanes.h"
#include "row_prologue_avx2.h"

#define VEC 8          // fp32 / int32 lanes per ymm
#define PV_DIMS 64     // decode p . v: dims per pass over the keys (8 INT32 accumulators)

// r[i] = sum of the 8 lanes of v[i] (exact: integers).
static inline __m256i hsum8_epi32(const __m256i v[8]) {
    const __m256i t0 = _mm256_hadd_epi32(v[0], v[1]), t1 = _mm256_hadd_epi32(v[2], v[3]);
    const __m256i t2 = _mm256_hadd_epi32(v[4], v[5]), t3 = _mm256_hadd_epi32(v[6], v[7]);
    const __m256i u0 = _mm256_hadd_epi32(t0, t1), u1 = _mm256_hadd_epi32(t2, t3);
    return _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31));
}

static inline __m256 abs256(__m256 v) { return _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))); }

// lanes [0, n) set (n may be <= 0 or >= 8)
static inline __m256i lanes_below(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// paged_attention_lanes.h's steps: exp256 over a run (padded to whole vectors), vcvtss2si's rounding.
static void exp_run(float *v, int n) {
    for (int p = 0; p < n; p += VEC) _mm256_storeu_ps(v + p, exp256(_mm256_loadu_ps(v + p)));
}

static inline int32_t round_half_even(float x) { return _mm_cvtss_si32(_mm_set_ss(x)); }

// q row [D] fp32 -> q16 [D] int16; returns the scale (paged_attention.c quantize_q16).
static float quantize_q16(const float *q, int D, int16_t *q16) {
    __m256 vmax = _mm256_setzero_ps();
    for (int d = 0; d < D; d += VEC) vmax = _mm256_max_ps(vmax, abs256(_mm256_loadu_ps(q + d)));
    const float s = reduce_max_8(vmax) / Q_MAX, inv = s > 0.0f ? 1.0f / s : 0.0f;
    const __m256 vinv = _mm256_set1_ps(inv);
    for (int d = 0; d < D; d += 2 * VEC) {
        const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(q + d), vinv));
        const __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(q + d + VEC), vinv));
        // packs saturates as vpmovsdw does; it interleaves the 128-bit halves, the permute puts them back
        _mm256_storeu_si256((__m256i *)(q16 + d), _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8));
    }
    return s;
}

// q16 row . key row (sign-extended to INT16), the products summed in pairs (exact), as 8 INT32 lanes still to be
// added; the key row in registers (decode) or in memory (prefill's converted key block).
static inline __m256i dot_lanes(const __m256i *k16, const int16_t *q16, int D) {
    __m256i a = _mm256_madd_epi16(k16[0], _mm256_loadu_si256((const __m256i *)q16));
    for (int c = 1; c < D / 16; c++) a = _mm256_add_epi32(a, _mm256_madd_epi16(k16[c], _mm256_loadu_si256((const __m256i *)(q16 + c * 16))));
    return a;
}

static inline __m256i dot_lanes_mem(const int16_t *k16, const int16_t *q16, int D) {
    __m256i a = _mm256_setzero_si256();
    for (int c = 0; c < D / 16; c++)
        a = _mm256_add_epi32(a, _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)(k16 + c * 16)),
                                                  _mm256_loadu_si256((const __m256i *)(q16 + c * 16))));
    return a;
}

// ---------------------------------------------------------------------------------------------------
// Decode.

// Exact q . k of the item's NQV query vectors (HC heads of G) with each of its L keys: dots[j * NQV + i]; the V
// rows are staged per head on the way (vstage[hi][j][0:D]), as the AVX-512 kernel does.
static void item_dots(const int16_t *q16, int NQV, int G, int D, const int8_t *kc, const int8_t *vc, const int64_t *sl,
                      int L, int Hkv, int h0, int32_t *dots, int8_t *vstage, int vplane) {
    const int HC = NQV / G;
    __m256i pending[VEC];
    int npending = 0, at = 0;
    for (int j = 0; j < L; j++) {
        prefetch_item_slot(kc, vc, sl, j + PREFETCH_SLOTS, L, Hkv, h0, HC, D);
        const size_t row = (size_t)sl[j] * Hkv + h0;
        for (int hi = 0; hi < HC; hi++) {
            const int8_t *kr = kc + (row + hi) * D;
            __m256i k16[MAX_D / 16];
            for (int c = 0; c < D / 16; c++) k16[c] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(kr + c * 16)));
            for (int g = 0; g < G; g++) {
                pending[npending++] = dot_lanes(k16, q16 + (size_t)(hi * G + g) * D, D);
                if (npending == VEC) {
                    _mm256_storeu_si256((__m256i *)(dots + at), hsum8_epi32(pending));
                    at += VEC;
                    npending = 0;
                }
            }
            memcpy(vstage + ((size_t)hi * vplane + j) * D, vc + (row + hi) * D, D);
        }
    }
    if (npending) {
        int32_t t[VEC];
        for (int l = npending; l < VEC; l++) pending[l] = _mm256_setzero_si256();
        _mm256_storeu_si256((__m256i *)t, hsum8_epi32(pending));
        memcpy(dots + at, t, sizeof(int32_t) * npending);
    }
}

// out[i][0:D] = oscale[i] * sum_j p16[j * NQV + i] v_(i's head)[j], exact in INT32 over PV_FLUSH keys at a time
// (paged_attention.c pv16_rows): pairs of keys interleaved byte by byte so that one vpmaddwd adds both.
static void item_pv(const int16_t *p16, int NQV, int G, const float *oscale, int L, const int8_t *vstage, int vplane,
                    int D, float *out) {
    for (int i = 0; i < NQV; i++) {
        const int8_t *v = vstage + (size_t)(i / G) * vplane * D;
        for (int d0 = 0; d0 < D; d0 += PV_DIMS) {
            const int nc = (D - d0 < PV_DIMS ? D - d0 : PV_DIMS) / 16;  // 16 dims: two accumulators
            __m256 fo[PV_DIMS / VEC];
            for (int c = 0; c < 2 * nc; c++) fo[c] = _mm256_setzero_ps();
            for (int f0 = 0; f0 < L; f0 += PV_FLUSH) {
                const int f1 = L - f0 < PV_FLUSH ? L : f0 + PV_FLUSH;
                __m256i acc[PV_DIMS / VEC];
                for (int c = 0; c < 2 * nc; c++) acc[c] = _mm256_setzero_si256();
                for (int j = f0; j < f1; j += 2) {  // row L (odd L) is padding: its weight is 0
                    const __m256i pp = _mm256_set1_epi32(
                        (int32_t)(((uint32_t)(uint16_t)p16[(size_t)(j + 1) * NQV + i] << 16) | (uint16_t)p16[(size_t)j * NQV + i]));
                    const int8_t *v0 = v + (size_t)j * D + d0, *v1 = v0 + D;
                    for (int c = 0; c < nc; c++) {
                        const __m128i a = _mm_loadu_si128((const __m128i *)(v0 + c * 16));
                        const __m128i b = _mm_loadu_si128((const __m128i *)(v1 + c * 16));
                        acc[2 * c] = _mm256_add_epi32(acc[2 * c], _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_unpacklo_epi8(a, b)), pp));
                        acc[2 * c + 1] = _mm256_add_epi32(acc[2 * c + 1], _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_unpackhi_epi8(a, b)), pp));
                    }
                }
                for (int c = 0; c < 2 * nc; c++) fo[c] = _mm256_add_ps(fo[c], _mm256_cvtepi32_ps(acc[c]));
            }
            const __m256 s = _mm256_set1_ps(oscale[i]);
            for (int c = 0; c < 2 * nc; c++) _mm256_storeu_ps(out + (size_t)i * D + d0 + c * VEC, _mm256_mul_ps(fo[c], s));
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Prefill's steps (the work items: paged_attention_driver.h).

// scores[qv][j0 + jj] for KEY_BLOCK keys and nqv query vectors: (dot * q scale) * k scale.
static void scores_key_block(const int16_t *q16, const float *qk_scale, int nqv, const int16_t *kb, const float *kscale,
                             int D, float *scores, int stride, int j0) {
    for (int v = 0; v < nqv; v++) {
        const int16_t *qv = q16 + (size_t)v * D;
        for (int jb = 0; jb < KEY_BLOCK; jb += VEC) {
            __m256i acc[VEC];
            for (int jj = 0; jj < VEC; jj++) acc[jj] = dot_lanes_mem(kb + (size_t)(jb + jj) * D, qv, D);
            const __m256 sc = _mm256_cvtepi32_ps(hsum8_epi32(acc));
            _mm256_storeu_ps(scores + (size_t)v * stride + j0 + jb,
                             _mm256_mul_ps(_mm256_mul_ps(sc, _mm256_set1_ps(qk_scale[v])), _mm256_loadu_ps(kscale + jb)));
        }
    }
}

// Softmax of sg[0:L] in place, each weight times its value's scale vscale[j]; sg[L:n] set to 0 (paged_attention.c
// softmax_fold_scales: the sum of e in its 16 lanes, the lo | hi halves here, reduced in its order).
static void softmax_fold_scales(float *sg, int L, int n, const float *vscale) {
    float m = -INFINITY;
    for (int j = 0; j < L; j++) m = sg[j] > m ? sg[j] : m;
    const __m256 vmax = _mm256_set1_ps(m);
    __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
    for (int j = 0; j < L; j += 2 * VEC) {  // (rows are whole key blocks long: the reads past L stay in the row)
        const __m256i in_lo = lanes_below(L - j), in_hi = lanes_below(L - j - VEC);
        const __m256 elo = _mm256_and_ps(exp256(_mm256_sub_ps(_mm256_loadu_ps(sg + j), vmax)), _mm256_castsi256_ps(in_lo));
        const __m256 ehi = _mm256_and_ps(exp256(_mm256_sub_ps(_mm256_loadu_ps(sg + j + VEC), vmax)), _mm256_castsi256_ps(in_hi));
        lo = _mm256_add_ps(lo, elo);
        hi = _mm256_add_ps(hi, ehi);
        _mm256_maskstore_ps(sg + j, in_lo, elo);
        _mm256_maskstore_ps(sg + j + VEC, in_hi, ehi);
    }
    const __m256 vinv = _mm256_set1_ps(1.0f / reduce_add_16(lo, hi));
    for (int j = 0; j < n; j += VEC) {
        const __m256i in_n = lanes_below(n - j), in_l = lanes_below(L - j);
        const __m256 w = _mm256_mul_ps(_mm256_maskload_ps(sg + j, in_l), _mm256_mul_ps(vinv, _mm256_maskload_ps(vscale + j, in_l)));
        _mm256_maskstore_ps(sg + j, in_n, _mm256_and_ps(w, _mm256_castsi256_ps(in_l)));
    }
}

// out[g][c*8 : c*8+8] = sum_j p[g * pstride + j] * v[sl[j], h][c*8 : ...] for NG query heads, fp32 fused
// multiply-adds in key order (paged_attention.c pv_group's per-element operations).
static inline __attribute__((always_inline)) void pv_group(const float *p, int L, const int8_t *vc, const int64_t *sl,
                                                           int Hkv, int h, int D, int NG, float *out, int pstride) {
    for (int c = 0; c < D / VEC; c++) {
        __m256 acc[PV_GROUP];
        for (int g = 0; g < NG; g++) acc[g] = _mm256_setzero_ps();
        for (int j = 0; j < L; j++) {
            if (c == 0 && j + PREFETCH_SLOTS < L) prefetch_run(vc + ((size_t)sl[j + PREFETCH_SLOTS] * Hkv + h) * D, D);
            const int8_t *vr = vc + ((size_t)sl[j] * Hkv + h) * D + c * VEC;
            const __m256 v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)vr)));
            for (int g = 0; g < NG; g++) acc[g] = _mm256_fmadd_ps(_mm256_set1_ps(p[(size_t)g * pstride + j]), v, acc[g]);
        }
        for (int g = 0; g < NG; g++) _mm256_storeu_ps(out + (size_t)g * D + c * VEC, acc[g]);
    }
}

// An INT8 key row -> INT16 (the prefill's key block).
static void widen_key_row(const int8_t *kr, int D, int16_t *kb) {
    for (int c = 0; c < D / 16; c++)
        _mm256_storeu_si256((__m256i *)(kb + c * 16), _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(kr + c * 16))));
}

#include "paged_attention_driver.h"
