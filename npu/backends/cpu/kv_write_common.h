// The INT8 KV write's loop, the same in every kernel family (attention_prep.c, attention_prep_avx2.c): per
// (token, kv head), K and V quantized by the family's quantize_head (symmetric INT8 over head_dim, s = absmax /
// 127, round half to even) into the token's slot of the paged cache with its fp32 scale.
#pragma once
#include <stddef.h>
#include <stdint.h>

// The family's: x [D] fp32 -> q [D] int8 and *scale.
static void quantize_head(const float *x, int D, int8_t *q, float *scale);

// k rows [T, k_stride] and v rows [T, v_stride] fp32 (Hkv heads of width D each); caches of one layer:
// kc/vc [slots, Hkv, D] int8, ks/vs [slots, Hkv] fp32; slots [T]. Returns -1 (nothing done) where D is not a
// multiple of 16 (every family the same shapes).
int kv_write_int8(const float *k, const float *v, int T, int k_stride, int v_stride, int Hkv, int D,
                  const int64_t *slots, int8_t *kc, float *ks, int8_t *vc, float *vs) {
    if (D % 16) return -1;
#pragma omp parallel for schedule(static) if (T * Hkv >= 64)
    for (int th = 0; th < T * Hkv; th++) {
        const int t = th / Hkv, h = th % Hkv;
        const size_t dst = (size_t)slots[t] * Hkv + h;
        quantize_head(k + (size_t)t * k_stride + (size_t)h * D, D, kc + dst * D, ks + dst);
        quantize_head(v + (size_t)t * v_stride + (size_t)h * D, D, vc + dst * D, vs + dst);
    }
    return 0;
}
