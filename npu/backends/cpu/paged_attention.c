// Decode attention straight from the paged INT8 KV cache (one query token per sequence), AVX-512.
//
// For sequence s and KV head h, with its G = Hq / Hkv query heads:
//   score[g, j] = (q[s, h*G+g] . k_int8[slot_j, h]) * k_scale[slot_j, h] * scale
//   p[g] = softmax(score[g]);  out[s, h*G+g] = sum_j p[g, j] * v_scale[slot_j, h] * v_int8[slot_j, h]
// Keys and values are read through each sequence's slot list and dequantized in registers: no copy of
// the cache is made. A slot holds all KV heads of a token contiguously, so a work item takes a sequence
// and a range of its heads and walks the slots once, reading each slot's heads as one contiguous run
// (one work item per head walked the cache at a stride of a whole slot, 8x slower from DRAM, measured).
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd_math.h"

#define VEC 16
#define MAX_D 256
#define MAX_G 16
// Work items per thread to aim for when splitting heads (a little slack for uneven context lengths).
#define ITEMS_PER_THREAD 2
// Slots ahead to prefetch: the slot list is an indirection the hardware prefetcher cannot follow.
#define PREFETCH_SLOTS 8
#define CACHE_LINE 64

static inline void prefetch_run(const int8_t *p, int bytes) {
    for (int b = 0; b < bytes; b += CACHE_LINE) _mm_prefetch((const char *)(p + b), _MM_HINT_T0);
}

static inline __m512 load_i8_as_f32(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

// Softmax of sg[0:L] in place, then each weight times its value scale vscale[j * vstride].
static void softmax_fold_scales(float *sg, int L, const float *vscale, const int64_t *sl, int Hkv, int h) {
    __m512 vm = _mm512_set1_ps(-INFINITY);
    int j = 0;
    for (; j + VEC <= L; j += VEC) vm = _mm512_max_ps(vm, _mm512_loadu_ps(sg + j));
    float m = _mm512_reduce_max_ps(vm);
    for (; j < L; j++) m = sg[j] > m ? sg[j] : m;
    const __m512 vmax = _mm512_set1_ps(m);
    __m512 vsum = _mm512_setzero_ps();
    for (j = 0; j < L; j += VEC) {
        const __mmask16 mask = L - j >= VEC ? (__mmask16)0xFFFF : (__mmask16)((1u << (L - j)) - 1u);
        __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, sg + j), vmax));
        e = _mm512_maskz_mov_ps(mask, e);
        vsum = _mm512_add_ps(vsum, e);
        _mm512_mask_storeu_ps(sg + j, mask, e);
    }
    const float inv = 1.0f / _mm512_reduce_add_ps(vsum);
    for (j = 0; j < L; j++) sg[j] *= inv * vscale[(size_t)sl[j] * Hkv + h];
}

// Returns 0 on success, -1 when the shapes are outside what this kernel handles (caller falls back).
int paged_attention_decode_int8(const float *q, int S, int Hq, int Hkv, int D, const int8_t *kc, const float *ks,
                                const int8_t *vc, const float *vs, const int64_t *slots, const int32_t *lens, int Lmax,
                                float scale, float *out) {
    if (D % VEC || D > MAX_D || Hq % Hkv || Hq / Hkv > MAX_G) return -1;
    const int G = Hq / Hkv, ND = D / VEC;
    // Fewer sequences than threads: split each sequence's heads into chunks (a divisor of Hkv).
    int chunks = 1;
    while (chunks < Hkv && S * chunks < ITEMS_PER_THREAD * omp_get_max_threads()) {
        chunks++;
        while (Hkv % chunks) chunks++;
    }
    const int HC = Hkv / chunks, Lalloc = Lmax > 0 ? Lmax : 1;
#pragma omp parallel
    {
        float *scores = (float *)malloc(sizeof(float) * (size_t)HC * G * Lalloc);
        float *acc = (float *)aligned_alloc(64, sizeof(float) * (size_t)HC * G * D);
#pragma omp for schedule(dynamic)
        for (int w = 0; w < S * chunks; w++) {
            const int s = w / chunks, h0 = (w % chunks) * HC, L = lens[s];
            const int64_t *sl = slots + (size_t)s * Lmax;
            const float *qs = q + (size_t)s * Hq * D;
            // scores: one pass over the slots, all heads of the chunk per slot
            for (int j = 0; j < L; j++) {
                const size_t row = (size_t)sl[j] * Hkv;
                if (j + PREFETCH_SLOTS < L) prefetch_run(kc + ((size_t)sl[j + PREFETCH_SLOTS] * Hkv + h0) * D, HC * D);
                for (int hh = 0; hh < HC; hh++) {
                    const int h = h0 + hh;
                    const int8_t *kr = kc + (row + h) * D;
                    __m512 kf[MAX_D / VEC];
                    for (int c = 0; c < ND; c++) kf[c] = load_i8_as_f32(kr + c * VEC);
                    const float kscale = ks[row + h] * scale;
                    for (int g = 0; g < G; g++) {
                        const float *qg = qs + (size_t)(h * G + g) * D;
                        __m512 a0 = _mm512_setzero_ps(), a1 = a0;
                        int c = 0;
                        for (; c + 1 < ND; c += 2) {
                            a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qg + c * VEC), kf[c], a0);
                            a1 = _mm512_fmadd_ps(_mm512_loadu_ps(qg + (c + 1) * VEC), kf[c + 1], a1);
                        }
                        if (c < ND) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qg + c * VEC), kf[c], a0);
                        scores[((size_t)hh * G + g) * L + j] = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1)) * kscale;
                    }
                }
            }
            for (int hh = 0; hh < HC; hh++)
                for (int g = 0; g < G; g++) softmax_fold_scales(scores + ((size_t)hh * G + g) * L, L, vs, sl, Hkv, h0 + hh);
            // weighted sum of values, again one pass over the slots
            memset(acc, 0, sizeof(float) * (size_t)HC * G * D);
            for (int j = 0; j < L; j++) {
                const size_t row = (size_t)sl[j] * Hkv;
                if (j + PREFETCH_SLOTS < L) prefetch_run(vc + ((size_t)sl[j + PREFETCH_SLOTS] * Hkv + h0) * D, HC * D);
                for (int hh = 0; hh < HC; hh++) {
                    const int8_t *vr = vc + (row + h0 + hh) * D;
                    __m512 vf[MAX_D / VEC];
                    for (int c = 0; c < ND; c++) vf[c] = load_i8_as_f32(vr + c * VEC);
                    for (int g = 0; g < G; g++) {
                        const __m512 p = _mm512_set1_ps(scores[((size_t)hh * G + g) * L + j]);
                        float *a = acc + ((size_t)hh * G + g) * D;
                        for (int c = 0; c < ND; c++)
                            _mm512_store_ps(a + c * VEC, _mm512_fmadd_ps(p, vf[c], _mm512_load_ps(a + c * VEC)));
                    }
                }
            }
            for (int hh = 0; hh < HC; hh++)
                memcpy(out + ((size_t)s * Hq + (size_t)(h0 + hh) * G) * D, acc + (size_t)hh * G * D, sizeof(float) * G * D);
        }
        free(scores);
        free(acc);
    }
    return 0;
}
