// What every kernel family's row prologue (row_prologue.h, row_prologue_avx2.h, row_prologue_neon.h) shares: the
// prologue codes, the scalar SiLU and Hadamard stages their vector loops leave to scalar code, and the dispatch
// from a code to the family's prologue_kind_row and hadamard_row (defined after including this).
//   PROLOGUE_NONE     a = x
//   PROLOGUE_RMSNORM  a = w * (x * 1/sqrt(mean(x^2) + eps))          (transformers' RMSNorm in fp32)
//   PROLOGUE_SILU_MUL a = silu(x[:, :K]) * x[:, K:]                    (x has 2K columns: gate | up)
// and then, where the code's bits from PROLOGUE_HADAMARD_SHIFT up hold log2(B) > 0, a rotated checkpoint's R4:
//   a = a * blockdiag(H_B, ..., H_B) / sqrt(B)                          (H_B Sylvester's Hadamard matrix of order B)
// as a fast Walsh-Hadamard transform: butterfly stages of stride 1, 2, 4, ..., B / 2 (a + b, a - b in fp32), then one
// multiplication by the fp32 1/sqrt(B): exactly npu/backends/base.py hadamard_rows' operations, so the same bits.
#pragma once
#include <math.h>
#include <stddef.h>
#include <string.h>

#include "prologue_codes.h"

static inline float silu_scalar(float g) { return g / (1.0f + expf(-g)); }

// Butterfly stages of stride h0, 2 h0, ..., B / 2 over a[0:K], one element at a time (a + b, a - b).
static inline void hadamard_stages_scalar(float *a, int K, int h0, int B) {
    for (int h = h0; h < B; h *= 2)
        for (int k0 = 0; k0 < K; k0 += 2 * h)
            for (int k = k0; k < k0 + h; k++) {
                const float u = a[k], w = a[k + h];
                a[k] = u + w;
                a[k + h] = u - w;
            }
}

// the fp32 rounding of 1/sqrt(B), as npu/backends/base.py hadamard_scale computes it (exact for even log2 B)
static inline float hadamard_scale(int B) { return (float)(1.0 / sqrt((double)B)); }

// The family's own (after this header): the prologue kind's output row, and the normalized Hadamard transform.
static inline const float *prologue_kind_row(const float *x, int m, int K, int prologue, const float *norm_w, float eps,
                                             float *buf);
static inline void hadamard_row(float *a, int K, int log2_block);

// Writes the prologue's output row a[0:K] into buf (or returns x's row itself for PROLOGUE_NONE without a rotation).
static inline const float *prologue_row(const float *x, int m, int K, int prologue, const float *norm_w, float eps,
                                        float *buf) {
    const int log2_block = prologue >> PROLOGUE_HADAMARD_SHIFT;
    const float *a = prologue_kind_row(x, m, K, prologue & PROLOGUE_KIND_MASK, norm_w, eps, buf);
    if (!log2_block) return a;
    if (a != buf) memcpy(buf, a, (size_t)K * sizeof(float));
    hadamard_row(buf, K, log2_block);
    return buf;
}
