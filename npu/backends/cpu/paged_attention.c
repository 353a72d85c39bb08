// Decode attention straight from the paged INT8 KV cache (one query token per sequence), AVX-512.
//
// For sequence s and KV head h, with its G = Hq / Hkv query heads:
//   score[g, j] = (q[s, h*G+g] . k_int8[slot_j, h]) * k_scale[slot_j, h] * scale
//   p[g] = softmax(score[g]);  out[s, h*G+g] = sum_j p[g, j] * v_scale[slot_j, h] * v_int8[slot_j, h]
// Keys and values are read through each sequence's slot list and dequantized in registers: no copy of
// the cache is made. Work is split over (sequence, KV head) pairs.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define VEC 16
#define MAX_D 256
#define MAX_G 16

static inline __m512 load_i8_as_f32(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

// Returns 0 on success, -1 when the shapes are outside what this kernel handles (caller falls back).
int paged_attention_decode_int8(const float *q, int S, int Hq, int Hkv, int D, const int8_t *kc, const float *ks,
                                const int8_t *vc, const float *vs, const int64_t *slots, const int32_t *lens, int Lmax,
                                float scale, float *out) {
    if (D % VEC || D > MAX_D || Hq % Hkv || Hq / Hkv > MAX_G) return -1;
    const int G = Hq / Hkv, ND = D / VEC;
#pragma omp parallel
    {
        float *scores = (float *)malloc(sizeof(float) * (size_t)G * (Lmax > 0 ? Lmax : 1));
#pragma omp for schedule(dynamic)
        for (int w = 0; w < S * Hkv; w++) {
            const int s = w / Hkv, h = w % Hkv, L = lens[s];
            const int64_t *sl = slots + (size_t)s * Lmax;
            const float *qs = q + ((size_t)s * Hq + (size_t)h * G) * D;
            // scores
            for (int j = 0; j < L; j++) {
                const size_t row = (size_t)sl[j] * Hkv + h;
                const int8_t *kr = kc + row * D;
                const float kscale = ks[row] * scale;
                for (int g = 0; g < G; g++) {
                    __m512 acc = _mm512_setzero_ps();
                    for (int c = 0; c < ND; c++)
                        acc = _mm512_fmadd_ps(_mm512_loadu_ps(qs + (size_t)g * D + c * VEC), load_i8_as_f32(kr + c * VEC), acc);
                    scores[(size_t)g * L + j] = _mm512_reduce_add_ps(acc) * kscale;
                }
            }
            // softmax per query head (fp32), then weights fold in the value scales
            for (int g = 0; g < G; g++) {
                float *sg = scores + (size_t)g * L, m = -INFINITY, sum = 0.0f;
                for (int j = 0; j < L; j++) m = sg[j] > m ? sg[j] : m;
                for (int j = 0; j < L; j++) { sg[j] = expf(sg[j] - m); sum += sg[j]; }
                const float inv = 1.0f / sum;
                for (int j = 0; j < L; j++) sg[j] *= inv * vs[(size_t)sl[j] * Hkv + h];
            }
            // weighted sum of values
            for (int g = 0; g < G; g++) {
                __m512 acc[MAX_D / VEC];
                for (int c = 0; c < ND; c++) acc[c] = _mm512_setzero_ps();
                const float *pg = scores + (size_t)g * L;
                for (int j = 0; j < L; j++) {
                    const int8_t *vr = vc + ((size_t)sl[j] * Hkv + h) * D;
                    const __m512 p = _mm512_set1_ps(pg[j]);
                    for (int c = 0; c < ND; c++) acc[c] = _mm512_fmadd_ps(p, load_i8_as_f32(vr + c * VEC), acc[c]);
                }
                float *o = out + ((size_t)s * Hq + (size_t)h * G + g) * D;
                for (int c = 0; c < ND; c++) _mm512_storeu_ps(o + c * VEC, acc[c]);
            }
        }
        free(scores);
    }
    return 0;
}
