// The NEON family's paged_attention.c (aarch64): attention straight from the paged INT8 cache, decode and causal
// (chunked) prefill, with the same entry points, shape limits and work items as the AVX-512 kernel and the same
// results bit for bit:
//   - q . k and (decode) p . v are exact INT32 sums (INT16 x INT16 products by smlal), as vpdpwssd's;
//   - every float step is the same fp32 operation on each element (exp_neon is exp512 bit for bit,
//     row_prologue_neon.h; vfmaq_f32 is one fused multiply-add as vfmadd231ps), and each float sum adds the same
//     terms in the same order: a decode item's in the AVX-512 kernel's lane layout (paged_attention_lanes.h), the
//     prefill's softmax sum in its 16 lanes (four 4-lane quarters) and _mm512_reduce_add_ps's order.
#include <arm_neon.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"
#include "paged_attention_lanes.h"
#include "row_prologue_neon.h"

#define VEC 4  // fp32 / int32 lanes per register

// paged_attention_lanes.h's steps: exp_neon over a run (padded to whole vectors), fcvtns's rounding.
static void exp_run(float *v, int n) {
    for (int p = 0; p < n; p += VEC) vst1q_f32(v + p, exp_neon(vld1q_f32(v + p)));
}

static inline int32_t round_half_even(float x) { return vcvtns_s32_f32(x); }

// lanes [0, n) set (n may be <= 0 or >= 4)
static inline uint32x4_t lanes_below(int n) {
    static const int32_t iota[4] = {0, 1, 2, 3};
    return vcltq_s32(vld1q_s32(iota), vdupq_n_s32(n));
}

// q row [D] fp32 -> q16 [D] int16; returns the scale (paged_attention.c quantize_q16; vqmovn saturates as vpmovsdw).
static float quantize_q16(const float *q, int D, int16_t *q16) {
    float32x4_t vmax = vdupq_n_f32(0.0f);
    for (int d = 0; d < D; d += VEC) vmax = vmaxq_f32(vmax, vabsq_f32(vld1q_f32(q + d)));
    const float s = vmaxvq_f32(vmax) / Q_MAX, inv = s > 0.0f ? 1.0f / s : 0.0f;
    const float32x4_t vinv = vdupq_n_f32(inv);
    for (int d = 0; d < D; d += VEC) vst1_s16(q16 + d, vqmovn_s32(vcvtnq_s32_f32(vmulq_f32(vld1q_f32(q + d), vinv))));
    return s;
}

// The exact INT32 q16 row . INT16 key row.
static inline int32_t dot16(const int16_t *k16, const int16_t *q16, int D) {
    int32x4_t a = vdupq_n_s32(0), b = vdupq_n_s32(0);
    for (int d = 0; d < D; d += 8) {
        const int16x8_t k = vld1q_s16(k16 + d), q = vld1q_s16(q16 + d);
        a = vmlal_s16(a, vget_low_s16(k), vget_low_s16(q));
        b = vmlal_high_s16(b, k, q);
    }
    return vaddvq_s32(vaddq_s32(a, b));
}

// An INT8 key row -> INT16 (the prefill's key block; decode's key row).
static void widen_key_row(const int8_t *kr, int D, int16_t *kb) {
    for (int d = 0; d < D; d += 16) {
        const int8x16_t v = vld1q_s8(kr + d);
        vst1q_s16(kb + d, vmovl_s8(vget_low_s8(v)));
        vst1q_s16(kb + d + 8, vmovl_high_s8(v));
    }
}

// ---------------------------------------------------------------------------------------------------
// Decode.

// Exact q . k of the item's NQV query vectors (HC heads of G) with each of its L keys: dots[j * NQV + i]; the V
// rows are staged per head on the way (vstage[hi][j][0:D]), as the AVX-512 kernel does.
static void item_dots(const int16_t *q16, int NQV, int G, int D, const int8_t *kc, const int8_t *vc, const int64_t *sl,
                      int L, int Hkv, int h0, int32_t *dots, int8_t *vstage, int vplane) {
    const int HC = NQV / G;
    for (int j = 0; j < L; j++) {
        prefetch_item_slot(kc, vc, sl, j + PREFETCH_SLOTS, L, Hkv, h0, HC, D);
        const size_t row = (size_t)sl[j] * Hkv + h0;
        for (int hi = 0; hi < HC; hi++) {
            int16_t k16[MAX_D];
            widen_key_row(kc + (row + hi) * D, D, k16);
            for (int g = 0; g < G; g++) dots[j * NQV + hi * G + g] = dot16(k16, q16 + (size_t)(hi * G + g) * D, D);
            memcpy(vstage + ((size_t)hi * vplane + j) * D, vc + (row + hi) * D, D);
        }
    }
}

// out[i][0:D] = oscale[i] * sum_j p16[j * NQV + i] v_(i's head)[j], exact in INT32 over PV_FLUSH keys at a time
// (paged_attention.c pv16_rows), each flush converted and added in fp32 in turn.
static void item_pv(const int16_t *p16, int NQV, int G, const float *oscale, int L, const int8_t *vstage, int vplane,
                    int D, float *out) {
    for (int i = 0; i < NQV; i++) {
        const int8_t *v = vstage + (size_t)(i / G) * vplane * D;
        for (int d0 = 0; d0 < D; d0 += 16) {  // 16 dims: four accumulators
            float32x4_t fo[4];
            for (int c = 0; c < 4; c++) fo[c] = vdupq_n_f32(0.0f);
            for (int f0 = 0; f0 < L; f0 += PV_FLUSH) {
                const int f1 = L - f0 < PV_FLUSH ? L : f0 + PV_FLUSH;
                int32x4_t acc[4];
                for (int c = 0; c < 4; c++) acc[c] = vdupq_n_s32(0);
                for (int j = f0; j < f1; j++) {
                    const int16_t p = p16[(size_t)j * NQV + i];
                    const int8x16_t vr = vld1q_s8(v + (size_t)j * D + d0);
                    const int16x8_t lo = vmovl_s8(vget_low_s8(vr)), hi = vmovl_high_s8(vr);
                    acc[0] = vmlal_n_s16(acc[0], vget_low_s16(lo), p);
                    acc[1] = vmlal_high_n_s16(acc[1], lo, p);
                    acc[2] = vmlal_n_s16(acc[2], vget_low_s16(hi), p);
                    acc[3] = vmlal_high_n_s16(acc[3], hi, p);
                }
                for (int c = 0; c < 4; c++) fo[c] = vaddq_f32(fo[c], vcvtq_f32_s32(acc[c]));
            }
            const float32x4_t s = vdupq_n_f32(oscale[i]);
            for (int c = 0; c < 4; c++) vst1q_f32(out + (size_t)i * D + d0 + c * VEC, vmulq_f32(fo[c], s));
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
        float *row = scores + (size_t)v * stride + j0;
        for (int jj = 0; jj < KEY_BLOCK; jj++) row[jj] = (float)dot16(kb + (size_t)jj * D, qv, D) * qk_scale[v] * kscale[jj];
    }
}

// Softmax of sg[0:L] in place, each weight times its value's scale vscale[j]; sg[L:n] set to 0 (paged_attention.c
// softmax_fold_scales: the sum of e in its 16 lanes, four quarters here, reduced in its order). Rows are whole key
// blocks long, so the vectors past L and n stay in the row (they are set to 0).
static void softmax_fold_scales(float *sg, int L, int n, const float *vscale) {
    float m = -INFINITY;
    for (int j = 0; j < L; j++) m = sg[j] > m ? sg[j] : m;
    const float32x4_t vmax = vdupq_n_f32(m), zero = vdupq_n_f32(0.0f);
    float32x4_t q[4] = {zero, zero, zero, zero};
    for (int j = 0; j < L; j += 4 * VEC)
        for (int i = 0; i < 4; i++) {
            const float32x4_t e = vbslq_f32(lanes_below(L - j - i * VEC), exp_neon(vsubq_f32(vld1q_f32(sg + j + i * VEC), vmax)), zero);
            q[i] = vaddq_f32(q[i], e);
            vst1q_f32(sg + j + i * VEC, e);
        }
    const float32x4_t vinv = vdupq_n_f32(1.0f / reduce_add_16(q[0], q[1], q[2], q[3]));
    for (int j = 0; j < n; j += VEC) {
        const float32x4_t w = vmulq_f32(vld1q_f32(sg + j), vmulq_f32(vinv, vld1q_f32(vscale + j)));
        vst1q_f32(sg + j, vbslq_f32(lanes_below(L - j), w, zero));
    }
}

// out[g][c*4 : c*4+4] = sum_j p[g * pstride + j] * v[sl[j], h][c*4 : ...] for NG query heads, fp32 fused
// multiply-adds in key order (paged_attention.c pv_group's per-element operations).
static inline __attribute__((always_inline)) void pv_group(const float *p, int L, const int8_t *vc, const int64_t *sl,
                                                           int Hkv, int h, int D, int NG, float *out, int pstride) {
    for (int c = 0; c < D / VEC; c++) {
        float32x4_t acc[PV_GROUP];
        for (int g = 0; g < NG; g++) acc[g] = vdupq_n_f32(0.0f);
        for (int j = 0; j < L; j++) {
            if (c == 0 && j + PREFETCH_SLOTS < L) prefetch_run(vc + ((size_t)sl[j + PREFETCH_SLOTS] * Hkv + h) * D, D);
            const int8_t *vr = vc + ((size_t)sl[j] * Hkv + h) * D + c * VEC;
            int32_t four;
            memcpy(&four, vr, 4);
            const int8x8_t b = vreinterpret_s8_s32(vdup_n_s32(four));
            const float32x4_t v = vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(b))));
            for (int g = 0; g < NG; g++) acc[g] = vfmaq_f32(acc[g], vdupq_n_f32(p[(size_t)g * pstride + j]), v);
        }
        for (int g = 0; g < NG; g++) vst1q_f32(out + (size_t)g * D + c * VEC, acc[g]);
    }
}

#include "paged_attention_driver.h"
