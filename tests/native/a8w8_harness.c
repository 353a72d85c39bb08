// Runs one kernel family's A8W8 GEMM on inputs read from stdin and writes the output to stdout, so that a family
// built for another machine (aarch64 NEON, under qemu-aarch64) can be checked against the reference from Python
// (tests/test_cpu_kernel_families.py). Input, little-endian: int32 M, K, N, prologue, has_norm, has_bias,
// has_residual; float32 eps; then x [M, K] (or [M, 2K] for the SiLU gate), norm [K], qweight int8 [N, K], scale
// [N], bias [N], residual [M, N] (the optional ones only when present). Output: out float32 [M, N].
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int a8w8_packed_k(int K);
int a8w8_packed_n(int N);
long a8w8_panel_bytes(int M, int K);
void a8w8_pack(const int8_t *w, int N, int K, int8_t *wp, int32_t *wsum);
void a8w8_gemm(const float *x, int M, int K, int prologue, const float *norm_w, float eps, const int8_t *wp,
               const int32_t *wsum, const float *sw, const float *bias, int N, const float *residual, float *out,
               int8_t *xq, float *sx);

static void *read_array(size_t count, size_t size) {
    void *p = calloc(count ? count : 1, size);
    if (!p || fread(p, size, count, stdin) != count) {
        fprintf(stderr, "a8w8_harness: short input\n");
        exit(2);
    }
    return p;
}

int main(void) {
    int32_t h[7];
    float eps;
    if (fread(h, sizeof h, 1, stdin) != 1 || fread(&eps, sizeof eps, 1, stdin) != 1) return 2;
    const int M = h[0], K = h[1], N = h[2], prologue = h[3];
    const int gated = (prologue & 0xFF) == 2;
    float *x = read_array((size_t)M * K * (gated ? 2 : 1), 4);
    float *norm = h[4] ? read_array(K, 4) : NULL;
    int8_t *w = read_array((size_t)N * K, 1);
    const int Kp = a8w8_packed_k(K), Np = a8w8_packed_n(N);
    float *scale = calloc(Np, 4), *bias = NULL;
    if (fread(scale, 4, N, stdin) != (size_t)N) return 2;
    if (h[5]) {
        bias = calloc(Np, 4);
        if (fread(bias, 4, N, stdin) != (size_t)N) return 2;
    }
    float *residual = h[6] ? read_array((size_t)M * N, 4) : NULL;
    int8_t *wp = aligned_alloc(64, ((size_t)Np * Kp + 63) / 64 * 64);
    int32_t *wsum = calloc(Np, 4);
    a8w8_pack(w, N, K, wp, wsum);
    int8_t *xq = aligned_alloc(64, ((size_t)a8w8_panel_bytes(M, K) + 63) / 64 * 64);
    float *sx = calloc(M ? M : 1, 4), *out = calloc((size_t)M * N ? (size_t)M * N : 1, 4);
    a8w8_gemm(x, M, K, prologue, norm, eps, wp, wsum, scale, bias, N, residual, out, xq, sx);
    fwrite(out, 4, (size_t)M * N, stdout);
    return 0;
}
