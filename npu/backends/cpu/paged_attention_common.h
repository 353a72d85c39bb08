// What the paged INT8 attention kernels of every kernel family (paged_attention.c for AVX-512 VNNI,
// paged_attention_avx2.c) share: the shape limits, the constants that fix their results (how a decode context is
// split, how many keys one INT32 p . v sum takes, the prefill's query tile), and the combination of a split
// context's parts. Portable C: the x86 and the aarch64 families include it alike.
#pragma once
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define MAX_D 256     // keeps the INT32 q . k sum exact (|sum| <= 32767 * 127 * 256 < 2^31)
#define MAX_G 16
#define Q_MAX 32767.0f
#define KEY_BLOCK 16  // keys whose dot products are reduced together
// Query vectors of one decode work item at most: one AVX-512 vector of (key, query vector) lanes. The AVX-512
// kernel's lane layout (lane k * NQV + i of vector b: key b * KPB + k, query vector i, KPB = ITEM_QV_MAX / NQV)
// fixes the order of a decode item's float sums; the other families add in that order.
#define ITEM_QV_MAX 16
// p . v keeps up to this many query heads' accumulators in registers; more are done in groups.
#define PV_GROUP 8
// Slots ahead to prefetch: the slot list is an indirection the hardware prefetcher cannot follow.
#define PREFETCH_SLOTS 8
#define CACHE_LINE 64
#define PV_FLUSH 256  // keys per INT32 p . v accumulation in decode: 256 * 32767 * 127 < 2^31
// Decode splits a sequence's context into parts of at most this many keys, one work item each (with a
// whole group of heads): keeps both threads busy at small batches while every item reads whole slot
// rows. In an A/B of the two variants (decode attention alone, context 300, INT8 K/V from DRAM; the
// script was not kept, benchmarks/attention_bench.py times this one) it was 21 % faster at batch 1 and 2
// than giving each item fewer heads instead, and equal at batch 4 to 16; 128 was no faster at batch 1.
#define SPLIT_KEYS 256
// Prefill: a work item is (KV head, tile of PF_ROWS query positions).
#define PF_ROWS 8
#define PF_QV_MAX (PF_ROWS * MAX_G)

static inline void prefetch_run(const int8_t *p, int bytes) {
    for (int b = 0; b < bytes; b += CACHE_LINE) __builtin_prefetch(p + b, 0, 3);  // (x86: prefetcht0)
}

// Parts a context of L keys is split into: equal parts of at most SPLIT_KEYS keys (a function of L only).
static inline int context_parts(int L) { return L > SPLIT_KEYS ? (L + SPLIT_KEYS - 1) / SPLIT_KEYS : 1; }

// KV heads per decode work item: the largest divisor of Hkv with at most ITEM_QV_MAX query vectors (whole slot rows).
static inline int decode_heads_per_item(int Hkv, int G) {
    int HC = Hkv;
    while (Hkv % HC || HC * G > ITEM_QV_MAX) HC--;
    return HC;
}

// The parts of one split item (NQV query vectors): p0 holds nsplit parts of part_size floats, each [NQV][D]
// unnormalized output, then its NQV score maxima, then its NQV sums of e. Flash-decoding's combination:
// out = sum_p e^(max_p - max) out_p / sum_p e^(max_p - max) sum_p.
static void combine_parts(const float *p0, int nsplit, size_t part_size, int NQV, int D, float *o) {
    for (int i = 0; i < NQV; i++) {
        float mx = -INFINITY, den = 0.0f;
        for (int p = 0; p < nsplit; p++) {
            const float m = p0[p * part_size + (size_t)NQV * D + i];
            mx = m > mx ? m : mx;
        }
        for (int p = 0; p < nsplit; p++) {
            const float *stats = p0 + p * part_size + (size_t)NQV * D;
            den += expf(stats[i] - mx) * stats[NQV + i];
        }
        float acc[MAX_D] = {0};
        for (int p = 0; p < nsplit; p++) {
            const float w = expf(p0[p * part_size + (size_t)NQV * D + i] - mx) / den;
            const float *part = p0 + p * part_size + (size_t)i * D;
            for (int d = 0; d < D; d++) acc[d] = fmaf(w, part[d], acc[d]);
        }
        memcpy(o + (size_t)i * D, acc, sizeof(float) * D);
    }
}

// A family's decode scratch buffers start on cache lines: each piece's size rounded up with this.
static inline size_t scratch_round(size_t bytes) { return (bytes + CACHE_LINE - 1) / CACHE_LINE * CACHE_LINE; }
