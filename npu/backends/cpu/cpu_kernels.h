// The kernels of this library that other kernels call (decoder_stack.c); each .c file that defines one
// includes this header, so the compiler checks that declaration and definition agree.
#pragma once
#include <stdint.h>

void a8w8_gemm(const float *x, int M, int K, int prologue, const float *norm_w, float eps, const int8_t *wp,
               const int32_t *wsum, const float *sw, const float *bias, int N, const float *residual, float *out,
               uint8_t *xq, float *sx);
long a8w8_panel_bytes(int M, int K);
int qk_norm_rope(float *qkv, int T, int row_stride, int H, int D, const float *norm_w, float eps, const float *cos_t,
                 const float *sin_t, const int64_t *positions, int hadamard_log2);
int kv_write_int8(const float *k, const float *v, int T, int k_stride, int v_stride, int Hkv, int D,
                  const int64_t *slots, int8_t *kc, float *ks, int8_t *vc, float *vs);
int paged_attention_decode_int8(const float *q, int q_stride, int S, int Hq, int Hkv, int D, const int8_t *kc,
                                const float *ks, const int8_t *vc, const float *vs, const int64_t *slots,
                                const int32_t *lens, int Lmax, float scale, float *out);
