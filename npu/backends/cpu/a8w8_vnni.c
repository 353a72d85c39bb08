// A8W8 GEMM for small M (decode) with AVX-512 VNNI, built by npu/backends/cpu/vnni.py with gcc.
//
// out[m, n] = (sum_k q_x[m, k] * q_w[n, k]) * s_x[m] * s_w[n], INT32 accumulation, fp32 out.
// Activations are quantized here, per token, exactly as loaders.quantization.quantize_activations:
//   s = absmax / 127; q = clamp(round_half_even(x / max(s, 1e-30)), -127, 127).
// vpdpbusd multiplies unsigned by signed bytes, so q_x is stored as q_x + 128 and the product is
// corrected with 128 * sum_k q_w[n, k] (precomputed per output channel): exact in INT32.
// Weights are packed as [N/16][K/4][16][4]: one 64-byte load gives 4 consecutive k of 16 channels,
// so a broadcast of 4 activation bytes and one vpdpbusd advance 16 accumulators, with no horizontal sums.
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define NB 16          // output channels per block (one zmm of int32)
#define KG 4           // k values per vpdpbusd lane
#define MAX_MC 8       // activation rows sharing one weight load
#define MIN_DIVISOR 1e-30f

int a8w8_packed_k(int K) { return (K + KG - 1) / KG * KG; }
int a8w8_packed_n(int N) { return (N + NB - 1) / NB * NB; }

// w: [N, K] int8 row-major -> wp: [Np/16][Kp/4][16][4], wsum: [Np]
void a8w8_pack(const int8_t *w, int N, int K, int8_t *wp, int32_t *wsum) {
    int Kp = a8w8_packed_k(K), Np = a8w8_packed_n(N);
    memset(wp, 0, (size_t)Np * Kp);
    for (int n = 0; n < Np; n++) {
        int32_t s = 0;
        if (n < N) {
            for (int k = 0; k < K; k++) {
                int8_t v = w[(size_t)n * K + k];
                s += v;
                size_t idx = (((size_t)(n / NB) * (Kp / KG) + k / KG) * NB + n % NB) * KG + k % KG;
                wp[idx] = v;
            }
        }
        wsum[n] = s;
    }
}

// x: [M, K] fp32 -> xq: [M, Kp] uint8 (q + 128), sx: [M]
static void quantize_rows(const float *x, int M, int K, int Kp, uint8_t *xq, float *sx) {
    for (int m = 0; m < M; m++) {
        const float *row = x + (size_t)m * K;
        __m512 vmax = _mm512_setzero_ps();
        int k = 0;
        for (; k + 16 <= K; k += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(row + k)));
        float absmax = _mm512_reduce_max_ps(vmax);
        for (; k < K; k++) absmax = fmaxf(absmax, fabsf(row[k]));
        float s = absmax / 127.0f;
        sx[m] = s;
        float div = s > MIN_DIVISOR ? s : MIN_DIVISOR;
        __m512 vdiv = _mm512_set1_ps(div), lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
        uint8_t *out = xq + (size_t)m * Kp;
        for (k = 0; k + 16 <= K; k += 16) {
            __m512 q = _mm512_div_ps(_mm512_loadu_ps(row + k), vdiv);
            q = _mm512_roundscale_ps(q, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            q = _mm512_min_ps(_mm512_max_ps(q, lo), hi);
            __m512i qi = _mm512_add_epi32(_mm512_cvtps_epi32(q), _mm512_set1_epi32(128));
            _mm_storeu_si128((__m128i *)(out + k), _mm512_cvtepi32_epi8(qi));
        }
        for (; k < K; k++) {
            float q = nearbyintf(row[k] / div);
            q = fminf(fmaxf(q, -127.0f), 127.0f);
            out[k] = (uint8_t)((int)q + 128);
        }
        for (; k < Kp; k++) out[k] = 128;  // q = 0 (the packed weight is 0 there anyway)
    }
}

static inline __attribute__((always_inline)) void block_mc(
    const uint8_t *xq, int Kp, const int8_t *wblock, int m0, int MC, __m512i *acc) {
    for (int r = 0; r < MC; r++) acc[r] = _mm512_setzero_si512();
    const int ngroups = Kp / KG;
    for (int g = 0; g < ngroups; g++) {
        __m512i wv = _mm512_loadu_si512((const void *)(wblock + (size_t)g * NB * KG));
        for (int r = 0; r < MC; r++) {
            int32_t xb;
            memcpy(&xb, xq + (size_t)(m0 + r) * Kp + (size_t)g * KG, 4);
            acc[r] = _mm512_dpbusd_epi32(acc[r], _mm512_set1_epi32(xb), wv);
        }
    }
}

static inline __attribute__((always_inline)) void block_m1(const uint8_t *xq, int Kp, const int8_t *wblock,
                                                           __m512i *acc) {
    // four independent accumulators hide vpdpbusd latency when only one row shares the weights
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    const int ngroups = Kp / KG;
    int g = 0;
    for (; g + 4 <= ngroups; g += 4) {
        const int8_t *wb = wblock + (size_t)g * NB * KG;
        int32_t x0, x1, x2, x3;
        memcpy(&x0, xq + (size_t)g * KG, 4);
        memcpy(&x1, xq + (size_t)(g + 1) * KG, 4);
        memcpy(&x2, xq + (size_t)(g + 2) * KG, 4);
        memcpy(&x3, xq + (size_t)(g + 3) * KG, 4);
        a0 = _mm512_dpbusd_epi32(a0, _mm512_set1_epi32(x0), _mm512_loadu_si512((const void *)wb));
        a1 = _mm512_dpbusd_epi32(a1, _mm512_set1_epi32(x1), _mm512_loadu_si512((const void *)(wb + 64)));
        a2 = _mm512_dpbusd_epi32(a2, _mm512_set1_epi32(x2), _mm512_loadu_si512((const void *)(wb + 128)));
        a3 = _mm512_dpbusd_epi32(a3, _mm512_set1_epi32(x3), _mm512_loadu_si512((const void *)(wb + 192)));
    }
    for (; g < ngroups; g++) {
        int32_t xb;
        memcpy(&xb, xq + (size_t)g * KG, 4);
        a0 = _mm512_dpbusd_epi32(a0, _mm512_set1_epi32(xb), _mm512_loadu_si512((const void *)(wblock + (size_t)g * NB * KG)));
    }
    acc[0] = _mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3));
}

// x [M, K] fp32; wp/wsum/sw packed by a8w8_pack (sw padded to Np); out [M, N] fp32.
// xq [M, Kp] uint8 and sx [M] fp32 are caller-provided scratch.
void a8w8_gemm(const float *x, int M, int K, const int8_t *wp, const int32_t *wsum, const float *sw, int N,
               float *out, uint8_t *xq, float *sx) {
    const int Kp = a8w8_packed_k(K), nblocks = a8w8_packed_n(N) / NB;
    quantize_rows(x, M, K, Kp, xq, sx);
#pragma omp parallel for schedule(static)
    for (int b = 0; b < nblocks; b++) {
        const int8_t *wblock = wp + (size_t)b * Kp * NB;
        const int n0 = b * NB;
        const int ncols = N - n0 < NB ? N - n0 : NB;
        const __mmask16 mask = (__mmask16)((1u << ncols) - 1u);
        const __m512i comp = _mm512_mullo_epi32(_mm512_loadu_si512((const void *)(wsum + n0)), _mm512_set1_epi32(128));
        const __m512 vsw = _mm512_loadu_ps(sw + n0);
        for (int m0 = 0; m0 < M; m0 += MAX_MC) {
            int MC = M - m0 < MAX_MC ? M - m0 : MAX_MC;
            __m512i acc[MAX_MC];
            switch (MC) {  // constant MC lets the compiler keep the accumulators in registers
                case 1: block_m1(xq + (size_t)m0 * Kp, Kp, wblock, acc); break;
                case 2: block_mc(xq, Kp, wblock, m0, 2, acc); break;
                case 3: block_mc(xq, Kp, wblock, m0, 3, acc); break;
                case 4: block_mc(xq, Kp, wblock, m0, 4, acc); break;
                case 5: block_mc(xq, Kp, wblock, m0, 5, acc); break;
                case 6: block_mc(xq, Kp, wblock, m0, 6, acc); break;
                case 7: block_mc(xq, Kp, wblock, m0, 7, acc); break;
                default: block_mc(xq, Kp, wblock, m0, 8, acc); break;
            }
            for (int r = 0; r < MC; r++) {
                __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r], comp));
                v = _mm512_mul_ps(_mm512_mul_ps(v, _mm512_set1_ps(sx[m0 + r])), vsw);
                _mm512_mask_storeu_ps(out + (size_t)(m0 + r) * N + n0, mask, v);
            }
        }
    }
}
