// A decode work item of the paged INT8 attention kernels for the families narrower than the AVX-512 one
// (paged_attention_avx2.c, paged_attention_neon.c): the item's softmax element by element, with every float sum in
// the AVX-512 kernel's lane order (paged_attention_common.h ITEM_QV_MAX), so that all families give its bits; and
// the item's scratch and steps. The family defines, after including this:
//   exp_run(v, n)                  v[0:n] = exp512(v[0:n]) bit for bit, in place (v has PAD_LANES floats more)
//   round_half_even(x)             x rounded to an int32 as vcvtps2dq does (to nearest, ties to even)
//   item_dots(...), item_pv(...)   the exact INT32 q . k of an item's keys (staging its V rows), and its p . v
#pragma once
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "paged_attention_common.h"

#define PAD_LANES 8  // floats of padding after a scratch row: the widest of these families' vectors

// Prefetches the K and V rows of the item's HC heads at its key j, where j < L (the slot list is an indirection
// the hardware prefetcher cannot follow).
static inline void prefetch_item_slot(const int8_t *kc, const int8_t *vc, const int64_t *sl, int j, int L, int Hkv,
                                      int h0, int HC, int D) {
    if (j >= L) return;
    const size_t at = ((size_t)sl[j] * Hkv + h0) * D;
    prefetch_run(kc + at, HC * D);
    prefetch_run(vc + at, HC * D);
}

static void exp_run(float *v, int n);
static inline int32_t round_half_even(float x);
static void item_dots(const int16_t *q16, int NQV, int G, int D, const int8_t *kc, const int8_t *vc,
                      const int64_t *sl, int L, int Hkv, int h0, int32_t *dots, int8_t *vstage, int vplane);
static void item_pv(const int16_t *p16, int NQV, int G, const float *oscale, int L, const int8_t *vstage, int vplane,
                    int D, float *out);

// From the dots: scores, their softmax per query vector (unnormalized, e = exp(score - max)) times the V scales,
// rounded to INT16 per query vector: p16[j * NQV + i] with scale psc[i]; rmax[i] and rsum[i] are the max score and
// the sum of e (paged_attention.c probs_int16, which the caller normalizes alike). sv: scratch of L * NQV + PAD_LANES
// floats. Two zero keys of padding follow key L - 1.
static void item_probs(const int32_t *dots, const float *qs, int NQV, int G, int L, const float *ks, const float *vs,
                       const int64_t *sl, int Hkv, int h0, float *sv, int16_t *p16, float *psc, float *rmax,
                       float *rsum) {
    const int n = L * NQV, KN = ITEM_QV_MAX / NQV * NQV;  // the AVX-512 kernel's used lanes per vector
    for (int i = 0; i < NQV; i++) rmax[i] = -INFINITY;
    for (int j = 0; j < L; j++) {
        const float *kr = ks + (size_t)sl[j] * Hkv + h0;
        for (int i = 0; i < NQV; i++) {
            const float s = (float)dots[j * NQV + i] * qs[i] * kr[i / G];  // (dot * q scale) * k scale, as there
            sv[j * NQV + i] = s;
            rmax[i] = s > rmax[i] ? s : rmax[i];
        }
    }
    for (int j = 0; j < L; j++)
        for (int i = 0; i < NQV; i++) sv[j * NQV + i] -= rmax[i];
    for (int p = n; p < n + PAD_LANES; p++) sv[p] = 0.0f;
    exp_run(sv, n);
    // the sum of e per query vector in the AVX-512 kernel's order: each lane over the vectors in turn, then the
    // lanes of one query vector (k * NQV + i, k = 0, 1, ...) in turn
    float lane[ITEM_QV_MAX] = {0};
    for (int b = 0; b * KN < n; b++)
        for (int l = 0; l < KN && b * KN + l < n; l++) lane[l] += sv[b * KN + l];
    for (int i = 0; i < NQV; i++) {
        float a = lane[i];
        for (int k = 1; k < KN / NQV; k++) a += lane[k * NQV + i];
        rsum[i] = a;
    }
    float pmax[ITEM_QV_MAX] = {0}, qscale[ITEM_QV_MAX];
    for (int j = 0; j < L; j++) {
        const float *vr = vs + (size_t)sl[j] * Hkv + h0;
        for (int i = 0; i < NQV; i++) {
            const float p = sv[j * NQV + i] * vr[i / G];
            sv[j * NQV + i] = p;
            pmax[i] = p > pmax[i] ? p : pmax[i];
        }
    }
    for (int i = 0; i < NQV; i++) {
        psc[i] = pmax[i] / Q_MAX;
        qscale[i] = pmax[i] > 0.0f ? Q_MAX / pmax[i] : 0.0f;
    }
    for (int j = 0; j < L; j++)
        for (int i = 0; i < NQV; i++) {
            const int32_t r = round_half_even(sv[j * NQV + i] * qscale[i]);  // vcvtps2dq's rounding
            p16[j * NQV + i] = (int16_t)(r > 32767 ? 32767 : r < -32768 ? -32768 : r);
        }
    memset(p16 + (size_t)n, 0, sizeof(int16_t) * 2 * NQV);
}

// One decode work item's scratch: the dot products, scores, INT16 weights and staged V rows.
static size_t decode_scratch_bytes(int NQV, int HC, int Lcap, int D) {
    return scratch_round(sizeof(int32_t) * ((size_t)Lcap * NQV + PAD_LANES)) +
           scratch_round(sizeof(float) * ((size_t)Lcap * NQV + 2 * PAD_LANES)) +
           scratch_round(sizeof(int16_t) * (size_t)NQV * (Lcap + 2)) + scratch_round((size_t)HC * Lcap * D);
}

// One decode work item (paged_attention_driver.h), as paged_attention.c decode_item.
static void decode_item(const int16_t *q16, const float *qs, int NQV, int G, int D, const int8_t *kc, const float *ks,
                        const int8_t *vc, const float *vs, const int64_t *sl, int L, int Hkv, int h0, int Lcap,
                        char *scratch, int normalize, float *out, float *rmax, float *rsum) {
    int32_t *dots = (int32_t *)scratch;
    float *sv = (float *)((char *)dots + scratch_round(sizeof(int32_t) * ((size_t)Lcap * NQV + PAD_LANES)));
    int16_t *p16 = (int16_t *)((char *)sv + scratch_round(sizeof(float) * ((size_t)Lcap * NQV + 2 * PAD_LANES)));
    int8_t *vstage = (int8_t *)p16 + scratch_round(sizeof(int16_t) * (size_t)NQV * (Lcap + 2));
    float psc[ITEM_QV_MAX];
    item_dots(q16, NQV, G, D, kc, vc, sl, L, Hkv, h0, dots, vstage, Lcap);
    item_probs(dots, qs, NQV, G, L, ks, vs, sl, Hkv, h0, sv, p16, psc, rmax, rsum);
    if (normalize)
        for (int i = 0; i < NQV; i++) psc[i] /= rsum[i];
    item_pv(p16, NQV, G, psc, L, vstage, Lcap, D, out);
}

