// Decode attention straight from the paged INT8 KV cache (one query token per sequence), AVX-512 VNNI.
//
// For sequence s and KV head h, with its G = Hq / Hkv query heads:
//   score[g, j] = (q[s, h*G+g] . k_int8[slot_j, h]) * k_scale[slot_j, h] * scale
//   p[g] = softmax(score[g]);  out[s, h*G+g] = sum_j p[g, j] * v_scale[slot_j, h] * v_int8[slot_j, h]
// Keys and values are read through each sequence's slot list: no copy of the cache is made.
// q . k runs in integers: q is rounded to INT16 per (sequence, head) (s_q = absmax / 32767, a relative
// error of 1.5e-5, far below the INT8 keys' own) and multiplied with the sign-extended INT8 keys by
// vpdpwssd, 32 products per instruction, summed exactly in INT32 (|sum| <= 32767 * 127 * 256 < 2^31).
// Dot products of 16 keys are reduced together by one transpose-add tree. p . v runs in fp32 with the
// output of all query heads of a KV head kept in registers, 16 head dimensions at a time.
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd_math.h"

#define VEC 16
#define MAX_D 256     // keeps the INT32 q . k sum exact (see above)
#define MAX_G 16
#define Q_MAX 32767.0f
#define KEY_BLOCK 16  // keys whose dot products are reduced together
// p . v keeps up to this many query heads' accumulators in registers; more are done in groups.
#define PV_GROUP 8
// Work items per thread to aim for when splitting heads (a little slack for uneven context lengths).
#define ITEMS_PER_THREAD 2
// Slots ahead to prefetch: the slot list is an indirection the hardware prefetcher cannot follow.
#define PREFETCH_SLOTS 8
#define CACHE_LINE 64

static inline void prefetch_run(const int8_t *p, int bytes) {
    for (int b = 0; b < bytes; b += CACHE_LINE) _mm_prefetch((const char *)(p + b), _MM_HINT_T0);
}

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

// sg[j] = q16 . k[sl[j], h] * kscale, for j < L (one query head).
static void scores_one_head(const int16_t *q16, float qk_scale, const int8_t *kc, const float *ks, const int64_t *sl,
                            int L, int Hkv, int h, int D, float *sg) {
    const int NW = D / 32;  // 32 int16 per zmm
    __m512i qv[MAX_D / 32];
    for (int c = 0; c < NW; c++) qv[c] = _mm512_loadu_si512((const void *)(q16 + c * 32));
    int j0 = 0;
    for (; j0 + KEY_BLOCK <= L; j0 += KEY_BLOCK) {
        __m512i acc[KEY_BLOCK];
        for (int jj = 0; jj < KEY_BLOCK; jj++) {
            if (j0 + jj + PREFETCH_SLOTS < L) prefetch_run(kc + ((size_t)sl[j0 + jj + PREFETCH_SLOTS] * Hkv + h) * D, D);
            const int8_t *kr = kc + ((size_t)sl[j0 + jj] * Hkv + h) * D;
            __m512i a = _mm512_setzero_si512();
            for (int c = 0; c < NW; c++)
                a = _mm512_dpwssd_epi32(a, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(kr + c * 32))), qv[c]);
            acc[jj] = a;
        }
        const __m512 sc = _mm512_cvtepi32_ps(hsum16_epi32(acc));
        float kscale[KEY_BLOCK];
        for (int jj = 0; jj < KEY_BLOCK; jj++) kscale[jj] = ks[(size_t)sl[j0 + jj] * Hkv + h];
        _mm512_storeu_ps(sg + j0, _mm512_mul_ps(_mm512_mul_ps(sc, _mm512_set1_ps(qk_scale)), _mm512_loadu_ps(kscale)));
    }
    for (int j = j0; j < L; j++) {
        const int8_t *kr = kc + ((size_t)sl[j] * Hkv + h) * D;
        __m512i a = _mm512_setzero_si512();
        for (int c = 0; c < NW; c++)
            a = _mm512_dpwssd_epi32(a, _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(kr + c * 32))), qv[c]);
        sg[j] = (float)_mm512_reduce_add_epi32(a) * qk_scale * ks[(size_t)sl[j] * Hkv + h];
    }
}

// Softmax of sg[0:L] in place, then each weight times its value's scale.
static void softmax_fold_scales(float *sg, int L, const float *vs, const int64_t *sl, int Hkv, int h) {
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
    const float inv = 1.0f / _mm512_reduce_add_ps(vsum);
    for (j = 0; j < L; j++) sg[j] *= inv * vs[(size_t)sl[j] * Hkv + h];
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

// out[g][0:D] = sum_{j < L} p[g * pstride + j] * v[sl[j], h] for G query vectors, PV_GROUP at a time.
static void pv_head(const float *p, int pstride, int L, const int8_t *vc, const int64_t *sl, int Hkv, int h, int D,
                    int G, float *out) {
    for (int g0 = 0; g0 < G; g0 += PV_GROUP) {
        const int ng = G - g0 < PV_GROUP ? G - g0 : PV_GROUP;
        const float *pg = p + (size_t)g0 * pstride;
        float *og = out + (size_t)g0 * D;
        switch (ng) {
            case 1: pv_group(pg, L, vc, sl, Hkv, h, D, 1, og, pstride); break;
            case 2: pv_group(pg, L, vc, sl, Hkv, h, D, 2, og, pstride); break;
            case 3: pv_group(pg, L, vc, sl, Hkv, h, D, 3, og, pstride); break;
            case 4: pv_group(pg, L, vc, sl, Hkv, h, D, 4, og, pstride); break;
            case 5: pv_group(pg, L, vc, sl, Hkv, h, D, 5, og, pstride); break;
            case 6: pv_group(pg, L, vc, sl, Hkv, h, D, 6, og, pstride); break;
            case 7: pv_group(pg, L, vc, sl, Hkv, h, D, 7, og, pstride); break;
            default: pv_group(pg, L, vc, sl, Hkv, h, D, PV_GROUP, og, pstride); break;
        }
    }
}

// Returns 0 on success, -1 when the shapes are outside what this kernel handles (caller falls back).
int paged_attention_decode_int8(const float *q, int S, int Hq, int Hkv, int D, const int8_t *kc, const float *ks,
                                const int8_t *vc, const float *vs, const int64_t *slots, const int32_t *lens, int Lmax,
                                float scale, float *out) {
    if (D % 32 || D > MAX_D || Hq % Hkv || Hq / Hkv > MAX_G) return -1;
    const int G = Hq / Hkv;
    // Fewer sequences than threads: split each sequence's heads into chunks (a divisor of Hkv).
    int chunks = 1;
    while (chunks < Hkv && S * chunks < ITEMS_PER_THREAD * omp_get_max_threads()) {
        chunks++;
        while (Hkv % chunks) chunks++;
    }
    const int HC = Hkv / chunks, Lalloc = Lmax > 0 ? Lmax : 1;
#pragma omp parallel
    {
        float *scores = (float *)malloc(sizeof(float) * (size_t)G * (Lalloc + KEY_BLOCK));
        int16_t q16[MAX_D];
#pragma omp for schedule(dynamic)
        for (int w = 0; w < S * chunks; w++) {
            const int s = w / chunks, h0 = (w % chunks) * HC, L = lens[s];
            const int64_t *sl = slots + (size_t)s * Lmax;
            for (int h = h0; h < h0 + HC; h++) {
                for (int g = 0; g < G; g++) {
                    const float sq = quantize_q16(q + ((size_t)s * Hq + (size_t)h * G + g) * D, D, q16);
                    scores_one_head(q16, sq * scale, kc, ks, sl, L, Hkv, h, D, scores + (size_t)g * L);
                    softmax_fold_scales(scores + (size_t)g * L, L, vs, sl, Hkv, h);
                }
                pv_head(scores, L, L, vc, sl, Hkv, h, D, G, out + ((size_t)s * Hq + (size_t)h * G) * D);
            }
        }
        free(scores);
    }
    return 0;
}

// ---------------------------------------------------------------------------------------------------
// Prefill / chunked-prefill attention of one sequence, from the same paged INT8 cache (the chunk's own
// K/V are already written). Query i of the chunk sits at absolute position start + i and attends keys
// 0..start + i. A work item is (KV head, tile of PF_ROWS query positions): its PF_ROWS x G query vectors
// share every key and value they read, which is converted once per item (GQA reuse); q . k is the
// integer product of the decode kernel, 16 keys reduced at a time; p . v as in pv_group.
#define PF_ROWS 4
#define PF_QV_MAX (PF_ROWS * MAX_G)

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

// q: rows [nq] of Hq heads x D, row stride q_stride floats; out: [nq, Hq * D] contiguous.
int paged_attention_prefill_int8(const float *q, int q_stride, int nq, int start, int Hq, int Hkv, int D,
                                 const int8_t *kc, const float *ks, const int8_t *vc, const float *vs,
                                 const int64_t *slots, float scale, float *out) {
    if (D % 32 || D > MAX_D || Hq % Hkv || Hq / Hkv > MAX_G) return -1;
    const int G = Hq / Hkv, ntiles = (nq + PF_ROWS - 1) / PF_ROWS, ctx = start + nq;
    const int stride = (ctx + KEY_BLOCK - 1) / KEY_BLOCK * KEY_BLOCK;  // scores row length, whole key blocks
#pragma omp parallel
    {
        float *scores = (float *)malloc(sizeof(float) * (size_t)PF_QV_MAX * stride);
        int16_t *q16 = (int16_t *)malloc(sizeof(int16_t) * (size_t)PF_QV_MAX * D);
        int16_t *kb = (int16_t *)malloc(sizeof(int16_t) * (size_t)KEY_BLOCK * D);
        float *tmp = (float *)malloc(sizeof(float) * (size_t)PF_QV_MAX * D);
        float qk_scale[PF_QV_MAX], kscale[KEY_BLOCK];
#pragma omp for schedule(dynamic)
        for (int w = 0; w < Hkv * ntiles; w++) {
            // later tiles attend more keys: hand them out first so the dynamic schedule balances
            const int h = w % Hkv, t = ntiles - 1 - w / Hkv;
            const int r0 = t * PF_ROWS, nr = nq - r0 < PF_ROWS ? nq - r0 : PF_ROWS, nqv = nr * G;
            const int nkeys = start + r0 + nr;  // keys the last row of the tile attends
            for (int r = 0; r < nr; r++)
                for (int g = 0; g < G; g++)
                    qk_scale[r * G + g] = quantize_q16(q + (size_t)(r0 + r) * q_stride + (size_t)(h * G + g) * D, D,
                                                       q16 + (size_t)(r * G + g) * D) * scale;
            for (int j0 = 0; j0 < nkeys; j0 += KEY_BLOCK) {
                const int nb = nkeys - j0 < KEY_BLOCK ? nkeys - j0 : KEY_BLOCK;
                for (int jj = 0; jj < KEY_BLOCK; jj++) {
                    if (jj < nb) {
                        const size_t row = (size_t)slots[j0 + jj] * Hkv + h;
                        const int8_t *kr = kc + row * D;
                        for (int c = 0; c < D / 32; c++)
                            _mm512_storeu_si512((void *)(kb + (size_t)jj * D + c * 32),
                                                _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(kr + c * 32))));
                        kscale[jj] = ks[row];
                    } else {  // past the last key: zeros, masked below
                        memset(kb + (size_t)jj * D, 0, sizeof(int16_t) * D);
                        kscale[jj] = 0.0f;
                    }
                }
                scores_key_block(q16, qk_scale, nqv, kb, kscale, D, scores, stride, j0);
            }
            for (int r = 0; r < nr; r++) {
                const int L = start + r0 + r + 1;  // causal: keys 0..position
                for (int g = 0; g < G; g++) {
                    float *sg = scores + (size_t)(r * G + g) * stride;
                    softmax_fold_scales(sg, L, vs, slots, Hkv, h);
                    for (int j = L; j < nkeys; j++) sg[j] = 0.0f;
                }
            }
            // p . v for all nqv vectors of the tile (vector v = r * G + g)
            pv_head(scores, stride, nkeys, vc, slots, Hkv, h, D, nqv, tmp);
            for (int v = 0; v < nqv; v++) {
                const int r = v / G, g = v % G;
                memcpy(out + ((size_t)(r0 + r) * Hq + (size_t)h * G + g) * D, tmp + (size_t)v * D, sizeof(float) * D);
            }
        }
        free(scores);
        free(q16);
        free(kb);
        free(tmp);
    }
    return 0;
}
