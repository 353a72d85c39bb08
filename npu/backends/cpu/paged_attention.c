// Attention straight from the paged INT8 KV cache, AVX-512 VNNI: decode (one query token per sequence)
// and causal prefill / chunked prefill (further down).
//
// For sequence s and KV head h, with its G = Hq / Hkv query heads:
//   score[g, j] = (q[s, h*G+g] . k_int8[slot_j, h]) * k_scale[slot_j, h] * scale
//   p[g] = softmax(score[g]);  out[s, h*G+g] = sum_j p[g, j] * v_scale[slot_j, h] * v_int8[slot_j, h]
// Keys and values are read through each sequence's slot list: no copy of the cache is made.
// q . k runs in integers: q is rounded to INT16 per (sequence, head) (s_q = absmax / 32767, a relative
// error of 1.5e-5, far below the INT8 keys' own) and multiplied with the sign-extended INT8 keys by
// vpdpwssd, 32 products per instruction, summed exactly in INT32 (|sum| <= 32767 * 127 * 256 < 2^31).
// Dot products of 16 (key, query vector) pairs are reduced together by one transpose-add tree.
//
// Decode: a work item is one sequence (or one part of its context, see SPLIT_KEYS) and a group of its KV
// heads (at most 16 query vectors). It reads the slots once, in order, each slot's K and V rows of the
// group whole: the KV layout is [slot, head, D], so that is one contiguous run per slot (walking the
// cache head by head instead, each head's 128-byte rows 1 KB apart, took 23 ms of a batch-16 decode step
// at context 300 in benchmarks/worker_bench.py's breakdown; this takes 13-19 ms there). The scores are
// kept as vectors whose lanes are (key, query vector) pairs; the V rows are copied to a per-head
// contiguous staging buffer on the way. Softmax weights, times the V scales, are then rounded to INT16
// per query vector (relative error 1.5e-5 of the largest) and p . v runs as vpdpwssd over pairs of
// keys, exact in INT32 over PV_FLUSH keys at a time, from the staged rows. The parts of a split context
// are combined by their softmax max and sum (flash-decoding); how a context is split depends on its own
// length only, so a sequence's result does not depend on what else is in the batch.
// Prefill keeps fp32 p . v (pv_head): its query tile shares each value it converts.
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"
#include "paged_attention_common.h"
#include "simd_math.h"

#define VEC 16  // fp32 / int32 lanes per zmm
_Static_assert(VEC == ITEM_QV_MAX, "a decode item's (key, query vector) lanes are one zmm");

// r[i] = sum of the 16 lanes of v[i], for 16 vectors at once (unpack within 128-bit lanes, then across).
static inline __m512i hsum16_epi32(const __m512i v[KEY_BLOCK]) {
    __m512i t[8], u[4];
    for (int i = 0; i < 8; i++)
        t[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {
        const __m512 a = _mm512_castsi512_ps(t[2 * i]), b = _mm512_castsi512_ps(t[2 * i + 1]);
        u[i] = _mm512_add_epi32(_mm512_castps_si512(_mm512_shuffle_ps(a, b, 0x44)),
                                _mm512_castps_si512(_mm512_shuffle_ps(a, b, 0xEE)));
    }
    const __m512i w0 = _mm512_add_epi32(_mm512_shuffle_i32x4(u[0], u[1], 0x88), _mm512_shuffle_i32x4(u[0], u[1], 0xDD));
    const __m512i w1 = _mm512_add_epi32(_mm512_shuffle_i32x4(u[2], u[3], 0x88), _mm512_shuffle_i32x4(u[2], u[3], 0xDD));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(w0, w1, 0x88), _mm512_shuffle_i32x4(w0, w1, 0xDD));
}

// q row [D] fp32 -> q16 [D] int16; returns the scale.
static float quantize_q16(const float *q, int D, int16_t *q16) {
    __m512 vmax = _mm512_setzero_ps();
    for (int d = 0; d < D; d += VEC) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(q + d)));
    const float s = _mm512_reduce_max_ps(vmax) / Q_MAX, inv = s > 0.0f ? 1.0f / s : 0.0f;
    for (int d = 0; d < D; d += VEC) {
        __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(q + d), _mm512_set1_ps(inv)));
        _mm256_storeu_si256((__m256i *)(q16 + d), _mm512_cvtsepi32_epi16(v));
    }
    return s;
}

// Softmax of sg[0:L] in place, each weight times its value's scale vscale[j]; sg[L:n] set to 0.
static void softmax_fold_scales(float *sg, int L, int n, const float *vscale) {
    __m512 vm = _mm512_set1_ps(-INFINITY);
    int j = 0;
    for (; j + VEC <= L; j += VEC) vm = _mm512_max_ps(vm, _mm512_loadu_ps(sg + j));
    float m = _mm512_reduce_max_ps(vm);
    for (; j < L; j++) m = sg[j] > m ? sg[j] : m;
    const __m512 vmax = _mm512_set1_ps(m);
    __m512 vsum = _mm512_setzero_ps();
    for (j = 0; j < L; j += VEC) {
        const __mmask16 mask = L - j >= VEC ? (__mmask16)0xFFFF : (__mmask16)((1u << (L - j)) - 1u);
        __m512 e = _mm512_maskz_mov_ps(mask, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, sg + j), vmax)));
        vsum = _mm512_add_ps(vsum, e);
        _mm512_mask_storeu_ps(sg + j, mask, e);
    }
    const __m512 vinv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(vsum));
    for (j = 0; j < n; j += VEC) {  // lanes at j >= L are e = 0 (stored above) or cleared here
        const __mmask16 in_n = n - j >= VEC ? (__mmask16)0xFFFF : (__mmask16)((1u << (n - j)) - 1u);
        const __mmask16 in_l = L - j >= VEC ? (__mmask16)0xFFFF : L > j ? (__mmask16)((1u << (L - j)) - 1u) : 0;
        const __m512 w = _mm512_maskz_mul_ps(in_l, _mm512_maskz_loadu_ps(in_l, sg + j),
                                             _mm512_mul_ps(vinv, _mm512_maskz_loadu_ps(in_l, vscale + j)));
        _mm512_mask_storeu_ps(sg + j, in_n, w);
    }
}

// out[g][c*16 : c*16+16] = sum_j p[g * pstride + j] * v[sl[j], h][c*16 : ...] for NG query heads; NG is a
// constant at each call site, so the accumulators stay in registers.
static inline __attribute__((always_inline)) void pv_group(const float *p, int L, const int8_t *vc, const int64_t *sl,
                                                           int Hkv, int h, int D, int NG, float *out, int pstride) {
    for (int c = 0; c < D / VEC; c++) {
        __m512 acc[PV_GROUP];
        for (int g = 0; g < NG; g++) acc[g] = _mm512_setzero_ps();
        for (int j = 0; j < L; j++) {
            if (c == 0 && j + PREFETCH_SLOTS < L) prefetch_run(vc + ((size_t)sl[j + PREFETCH_SLOTS] * Hkv + h) * D, D);
            const int8_t *vr = vc + ((size_t)sl[j] * Hkv + h) * D + c * VEC;
            const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)vr)));
            for (int g = 0; g < NG; g++) acc[g] = _mm512_fmadd_ps(_mm512_set1_ps(p[(size_t)g * pstride + j]), v, acc[g]);
        }
        for (int g = 0; g < NG; g++) _mm512_storeu_ps(out + (size_t)g * D + c * VEC, acc[g]);
    }
}

// Per-(slot, head) fp32 scales as lanes: lane k * NQV + i gets base[sl[j0 + k] * Hkv + h0 + i / G] for
// keys j0 + k < L (masked loads: nothing past a row's HC heads is touched), 0 elsewhere.
static inline __m512 scale_lanes(const float *base, const int64_t *sl, int j0, int L, int Hkv, int h0, int HC,
                                 int NQV, int KPB, __m512i head_of_lane) {
    __m512 r = _mm512_setzero_ps();
    for (int k = 0; k < KPB && j0 + k < L; k++) {
        const __m512 row = _mm512_maskz_loadu_ps((__mmask16)((1u << HC) - 1u), base + (size_t)sl[j0 + k] * Hkv + h0);
        r = _mm512_mask_permutexvar_ps(r, (__mmask16)(((1u << NQV) - 1u) << (k * NQV)), head_of_lane, row);
    }
    return r;
}

// head_of_lane[l] = (l % NQV) / G
static inline __m512i head_lanes(int NQV, int G) {
    int32_t t[VEC];
    for (int l = 0; l < VEC; l++) t[l] = (l % NQV) / G;
    return _mm512_loadu_si512((const void *)t);
}

// lane k * NQV + i of vector b holds key b * KPB + k and query vector i (KPB = VEC / NQV keys per vector)
static inline __attribute__((always_inline)) void pass_keys(const int16_t *q16, __m512 qsl, int NQV, int G, int D,
        const int8_t *kc, const float *ks, const int8_t *vc, const int64_t *sl, int L, int Hkv, int h0,
        float *sv, int8_t *vstage, int vplane) {
    const int KPB = VEC / NQV, HC = NQV / G, NW = D / 32;
    const __m512i head_of_lane = head_lanes(NQV, G);
    for (int j0 = 0, b = 0; j0 < L; j0 += KPB, b++) {
        __m512i acc[VEC];
        for (int l = KPB * NQV; l < VEC; l++) acc[l] = _mm512_setzero_si512();
        for (int k = 0; k < KPB; k++) {
            const int j = j0 + k < L ? j0 + k : L - 1;
            const size_t row = (size_t)sl[j] * Hkv + h0;
            for (int hi = 0; hi < HC; hi++) {
                const int8_t *kr = kc + (row + hi) * D;
                __m512i kv[MAX_D / 32];
                for (int c = 0; c < NW; c++) kv[c] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(kr + c * 32)));
                for (int g = 0; g < G; g++) {
                    const int16_t *qi = q16 + (size_t)(hi * G + g) * D;
                    __m512i a = _mm512_dpwssd_epi32(_mm512_setzero_si512(), kv[0], _mm512_loadu_si512((const void *)qi));
                    for (int c = 1; c < NW; c++) a = _mm512_dpwssd_epi32(a, kv[c], _mm512_loadu_si512((const void *)(qi + c * 32)));
                    acc[k * NQV + hi * G + g] = a;
                }
                if (j0 + k < L) memcpy(vstage + ((size_t)hi * vplane + j0 + k) * D, vc + (row + hi) * D, D);
            }
        }
        const int nvalid = (L - j0 < KPB ? L - j0 : KPB) * NQV;
        const __m512 s = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(hsum16_epi32(acc)), qsl),
                                       scale_lanes(ks, sl, j0, L, Hkv, h0, HC, NQV, KPB, head_of_lane));
        _mm512_storeu_ps(sv + (size_t)b * VEC, _mm512_mask_blend_ps((__mmask16)((1u << nvalid) - 1u), _mm512_set1_ps(-INFINITY), s));
    }
}

// lanes -> per query vector (lanes k * NQV + i, k < KPB) -> back to lanes, by max or by sum
static inline __m512 regroup(__m512 v, int NQV, int use_max) {
    float t[VEC], r[VEC];
    _mm512_storeu_ps(t, v);
    const int KPB = VEC / NQV;
    for (int i = 0; i < NQV; i++) {
        float a = t[i];
        for (int k = 1; k < KPB; k++) a = use_max ? (t[k * NQV + i] > a ? t[k * NQV + i] : a) : a + t[k * NQV + i];
        r[i] = a;
    }
    for (int l = NQV; l < VEC; l++) r[l] = l < KPB * NQV ? r[l % NQV] : 0.0f;
    return _mm512_loadu_ps(r);
}

// Unnormalized softmax over keys per query vector (e = exp(score - max)), times the V scales, quantized to
// INT16 per query vector: p16[j * NQV + i] with scale psc[i]; rmax[i] and rsum[i] are the max score and
// sum of e (the caller normalizes). Two zero keys of padding follow key L - 1.
static void probs_int16(float *sv, int NQV, int G, int L, const float *vs, const int64_t *sl, int Hkv, int h0,
                        int16_t *p16, float *psc, float *rmax, float *rsum) {
    const int KPB = VEC / NQV, nb = (L + KPB - 1) / KPB;
    const __m512i head_of_lane = head_lanes(NQV, G);
    __m512 m = _mm512_set1_ps(-INFINITY);
    for (int b = 0; b < nb; b++) m = _mm512_max_ps(m, _mm512_loadu_ps(sv + (size_t)b * VEC));
    m = regroup(m, NQV, 1);
    __m512 sum = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const int nvalid = (L - b * KPB < KPB ? L - b * KPB : KPB) * NQV;
        const __m512 e = _mm512_maskz_mov_ps((__mmask16)((1u << nvalid) - 1u), exp512(_mm512_sub_ps(_mm512_loadu_ps(sv + (size_t)b * VEC), m)));
        sum = _mm512_add_ps(sum, e);
        _mm512_storeu_ps(sv + (size_t)b * VEC, e);
    }
    float t[VEC];
    _mm512_storeu_ps(t, m);
    memcpy(rmax, t, sizeof(float) * NQV);
    _mm512_storeu_ps(t, regroup(sum, NQV, 0));
    memcpy(rsum, t, sizeof(float) * NQV);
    __m512 pmax = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const __m512 vsc = scale_lanes(vs, sl, b * KPB, L, Hkv, h0, NQV / G, NQV, KPB, head_of_lane);
        const __m512 p = _mm512_mul_ps(_mm512_loadu_ps(sv + (size_t)b * VEC), vsc);
        pmax = _mm512_max_ps(pmax, p);
        _mm512_storeu_ps(sv + (size_t)b * VEC, p);
    }
    pmax = regroup(pmax, NQV, 1);
    float pm[VEC];
    _mm512_storeu_ps(pm, pmax);
    for (int i = 0; i < NQV; i++) psc[i] = pm[i] / Q_MAX;
    const __m512 qscale = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(pmax, _mm512_setzero_ps(), _CMP_GT_OQ), _mm512_set1_ps(Q_MAX), pmax);
    int16_t tmp[VEC];
    for (int b = 0; b < nb; b++) {
        _mm256_storeu_si256((__m256i *)tmp, _mm512_cvtsepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(sv + (size_t)b * VEC), qscale))));
        const int nk = L - b * KPB < KPB ? L - b * KPB : KPB;
        memcpy(p16 + (size_t)b * KPB * NQV, tmp, sizeof(int16_t) * nk * NQV);
    }
    memset(p16 + (size_t)L * NQV, 0, sizeof(int16_t) * 2 * NQV);
}

// out[g][0:D] = psc[g] * sum_j p16[j * NQV + g] v[j] for NG (1 or 2) query vectors; v rows contiguous.
static inline __attribute__((always_inline)) void pv16_rows(const int16_t *p16, int NQV, const float *psc, int L,
        const int8_t *v, int D, int NG, float *out) {
    const int NC = D / 32;
    __m512 fo[2][MAX_D / 16];
    for (int g = 0; g < NG; g++) for (int c = 0; c < 2 * NC; c++) fo[g][c] = _mm512_setzero_ps();
    for (int f0 = 0; f0 < L; f0 += PV_FLUSH) {
        const int f1 = L - f0 < PV_FLUSH ? L : f0 + PV_FLUSH;
        __m512i acc[2][MAX_D / 16];
        for (int g = 0; g < NG; g++) for (int c = 0; c < 2 * NC; c++) acc[g][c] = _mm512_setzero_si512();
        for (int j = f0; j < f1; j += 2) {
            const int8_t *v0 = v + (size_t)j * D, *v1 = v0 + D;  // row L (odd L) is padding: its weight is 0
            __m512i pp[2];
            for (int g = 0; g < NG; g++)
                pp[g] = _mm512_set1_epi32((int32_t)(((uint32_t)(uint16_t)p16[(size_t)(j + 1) * NQV + g] << 16) | (uint16_t)p16[(size_t)j * NQV + g]));
            for (int c = 0; c < NC; c++) {
                const __m256i a = _mm256_loadu_si256((const __m256i *)(v0 + c * 32));
                const __m256i b = _mm256_loadu_si256((const __m256i *)(v1 + c * 32));
                const __m512i lo = _mm512_cvtepi8_epi16(_mm256_unpacklo_epi8(a, b));  // dims 0-7, 16-23 of the 32
                const __m512i hi = _mm512_cvtepi8_epi16(_mm256_unpackhi_epi8(a, b));  // dims 8-15, 24-31
                for (int g = 0; g < NG; g++) {
                    acc[g][2 * c] = _mm512_dpwssd_epi32(acc[g][2 * c], lo, pp[g]);
                    acc[g][2 * c + 1] = _mm512_dpwssd_epi32(acc[g][2 * c + 1], hi, pp[g]);
                }
            }
        }
        for (int g = 0; g < NG; g++) for (int c = 0; c < 2 * NC; c++)
            fo[g][c] = _mm512_add_ps(fo[g][c], _mm512_cvtepi32_ps(acc[g][c]));
    }
    const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23);
    const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int g = 0; g < NG; g++) {
        const __m512 s = _mm512_set1_ps(psc[g]);
        for (int c = 0; c < NC; c++) {
            _mm512_storeu_ps(out + (size_t)g * D + c * 32, _mm512_mul_ps(_mm512_permutex2var_ps(fo[g][2 * c], first, fo[g][2 * c + 1]), s));
            _mm512_storeu_ps(out + (size_t)g * D + c * 32 + 16, _mm512_mul_ps(_mm512_permutex2var_ps(fo[g][2 * c], second, fo[g][2 * c + 1]), s));
        }
    }
}

#define PASS_KEYS_CASE(nqv, g) \
    if (NQV == nqv && G == g && D == 128) { pass_keys(q16, qsl, nqv, g, 128, kc, ks, vc, sl, L, Hkv, h0, sv, vstage, vplane); return; }
static void pass_keys_dispatch(const int16_t *q16, __m512 qsl, int NQV, int G, int D, const int8_t *kc, const float *ks,
        const int8_t *vc, const int64_t *sl, int L, int Hkv, int h0, float *sv, int8_t *vstage, int vplane) {
    PASS_KEYS_CASE(2, 2) PASS_KEYS_CASE(4, 2) PASS_KEYS_CASE(8, 2) PASS_KEYS_CASE(16, 2)
    PASS_KEYS_CASE(4, 4) PASS_KEYS_CASE(8, 4) PASS_KEYS_CASE(16, 4)
    PASS_KEYS_CASE(1, 1) PASS_KEYS_CASE(2, 1) PASS_KEYS_CASE(4, 1) PASS_KEYS_CASE(8, 1) PASS_KEYS_CASE(16, 1)
    pass_keys(q16, qsl, NQV, G, D, kc, ks, vc, sl, L, Hkv, h0, sv, vstage, vplane);
}

// p . v of one work item's query vectors: out[i][0:D] = oscale[i] * sum_j p16[j * NQV + i] v_(i's head)[j]
static void pv_item(const int16_t *p16, int NQV, int G, int HC, const float *oscale, int L, const int8_t *vstage,
                    int vplane, int D, float *out) {
    for (int hi = 0; hi < HC; hi++) {
        const int8_t *vh = vstage + (size_t)hi * vplane * D;
        for (int g = 0; g < G; g += 2) {
            const int i = hi * G + g;
            if (G - g >= 2 && D == 128) pv16_rows(p16 + i, NQV, oscale + i, L, vh, 128, 2, out + (size_t)i * D);
            else if (G - g >= 2) pv16_rows(p16 + i, NQV, oscale + i, L, vh, D, 2, out + (size_t)i * D);
            else pv16_rows(p16 + i, NQV, oscale + i, L, vh, D, 1, out + (size_t)i * D);
        }
    }
}

// One decode work item's scratch: the score vectors, the INT16 weights and the staged V rows.
static size_t decode_scratch_bytes(int NQV, int HC, int Lcap, int D) {
    const int KPB = VEC / NQV;
    return scratch_round(sizeof(float) * VEC * ((size_t)Lcap / KPB + 2)) +
           scratch_round(sizeof(int16_t) * (size_t)NQV * (Lcap + KPB)) + scratch_round((size_t)HC * Lcap * D);
}

// One decode work item (paged_attention_driver.h): out[i][0:D] for its NQV query vectors over L keys, normalized by
// the softmax sum where asked, else left for the parts' combination with rmax and rsum.
static void decode_item(const int16_t *q16, const float *qs, int NQV, int G, int D, const int8_t *kc, const float *ks,
                        const int8_t *vc, const float *vs, const int64_t *sl, int L, int Hkv, int h0, int Lcap,
                        char *scratch, int normalize, float *out, float *rmax, float *rsum) {
    const int KPB = VEC / NQV, HC = NQV / G;
    float *sv = (float *)scratch;
    int16_t *p16 = (int16_t *)(scratch + scratch_round(sizeof(float) * VEC * ((size_t)Lcap / KPB + 2)));
    int8_t *vstage = (int8_t *)p16 + scratch_round(sizeof(int16_t) * (size_t)NQV * (Lcap + KPB));
    float ql[VEC], psc[VEC];
    for (int l = 0; l < VEC; l++) ql[l] = l < KPB * NQV ? qs[l % NQV] : 0.0f;
    pass_keys_dispatch(q16, _mm512_loadu_ps(ql), NQV, G, D, kc, ks, vc, sl, L, Hkv, h0, sv, vstage, Lcap);
    probs_int16(sv, NQV, G, L, vs, sl, Hkv, h0, p16, psc, rmax, rsum);
    if (normalize)
        for (int i = 0; i < NQV; i++) psc[i] /= rsum[i];
    pv_item(p16, NQV, G, HC, psc, L, vstage, Lcap, D, out);
}

// ---------------------------------------------------------------------------------------------------
// Prefill's steps (the work items: paged_attention_driver.h): q . k is the integer product of the decode
// kernel, 16 keys reduced at a time; p . v as in pv_group.

// scores[qv][j0 + jj] for 16 keys and nqv query vectors (q16: [nqv][D], qk_scale: [nqv]).
static void scores_key_block(const int16_t *q16, const float *qk_scale, int nqv, const int16_t *kb, const float *kscale,
                             int D, float *scores, int stride, int j0) {
    const int NW = D / 32;
    for (int v = 0; v < nqv; v++) {
        __m512i qv[MAX_D / 32];
        for (int c = 0; c < NW; c++) qv[c] = _mm512_loadu_si512((const void *)(q16 + (size_t)v * D + c * 32));
        __m512i acc[KEY_BLOCK];
        for (int jj = 0; jj < KEY_BLOCK; jj++) {
            __m512i a = _mm512_setzero_si512();
            for (int c = 0; c < NW; c++)
                a = _mm512_dpwssd_epi32(a, _mm512_loadu_si512((const void *)(kb + (size_t)jj * D + c * 32)), qv[c]);
            acc[jj] = a;
        }
        const __m512 sc = _mm512_cvtepi32_ps(hsum16_epi32(acc));
        _mm512_storeu_ps(scores + (size_t)v * stride + j0,
                         _mm512_mul_ps(_mm512_mul_ps(sc, _mm512_set1_ps(qk_scale[v])), _mm512_loadu_ps(kscale)));
    }
}

// An INT8 key row -> INT16 (the prefill's key block).
static void widen_key_row(const int8_t *kr, int D, int16_t *kb) {
    for (int c = 0; c < D / 32; c++)
        _mm512_storeu_si512((void *)(kb + c * 32), _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(kr + c * 32))));
}

#include "paged_attention_driver.h"
