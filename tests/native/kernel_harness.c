// Serves calls into one kernel family's library built for another machine (the aarch64 NEON family, run under
// qemu-aarch64), so that its kernels can be checked bit for bit against the families this machine runs
// (tests/kernel_emulation.py, tests/integration/test_cpu_kernel_families.py).
//
// The arguments' memory is shared: argv names a file (a memfd) that the test process has mapped at an address
// of its choosing, and this process maps it at the same address, so every pointer the test passes (into tensors,
// or inside structures such as the decoder stack's) means the same bytes here. Each call is a request on stdin,
//   char name[32]; uint64_t args[16];     (an int or a pointer as its value, a float as its bits in the low half)
// answered by an int64 on stdout (the function's result, 0 for a void one).
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "cpu_kernels.h"

int a8w8_packed_k(int K);
int a8w8_packed_n(int N);
void a8w8_pack(const int8_t *w, int N, int K, int8_t *wp, int32_t *wsum);
void argmax_rows(const float *logits, int S, int V, int64_t *out);
int paged_attention_prefill_int8(const float *q, int q_stride, int nq, int start, int Hq, int Hkv, int D,
                                 const int8_t *kc, const float *ks, const int8_t *vc, const float *vs,
                                 const int64_t *slots, float scale, float *out);
int bf16_packed_k(int K);
int bf16_packed_n(int N);
long bf16_panel_bytes(int M, int K);
void bf16_pack(const uint16_t *w, int N, int K, uint16_t *wp);
void bf16_gemm(const float *x, int M, int K, int prologue, const float *norm_w, float eps, const uint16_t *wp, int N,
               const float *residual, float *out, uint16_t *xb);
typedef struct decoder_stack decoder_stack;
typedef struct kv_cache kv_cache;
int decoder_stack_check(const decoder_stack *d);
void decoder_stack_decode(const decoder_stack *d, const kv_cache *c, float *x, int T, const int64_t *positions,
                          const int64_t *slot_mapping, const int64_t *ctx_slots, const int32_t *lengths, int Lmax,
                          float *qkv, float *attn, float *gu, uint8_t *xq, float *sx);

#define NARGS 16
typedef struct {
    char name[32];
    uint64_t args[NARGS];
} request;

static float as_float(uint64_t bits) {
    const uint32_t low = (uint32_t)bits;
    float f;
    memcpy(&f, &low, 4);
    return f;
}

#define P(i) ((void *)(uintptr_t)a[i])
#define I(i) ((int)(int64_t)a[i])
#define F(i) as_float(a[i])
#define IS(fn) (strcmp(r->name, fn) == 0)

// The named kernel on the request's arguments; exits where the name is unknown (the test's mistake).
static int64_t call(const request *r) {
    const uint64_t *a = r->args;
    if (IS("a8w8_packed_k")) return a8w8_packed_k(I(0));
    if (IS("a8w8_packed_n")) return a8w8_packed_n(I(0));
    if (IS("a8w8_panel_bytes")) return a8w8_panel_bytes(I(0), I(1));
    if (IS("a8w8_pack")) return a8w8_pack(P(0), I(1), I(2), P(3), P(4)), 0;
    if (IS("a8w8_gemm"))
        return a8w8_gemm(P(0), I(1), I(2), I(3), P(4), F(5), P(6), P(7), P(8), P(9), I(10), P(11), P(12), P(13), P(14)),
               0;
    if (IS("qk_norm_rope")) return qk_norm_rope(P(0), I(1), I(2), I(3), I(4), P(5), F(6), P(7), P(8), P(9), I(10));
    if (IS("kv_write_int8")) return kv_write_int8(P(0), P(1), I(2), I(3), I(4), I(5), I(6), P(7), P(8), P(9), P(10), P(11));
    if (IS("argmax_rows")) return argmax_rows(P(0), I(1), I(2), P(3)), 0;
    if (IS("paged_attention_decode_int8"))
        return paged_attention_decode_int8(P(0), I(1), I(2), I(3), I(4), I(5), P(6), P(7), P(8), P(9), P(10), P(11), I(12),
                                           F(13), P(14));
    if (IS("paged_attention_prefill_int8"))
        return paged_attention_prefill_int8(P(0), I(1), I(2), I(3), I(4), I(5), I(6), P(7), P(8), P(9), P(10), P(11),
                                            F(12), P(13));
    if (IS("bf16_packed_k")) return bf16_packed_k(I(0));
    if (IS("bf16_packed_n")) return bf16_packed_n(I(0));
    if (IS("bf16_panel_bytes")) return bf16_panel_bytes(I(0), I(1));
    if (IS("bf16_pack")) return bf16_pack(P(0), I(1), I(2), P(3)), 0;
    if (IS("bf16_gemm")) return bf16_gemm(P(0), I(1), I(2), I(3), P(4), F(5), P(6), I(7), P(8), P(9), P(10)), 0;
    if (IS("decoder_stack_check")) return decoder_stack_check(P(0));
    if (IS("decoder_stack_decode"))
        return decoder_stack_decode(P(0), P(1), P(2), I(3), P(4), P(5), P(6), P(7), I(8), P(9), P(10), P(11), P(12),
                                    P(13)),
               0;
    fprintf(stderr, "kernel_harness: no kernel named %.32s\n", r->name);
    exit(3);
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: kernel_harness SHARED_FILE ADDRESS SIZE\n");
        return 2;
    }
    const int fd = open(argv[1], O_RDWR);
    void *const at = (void *)(uintptr_t)strtoull(argv[2], NULL, 16);
    const size_t size = strtoull(argv[3], NULL, 10);
    if (fd < 0 || mmap(at, size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED_NOREPLACE, fd, 0) != at) {
        perror("kernel_harness: mapping the shared arguments");
        return 2;
    }
    request r;
    while (fread(&r, sizeof r, 1, stdin) == 1) {
        const int64_t result = call(&r);
        if (fwrite(&result, sizeof result, 1, stdout) != 1 || fflush(stdout)) return 2;
    }
    return 0;
}
