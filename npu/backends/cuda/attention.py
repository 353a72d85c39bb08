"""Attention-side Triton kernels over the paged INT8 KV cache: q/k norm + RoPE, the INT8 K/V write, decode
attention (split over long contexts) and causal prefill attention.

The cache layout is :class:`npu.kv_cache.Int8KV`'s: per layer ``k``/``v`` ``[slots, Hkv, D]`` INT8 and
``k_scale``/``v_scale`` ``[slots, Hkv]`` fp32, one scale per (token, kv head); kernels dequantize in registers.

Decode attention splits a context into fixed ``DECODE_SPLIT_TOKENS`` pieces (partial softmax per piece, then a
reduction in piece order), so a sequence's result depends on its own context only: batch invariant, like the
CPU kernel. Its dot products run in fp32 (memory bound: the INT8 reads dominate). Prefill attention is a flash
attention per (query tile, head) with fp16 operands and fp32 accumulation (compute bound); its key blocks
start at position 0 whatever the chunking and fully masked blocks leave the running sums unchanged, so how a
prompt is chunked changes a query's result at most by the rounding of its row's place in the tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from npu.backends.base import hadamard_scale
from npu.backends.cuda.linear import DIVISOR_FLOOR, QMAX, hadamard_butterfly, round_half_even

# Context tokens per decode-attention split: one program per (sequence, kv head, split). Fixed (not chosen
# from the batch) so that a sequence's numbers never depend on what else runs: 256 tokens of INT8 K and V at
# head_dim 128 are 64 KiB per program, enough work to amortize the reduction.
DECODE_SPLIT_TOKENS = 256
DECODE_BLOCK_N = 64  # keys per inner step of a decode split
PREFILL_BLOCK_M = 64  # queries per prefill program
PREFILL_BLOCK_N = 64  # keys per inner step
MIN_DOT_ROWS = 16  # tl.dot needs at least 16 rows: a GQA group of fewer query heads is padded


@triton.jit
def _qk_norm_rope_kernel(
    qk_ptr,
    row_stride,
    head_stride,
    norm_ptr,
    eps,
    cos_ptr,
    sin_ptr,
    pos_ptr,
    H,
    D,
    hadamard_scale,
    HAS_NORM: tl.constexpr,
    HADAMARD_LOG2: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One token's q and k heads ``[H, D]``: per-head RMSNorm, then RoPE at the token's position, then (R3, where
    ``HADAMARD_LOG2`` is log2 D = log2 BLOCK_D) each head times the normalized Sylvester matrix, in place."""
    t = tl.program_id(0)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h < H)[:, None] & (d < D)[None, :]
    rolled = (d + D // 2) % D  # rotate_half(x) * sin == roll(x, D/2) * [-sin, sin] (see TorchOps.qk_norm_rope)
    base = qk_ptr + t.to(tl.int64) * row_stride + h[:, None] * head_stride
    x = tl.load(base + d[None, :], mask=mask, other=0.0).to(tl.float32)
    xr = tl.load(base + rolled[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        inv_rms = tl.math.div_rn(1.0, tl.math.sqrt_rn(tl.sum(x * x, 1) / D + eps))[:, None]
        w = tl.load(norm_ptr + h[:, None] * D + d[None, :], mask=mask, other=0.0)
        wr = tl.load(norm_ptr + h[:, None] * D + rolled[None, :], mask=mask, other=0.0)
        x = w * (x * inv_rms)
        xr = wr * (xr * inv_rms)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    c = tl.load(cos_ptr + pos * D + d, mask=d < D, other=0.0)[None, :]
    s = tl.load(sin_ptr + pos * D + d, mask=d < D, other=0.0)[None, :]
    y = x * c + xr * s
    if HADAMARD_LOG2 > 0:  # butterflies of stride < D stay inside a head's row of the flattened [BLOCK_H, D] block
        y = tl.reshape(y, (BLOCK_H * BLOCK_D,))
        for stage in tl.static_range(HADAMARD_LOG2):
            y = hadamard_butterfly(y, BLOCK_H * BLOCK_D, 1 << stage)
        y = tl.reshape(y, (BLOCK_H, BLOCK_D)) * hadamard_scale
    tl.store(base + d[None, :], y, mask=mask)


def qk_norm_rope(
    qk: torch.Tensor,
    norm_weight: torch.Tensor | None,
    eps: float,
    cos,
    sin_signed,
    positions,
    head_hadamard: bool = False,
) -> torch.Tensor:
    """Per-head RMSNorm (``norm_weight`` ``[H, D]``, optional) then RoPE of fp32 ``qk`` ``[T, H, D]``, then R3's
    per-head Hadamard where ``head_hadamard`` (D a power of two), in place."""
    t, h, d = qk.shape
    if head_hadamard and d & (d - 1):
        raise ValueError(f"R3's per-head Hadamard needs a power-of-two head_dim, not {d}")
    if t:
        _qk_norm_rope_kernel[(t,)](
            qk, qk.stride(0), qk.stride(1), qk if norm_weight is None else norm_weight, eps,
            cos, sin_signed, positions, h, d, hadamard_scale(d) if head_hadamard else 1.0,
            HAS_NORM=norm_weight is not None, HADAMARD_LOG2=d.bit_length() - 1 if head_hadamard else 0,
            BLOCK_H=triton.next_power_of_2(h), BLOCK_D=triton.next_power_of_2(d),
        )  # fmt: skip
    return qk


@triton.jit
def _quantize_heads(src, dst, dst_scale, h, d, in_h, mask, D):
    """Symmetric INT8 per head of ``[BLOCK_H, BLOCK_D]`` values at ``src``: codes to ``dst``, scales to
    ``dst_scale`` (the Int8KV convention, as quantize_symmetric over head_dim)."""
    x = tl.load(src + h[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = tl.math.div_rn(tl.max(tl.abs(x), 1), QMAX)
    divisor = tl.maximum(scale, DIVISOR_FLOOR)[:, None]
    q = tl.minimum(tl.maximum(round_half_even(tl.math.div_rn(x, divisor)), -QMAX), QMAX)
    tl.store(dst + h[:, None] * D + d[None, :], q.to(tl.int8), mask=mask)
    tl.store(dst_scale + h, scale, mask=in_h)


@triton.jit
def _kv_write_int8_kernel(
    k_ptr,
    v_ptr,
    k_row_stride,
    v_row_stride,
    slot_ptr,
    kc_ptr,
    ks_ptr,
    vc_ptr,
    vs_ptr,
    HKV,
    D,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:  # a negative slot is a padding row (a captured CUDA graph's unused batch rows): no write
        h = tl.arange(0, BLOCK_H)
        d = tl.arange(0, BLOCK_D)
        in_h = h < HKV
        mask = in_h[:, None] & (d < D)[None, :]
        at = slot.to(tl.int64) * HKV
        row = t.to(tl.int64)
        _quantize_heads(k_ptr + row * k_row_stride, kc_ptr + at * D, ks_ptr + at, h, d, in_h, mask, D)
        _quantize_heads(v_ptr + row * v_row_stride, vc_ptr + at * D, vs_ptr + at, h, d, in_h, mask, D)


def write_kv_int8(
    layer_tensors: dict[str, torch.Tensor], slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """Quantize fp32 ``k``/``v`` ``[T, Hkv, D]`` (heads contiguous) per (token, head) and store them at ``slots``
    of one layer."""
    t, hkv, d = k.shape
    if t:
        _kv_write_int8_kernel[(t,)](
            k, v, k.stride(0), v.stride(0), slots,
            layer_tensors["k"], layer_tensors["k_scale"], layer_tensors["v"], layer_tensors["v_scale"],
            hkv, d, BLOCK_H=triton.next_power_of_2(hkv), BLOCK_D=triton.next_power_of_2(d),
        )  # fmt: skip


@triton.jit
def _load_kv_block(c_ptr, s_ptr, slot, kvh, HKV, D, d, mask_n, mask_d):
    """Dequantized ``[BLOCK_N, BLOCK_D]`` K or V of the slots ``slot``, kv head ``kvh``, in fp32."""
    at = slot.to(tl.int64) * HKV + kvh
    vals = tl.load(c_ptr + at[:, None] * D + d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0)
    scale = tl.load(s_ptr + at, mask=mask_n, other=0.0)
    return vals.to(tl.float32) * scale[:, None]


@triton.jit
def _decode_attention_kernel(
    q_ptr,
    q_row_stride,
    q_head_stride,
    kc_ptr,
    ks_ptr,
    vc_ptr,
    vs_ptr,
    slots_ptr,
    slots_stride,
    len_ptr,
    part_acc_ptr,
    part_ml_ptr,
    scale,
    HQ,
    HKV,
    D,
    GROUP,
    NUM_SPLITS,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_TOKENS: tl.constexpr,
):
    s, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    length = tl.load(len_ptr + s)
    lo = split * SPLIT_TOKENS
    hi = tl.minimum(length, lo + SPLIT_TOKENS)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    in_g, in_d = g < GROUP, d < D
    heads = kvh * GROUP + g
    q = tl.load(
        q_ptr + s.to(tl.int64) * q_row_stride + heads[:, None] * q_head_stride + d[None, :],
        mask=in_g[:, None] & in_d[None, :],
        other=0.0,
    ).to(tl.float32)
    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    slot_row = slots_ptr + s.to(tl.int64) * slots_stride
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        in_n = n < hi
        slot = tl.load(slot_row + n, mask=in_n, other=0)
        k = _load_kv_block(kc_ptr, ks_ptr, slot, kvh, HKV, D, d, in_n, in_d)
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        scores = tl.where(in_n[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_kv_block(vc_ptr, vs_ptr, slot, kvh, HKV, D, d, in_n, in_d)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        m_i = m_new
    # partials [S, HQ, NUM_SPLITS, D] and [S, HQ, NUM_SPLITS, 2] (max, sum)
    part = (s.to(tl.int64) * HQ + heads) * NUM_SPLITS + split
    tl.store(part_acc_ptr + part[:, None] * D + d[None, :], acc, mask=in_g[:, None] & in_d[None, :])
    tl.store(part_ml_ptr + part * 2, m_i, mask=in_g)
    tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=in_g)


@triton.jit
def _decode_reduce_kernel(
    part_acc_ptr,
    part_ml_ptr,
    len_ptr,
    out_ptr,
    HQ,
    D,
    NUM_SPLITS,
    BLOCK_D: tl.constexpr,
    SPLIT_TOKENS: tl.constexpr,
):
    """Combine a sequence's splits in split order (its own count, from its length: batch invariant)."""
    s, h = tl.program_id(0), tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    in_d = d < D
    length = tl.load(len_ptr + s)
    base = (s.to(tl.int64) * HQ + h) * NUM_SPLITS
    # the running max and sum kept as vectors (every lane equal): loop-carried values of one fixed type
    m = tl.full((BLOCK_D,), float("-inf"), tl.float32)
    l_sum = tl.zeros((BLOCK_D,), tl.float32)
    acc = tl.zeros((BLOCK_D,), tl.float32)
    for split in range(0, tl.cdiv(length, SPLIT_TOKENS)):
        m_s = tl.load(part_ml_ptr + (base + split) * 2)
        l_s = tl.load(part_ml_ptr + (base + split) * 2 + 1)
        a_s = tl.load(part_acc_ptr + (base + split) * D + d, mask=in_d, other=0.0)
        m_new = tl.maximum(m, m_s)
        alpha, beta = tl.exp(m - m_new), tl.exp(m_s - m_new)
        acc = acc * alpha + a_s * beta
        l_sum = l_sum * alpha + l_s * beta
        m = m_new
    out = tl.where(l_sum > 0, acc / tl.maximum(l_sum, 1e-30), 0.0)  # an empty (padding) row: zeros
    tl.store(out_ptr + (s.to(tl.int64) * HQ + h) * D + d, out, mask=in_d)


def decode_attention(
    q: torch.Tensor,
    layer_tensors: dict[str, torch.Tensor],
    slots: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query token per sequence (``q`` ``[S, Hq, D]`` fp32) over its padded slot list ``slots`` ``[S, L]``
    (``lengths`` ``[S]`` int32) of one layer; returns ``[S, Hq, D]`` fp32. Launch shapes depend on ``S``
    and ``L`` only, never on the lengths' values (no host synchronization: CUDA-graph safe)."""
    s, hq, d = q.shape
    hkv = layer_tensors["k"].shape[1]
    group = hq // hkv
    num_splits = max(1, triton.cdiv(slots.shape[1], DECODE_SPLIT_TOKENS))
    out = torch.empty(s, hq, d, dtype=torch.float32, device=q.device)
    if s == 0:
        return out
    part_acc = torch.empty(s, hq, num_splits, d, dtype=torch.float32, device=q.device)
    part_ml = torch.empty(s, hq, num_splits, 2, dtype=torch.float32, device=q.device)
    block_d = triton.next_power_of_2(d)
    _decode_attention_kernel[(s, hkv, num_splits)](
        q, q.stride(0), q.stride(1),
        layer_tensors["k"], layer_tensors["k_scale"], layer_tensors["v"], layer_tensors["v_scale"],
        slots, slots.stride(0), lengths, part_acc, part_ml, scale, hq, hkv, d, group, num_splits,
        BLOCK_G=max(MIN_DOT_ROWS, triton.next_power_of_2(group)), BLOCK_D=block_d, BLOCK_N=DECODE_BLOCK_N,
        SPLIT_TOKENS=DECODE_SPLIT_TOKENS,
    )  # fmt: skip
    _decode_reduce_kernel[(s, hq)](
        part_acc, part_ml, lengths, out, hq, d, num_splits, BLOCK_D=block_d, SPLIT_TOKENS=DECODE_SPLIT_TOKENS
    )
    return out


@triton.jit
def _prefill_attention_kernel(
    q_ptr,
    q_row_stride,
    q_head_stride,
    kc_ptr,
    ks_ptr,
    vc_ptr,
    vs_ptr,
    slots_ptr,
    out_ptr,
    n_queries,
    ctx,
    scale,
    HQ,
    HKV,
    D,
    GROUP,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m, h = tl.program_id(0), tl.program_id(1)
    kvh = h // GROUP
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    in_m, in_d = rm < n_queries, d < D
    start = ctx - n_queries  # absolute position of the first query (the rest of the context is cached)
    q_pos = start + rm
    q = tl.load(
        q_ptr + rm.to(tl.int64)[:, None] * q_row_stride + h * q_head_stride + d[None, :],
        mask=in_m[:, None] & in_d[None, :],
        other=0.0,
    )
    q = (q * scale).to(tl.float16)  # scaled first: fp16 operands, fp32 accumulation
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    # causal: this tile's last query sees keys up to its position; blocks start at 0 for every chunking
    hi = tl.minimum(ctx, start + (pid_m + 1) * BLOCK_M)
    for n0 in range(0, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        in_n = n < ctx
        slot = tl.load(slots_ptr + n, mask=in_n, other=0)
        k = _load_kv_block(kc_ptr, ks_ptr, slot, kvh, HKV, D, d, in_n, in_d).to(tl.float16)
        scores = tl.dot(q, tl.trans(k))
        visible = in_n[None, :] & (n[None, :] <= q_pos[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_kv_block(vc_ptr, vs_ptr, slot, kvh, HKV, D, d, in_n, in_d).to(tl.float16)
        acc = acc * alpha[:, None] + tl.dot(p.to(tl.float16), v)
        m_i = m_new
    out = acc / tl.maximum(l_i, 1e-30)[:, None]
    tl.store(
        out_ptr + rm.to(tl.int64)[:, None] * (HQ * D) + h * D + d[None, :], out, mask=in_m[:, None] & in_d[None, :]
    )


def prefill_attention(
    q: torch.Tensor, layer_tensors: dict[str, torch.Tensor], slots: torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal attention of one sequence's chunk ``q`` ``[n, Hq, D]`` (its last ``n`` positions) over its context
    ``slots`` ``[ctx]`` of one layer; returns ``[n, Hq * D]`` fp32."""
    n, hq, d = q.shape
    hkv = layer_tensors["k"].shape[1]
    out = torch.empty(n, hq * d, dtype=torch.float32, device=q.device)
    if n:
        _prefill_attention_kernel[(triton.cdiv(n, PREFILL_BLOCK_M), hq)](
            q, q.stride(0), q.stride(1),
            layer_tensors["k"], layer_tensors["k_scale"], layer_tensors["v"], layer_tensors["v_scale"],
            slots, out, n, slots.numel(), scale, hq, hkv, d, hq // hkv,
            BLOCK_M=PREFILL_BLOCK_M, BLOCK_N=PREFILL_BLOCK_N, BLOCK_D=triton.next_power_of_2(d),
        )  # fmt: skip
    return out
