// The entry points of the paged INT8 attention kernels, the same in every kernel family (paged_attention.c,
// paged_attention_avx2.c): the decode work items (a sequence, or a part of its context, and a group of its KV
// heads), the context split and the combination of its parts; the prefill's work items (a KV head and a tile of
// PF_ROWS query positions), its key blocks and causal softmax. A family's file includes this last, after defining:
//   quantize_q16(q, D, q16)          q row -> INT16 codes, returning the scale
//   decode_scratch_bytes(NQV, HC, Lcap, D) and decode_item(...)   one decode work item's scores, softmax, p . v
//   widen_key_row(kr, D, kb)         an INT8 key row -> INT16
//   scores_key_block(...), softmax_fold_scales(...), pv_group(...)   the prefill's steps
#pragma once

// out[g][0:D] = sum_{j < L} p[g * pstride + j] * v[sl[j], h] for G query vectors, PV_GROUP at a time (the family's
// pv_group, with its query count a constant at each call so that the accumulators stay in registers).
static void pv_head(const float *p, int pstride, int L, const int8_t *vc, const int64_t *sl, int Hkv, int h, int D,
                    int G, float *out) {
    for (int g0 = 0; g0 < G; g0 += PV_GROUP) {
        const int ng = G - g0 < PV_GROUP ? G - g0 : PV_GROUP;
        const float *pg = p + (size_t)g0 * pstride;
        float *og = out + (size_t)g0 * D;
        switch (ng) {
            case 1: pv_group(pg, L, vc, sl, Hkv, h, D, 1, og, pstride); break;
            case 2: pv_group(pg, L, vc, sl, Hkv, h, D, 2, og, pstride); break;
            case 3: pv_group(pg, L, vc, sl, Hkv, h, D, 3, og, pstride); break;
            case 4: pv_group(pg, L, vc, sl, Hkv, h, D, 4, og, pstride); break;
            case 5: pv_group(pg, L, vc, sl, Hkv, h, D, 5, og, pstride); break;
            case 6: pv_group(pg, L, vc, sl, Hkv, h, D, 6, og, pstride); break;
            case 7: pv_group(pg, L, vc, sl, Hkv, h, D, 7, og, pstride); break;
            default: pv_group(pg, L, vc, sl, Hkv, h, D, PV_GROUP, og, pstride); break;
        }
    }
}

// q [S, q_stride] (heads 0..Hq-1 of width D from column 0); slots [S, Lmax] (sequence s uses its first
// lens[s]); out [S, Hq, D]. Returns 0 on success, -1 when the shapes are outside what this kernel handles
// (caller falls back).
int paged_attention_decode_int8(const float *q, int q_stride, int S, int Hq, int Hkv, int D, const int8_t *kc, const float *ks,
                                const int8_t *vc, const float *vs, const int64_t *slots, const int32_t *lens, int Lmax,
                                float scale, float *out) {
    if (D % 32 || D > MAX_D || Hq % Hkv || Hq / Hkv > ITEM_QV_MAX) return -1;
    const int G = Hq / Hkv, HC = decode_heads_per_item(Hkv, G);
    // a sequence's context is split in context_parts(L) parts (so its result does not depend on the batch),
    // combined by their softmax max and sum; no part is longer than min(Lmax, SPLIT_KEYS) keys
    const int max_splits = context_parts(Lmax), longest_part = Lmax < SPLIT_KEYS ? Lmax : SPLIT_KEYS;
    const int chunks = Hkv / HC, NQV = HC * G, Lcap = (longest_part > 0 ? longest_part : 1) + 2;
    const int nitems = S * chunks * max_splits;
    // one part's result: [NQV][D] unnormalized output, then its NQV score maxima, then its NQV sums
    const size_t part_size = (size_t)NQV * (D + 2);
    float *part = max_splits > 1 ? (float *)malloc(sizeof(float) * nitems * part_size) : NULL;
#pragma omp parallel
    {
        char *scratch = (char *)aligned_alloc(CACHE_LINE, decode_scratch_bytes(NQV, HC, Lcap, D));
        int16_t q16[ITEM_QV_MAX * MAX_D];
#pragma omp for schedule(dynamic)
        for (int w = 0; w < nitems; w++) {
            const int s = w / (chunks * max_splits), h0 = (w / max_splits % chunks) * HC, sp = w % max_splits;
            const int L = lens[s], nsplit = context_parts(L);
            float *o = out + ((size_t)s * Hq + (size_t)h0 * G) * D;
            if (L <= 0) {
                if (sp == 0) memset(o, 0, sizeof(float) * NQV * D);
                continue;
            }
            if (sp >= nsplit) continue;
            const int ja = (int)((long)L * sp / nsplit), n = (int)((long)L * (sp + 1) / nsplit) - ja;
            const int64_t *sl = slots + (size_t)s * Lmax + ja;
            float qs[ITEM_QV_MAX], rmax[ITEM_QV_MAX], rsum[ITEM_QV_MAX];
            for (int i = 0; i < NQV; i++)
                qs[i] = quantize_q16(q + (size_t)s * q_stride + ((size_t)h0 * G + i) * D, D, q16 + (size_t)i * D) * scale;
            if (nsplit == 1) {  // normalized here
                decode_item(q16, qs, NQV, G, D, kc, ks, vc, vs, sl, n, Hkv, h0, Lcap, scratch, 1, o, rmax, rsum);
            } else {  // this part's unnormalized output, its max and sum
                float *pw = part + (size_t)w * part_size;
                decode_item(q16, qs, NQV, G, D, kc, ks, vc, vs, sl, n, Hkv, h0, Lcap, scratch, 0, pw,
                            pw + (size_t)NQV * D, pw + (size_t)NQV * D + NQV);
            }
        }
#pragma omp for schedule(static)
        for (int sc = 0; sc < S * chunks; sc++) {
            const int s = sc / chunks, h0 = sc % chunks * HC, nsplit = context_parts(lens[s]);
            if (nsplit == 1) continue;
            combine_parts(part + (size_t)sc * max_splits * part_size, nsplit, part_size, NQV, D,
                          out + ((size_t)s * Hq + (size_t)h0 * G) * D);
        }
        free(scratch);
    }
    free(part);
    return 0;
}

// Prefill / chunked-prefill attention of one sequence, from the same paged INT8 cache (the chunk's own K/V are
// already written). Query i of the chunk sits at absolute position start + i and attends keys 0..start + i. A work
// item's PF_ROWS x G query vectors share every key and value they read, which is converted once per item (GQA
// reuse). q: rows [nq] of Hq heads x D, row stride q_stride floats; out: [nq, Hq * D] contiguous.
int paged_attention_prefill_int8(const float *q, int q_stride, int nq, int start, int Hq, int Hkv, int D,
                                 const int8_t *kc, const float *ks, const int8_t *vc, const float *vs,
                                 const int64_t *slots, float scale, float *out) {
    if (D % 32 || D > MAX_D || Hq % Hkv || Hq / Hkv > MAX_G) return -1;
    const int G = Hq / Hkv, ntiles = (nq + PF_ROWS - 1) / PF_ROWS, ctx = start + nq;
    const int stride = (ctx + KEY_BLOCK - 1) / KEY_BLOCK * KEY_BLOCK;  // scores row length, whole key blocks
#pragma omp parallel
    {
        float *scores = (float *)malloc(sizeof(float) * (size_t)PF_QV_MAX * stride);
        int16_t *q16 = (int16_t *)malloc(sizeof(int16_t) * (size_t)PF_QV_MAX * D);
        int16_t *kb = (int16_t *)malloc(sizeof(int16_t) * (size_t)KEY_BLOCK * D);
        float *tmp = (float *)malloc(sizeof(float) * (size_t)PF_QV_MAX * D);
        float *vscale = (float *)malloc(sizeof(float) * (size_t)stride);  // V scales of the item's keys, gathered once
        float qk_scale[PF_QV_MAX], kscale[KEY_BLOCK];
#pragma omp for schedule(dynamic)
        for (int w = 0; w < Hkv * ntiles; w++) {
            // later tiles attend more keys: hand them out first so the dynamic schedule balances
            const int h = w % Hkv, t = ntiles - 1 - w / Hkv;
            const int r0 = t * PF_ROWS, nr = nq - r0 < PF_ROWS ? nq - r0 : PF_ROWS, nqv = nr * G;
            const int nkeys = start + r0 + nr;  // keys the last row of the tile attends
            for (int r = 0; r < nr; r++)
                for (int g = 0; g < G; g++)
                    qk_scale[r * G + g] = quantize_q16(q + (size_t)(r0 + r) * q_stride + (size_t)(h * G + g) * D, D,
                                                       q16 + (size_t)(r * G + g) * D) * scale;
            for (int j0 = 0; j0 < nkeys; j0 += KEY_BLOCK) {
                const int nb = nkeys - j0 < KEY_BLOCK ? nkeys - j0 : KEY_BLOCK;
                for (int jj = 0; jj < KEY_BLOCK; jj++) {
                    if (jj < nb) {
                        const size_t row = (size_t)slots[j0 + jj] * Hkv + h;
                        widen_key_row(kc + row * D, D, kb + (size_t)jj * D);
                        kscale[jj] = ks[row];
                        vscale[j0 + jj] = vs[row];
                    } else {  // past the last key: zeros, masked below
                        memset(kb + (size_t)jj * D, 0, sizeof(int16_t) * D);
                        kscale[jj] = 0.0f;
                    }
                }
                scores_key_block(q16, qk_scale, nqv, kb, kscale, D, scores, stride, j0);
            }
            for (int r = 0; r < nr; r++) {
                const int L = start + r0 + r + 1;  // causal: keys 0..position
                for (int g = 0; g < G; g++) softmax_fold_scales(scores + (size_t)(r * G + g) * stride, L, nkeys, vscale);
            }
            // p . v for all nqv vectors of the tile (vector v = r * G + g)
            pv_head(scores, stride, nkeys, vc, slots, Hkv, h, D, nqv, tmp);
            for (int v = 0; v < nqv; v++) {
                const int r = v / G, g = v % G;
                memcpy(out + ((size_t)(r0 + r) * Hq + (size_t)h * G + g) * D, tmp + (size_t)v * D, sizeof(float) * D);
            }
        }
        free(scores);
        free(q16);
        free(kb);
        free(tmp);
        free(vscale);
    }
    return 0;
}
