// All decoder layers of a pure decode step (one new token per sequence) in one call: per layer exactly the
// kernel calls that npu/model.py's layer loop makes through the CPU backend, in the same order and on the same
// buffers, so the result is bit-identical to it; what goes away is the Python between the calls (about
// 0.1 ms per layer: argument checks, views, ctypes marshalling).
//
//   qkv     = a8w8_gemm(rmsnorm(x, input_norm))            fused q | k | v projection
//   q, k    = qk_norm_rope(q, k)                           in place in qkv (then R3's rotation, where set)
//   cache  <- kv_write_int8(k, v) at the tokens' slots
//   attn    = paged_attention_decode_int8(q, cache)
//   x       = x + a8w8_gemm(attn)                           o_proj, residual added in place
//   gu      = a8w8_gemm(rmsnorm(x, post_norm))              fused gate | up
//   x       = x + a8w8_gemm(silu(gate) * up)                down_proj, residual added in place
#include <stddef.h>
#include <stdint.h>

#include "cpu_kernels.h"
#include "prologue_codes.h"

// One A8W8 linear as a8w8_pack left it (npu/backends/cpu/vnni.py VnniLinear).
typedef struct {
    const int8_t *wp;
    const int32_t *wsum;
    const float *sw;
    const float *bias;  // NULL, or [Np] like sw
    int n, k;
    int input_hadamard_log2;  // R4's rotation of the input after its prologue (row_prologue.h); 0: none
} packed_linear;

typedef struct {
    packed_linear qkv, o, gate_up, down;
    const float *input_norm, *post_norm;
    const float *qk_norm;  // [Hq + Hkv, D] (Qwen3's q_norm then k_norm per head) or NULL (Llama)
    float input_eps, post_eps, qk_eps;
    int qk_hadamard_log2;  // R3's rotation of q and k per head after RoPE (attention_prep.c); 0: none
} stack_layer;

typedef struct {
    int num_layers, num_heads, num_kv_heads, head_dim;
    const stack_layer *layers;
    const float *cos, *sin_signed;  // RoPE tables [max_positions, head_dim]
    float scale;                    // attention softmax scale
} decoder_stack;

// The paged INT8 KV cache: layer l's arrays at base + l * layer stride (elements);
// k/v [layers, slots, Hkv, D] int8, k_scale/v_scale [layers, slots, Hkv] fp32.
typedef struct {
    int8_t *k, *v;
    float *k_scale, *v_scale;
    long layer_stride, scale_layer_stride;
} kv_cache;

// 0 when every kernel of the stack handles these shapes (each is probed with zero rows), else -1.
int decoder_stack_check(const decoder_stack *d) {
    const int H = d->num_heads + d->num_kv_heads, D = d->head_dim;
    for (int l = 0; l < d->num_layers; l++)
        if (qk_norm_rope(NULL, 0, H * D, H, D, NULL, 0.0f, d->cos, d->sin_signed, NULL, d->layers[l].qk_hadamard_log2))
            return -1;
    if (kv_write_int8(NULL, NULL, 0, 0, 0, d->num_kv_heads, D, NULL, NULL, NULL, NULL, NULL)) return -1;
    if (paged_attention_decode_int8(NULL, 0, 0, d->num_heads, d->num_kv_heads, D, NULL, NULL, NULL, NULL, NULL, NULL,
                                    0, d->scale, NULL))
        return -1;
    return 0;
}

static void linear(const packed_linear *w, const float *x, int T, int prologue, const float *norm_w, float eps,
                   const float *residual, float *out, uint8_t *xq, float *sx) {
    prologue |= w->input_hadamard_log2 << PROLOGUE_HADAMARD_SHIFT;
    a8w8_gemm(x, T, w->k, prologue, norm_w, eps, w->wp, w->wsum, w->sw, w->bias, w->n, residual, out, xq, sx);
}

// x [T, hidden] fp32, the residual stream (updated in place); positions / slot_mapping [T]; ctx_slots [T, Lmax]
// and lengths [T]: each sequence's context slots (its new token's included). Scratch: qkv [T, qkv.n],
// attn [T, Hq * D], gu [T, gate_up.n], xq (a8w8_panel_bytes for the widest input), sx [T].
// The caller has checked the stack once with decoder_stack_check.
void decoder_stack_decode(const decoder_stack *d, const kv_cache *c, float *x, int T, const int64_t *positions,
                         const int64_t *slot_mapping, const int64_t *ctx_slots, const int32_t *lengths, int Lmax,
                         float *qkv, float *attn, float *gu, uint8_t *xq, float *sx) {
    const int Hq = d->num_heads, Hkv = d->num_kv_heads, D = d->head_dim;
    for (int l = 0; l < d->num_layers; l++) {
        const stack_layer *ly = &d->layers[l];
        const int row = ly->qkv.n;  // q | k | v columns of one token
        float *k = qkv + (size_t)Hq * D, *v = k + (size_t)Hkv * D;
        int8_t *kc = c->k + l * c->layer_stride, *vc = c->v + l * c->layer_stride;
        float *ks = c->k_scale + l * c->scale_layer_stride, *vs = c->v_scale + l * c->scale_layer_stride;
        linear(&ly->qkv, x, T, PROLOGUE_RMSNORM, ly->input_norm, ly->input_eps, NULL, qkv, xq, sx);
        qk_norm_rope(qkv, T, row, Hq + Hkv, D, ly->qk_norm, ly->qk_eps, d->cos, d->sin_signed, positions,
                     ly->qk_hadamard_log2);
        kv_write_int8(k, v, T, row, row, Hkv, D, slot_mapping, kc, ks, vc, vs);
        paged_attention_decode_int8(qkv, row, T, Hq, Hkv, D, kc, ks, vc, vs, ctx_slots, lengths, Lmax, d->scale, attn);
        linear(&ly->o, attn, T, PROLOGUE_NONE, NULL, 0.0f, x, x, xq, sx);
        linear(&ly->gate_up, x, T, PROLOGUE_RMSNORM, ly->post_norm, ly->post_eps, NULL, gu, xq, sx);
        linear(&ly->down, gu, T, PROLOGUE_SILU_MUL, NULL, 0.0f, x, x, xq, sx);
    }
}
