"""A8W8 and float linears as Triton kernels: a row prologue, one tiled GEMM with optional split-K, the epilogue.

* ``rows_prologue``: one program per row applies the linear's prologue (RMSNorm, or SwiGLU's
  ``silu(gate) * up``) and, for A8W8, the per-token symmetric INT8 quantization of
  ``loaders/quantization.py`` (scale = absmax / 127, round half to even, clamp to +-127). A row's numbers
  depend on that row alone (fixed block size, fixed reduction order): batch invariant.
* ``gemm``: ``[M, K] x [N, K]^T``, the weight kept as stored, ``[N, K]`` with K contiguous (the
  "column-major B" that INT8 tensor-core GEMMs want). INT8 accumulates exactly in INT32, so the tiling, the
  K split and the batch size cannot change a result. The epilogue (``acc * s_x * s_w + bias``, then the
  residual add, the order of the eager reference) is fused into the GEMM, or into the split-K reduction.
  Float weights (a bf16 lm_head) accumulate in fp32 with one fixed configuration and no split, so their
  summation order does not depend on the batch either.

Configurations are a fixed list chosen by shape (:func:`choose_config`), not timed at run time, so every one
of them is tested (``tests/integration/test_cuda_kernels.py`` runs each under ``TRITON_INTERPRET=1`` with K and N tails).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from loaders.quantization import ACTIVATION_QMAX, MIN_DIVISOR, FloatLinear, Int8Linear, LinearWeight
from npu.backends.base import RMSNorm, hadamard_scale

# x + 1.5 * 2**23 - 1.5 * 2**23 rounds an fp32 |x| < 2**22 to the nearest integer, ties to even: torch.round's
# rule, exact on every target (the quantized values are at most 127 in magnitude).
ROUND_MAGIC = tl.constexpr(12582912.0)
QMAX = tl.constexpr(ACTIVATION_QMAX)
DIVISOR_FLOOR = tl.constexpr(MIN_DIVISOR)
# Columns one prologue program handles per pass over its row (the row is read in passes of this width).
PROLOGUE_BLOCK = 1024


@triton.jit
def round_half_even(x):
    return (x + ROUND_MAGIC) - ROUND_MAGIC


@triton.jit
def hadamard_butterfly(v, BLOCK: tl.constexpr, H: tl.constexpr):
    """One stage of the fast Walsh-Hadamard transform over ``v`` [BLOCK]: each pair (i, i + H) of every
    2H-run becomes (a + b, a - b), as npu/backends/base.py hadamard_rows computes it."""
    y = tl.permute(tl.reshape(v, (BLOCK // (2 * H), 2, H)), (0, 2, 1))  # [runs, H, 2]: the pairs last
    a, b = tl.split(y)
    y = tl.permute(tl.join(a + b, a - b), (0, 2, 1))
    return tl.reshape(y, (BLOCK,))


@triton.jit
def _prologue_values(
    x_row,
    norm_ptr,
    cols,
    K,
    inv_rms,
    hadamard_scale,
    HAS_NORM: tl.constexpr,
    GATED: tl.constexpr,
    HADAMARD_LOG2: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The linear's input at ``cols`` of one row after its prologue, in fp32 (then R4's block-diagonal Hadamard
    of blocks of ``2**HADAMARD_LOG2``, which divide BLOCK: a pass holds whole blocks)."""
    inside = cols < K
    v = tl.load(x_row + cols, mask=inside, other=0.0).to(tl.float32)
    if GATED:  # x = [gate | up]: silu(gate) * up
        up = tl.load(x_row + K + cols, mask=inside, other=0.0).to(tl.float32)
        v = v * tl.math.div_rn(1.0, 1.0 + tl.exp(-v)) * up
    if HAS_NORM:
        w = tl.load(norm_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        v = w * (v * inv_rms)
    if HADAMARD_LOG2 > 0:
        for s in tl.static_range(HADAMARD_LOG2):
            v = hadamard_butterfly(v, BLOCK, 1 << s)
        v = v * hadamard_scale
    return v


@triton.jit
def _rows_prologue_kernel(
    x_ptr,
    x_stride,
    norm_ptr,
    eps,
    out_ptr,
    scale_ptr,
    K,
    hadamard_scale,
    HAS_NORM: tl.constexpr,
    GATED: tl.constexpr,
    HADAMARD_LOG2: tl.constexpr,
    QUANTIZE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * x_stride
    out_row = out_ptr + row.to(tl.int64) * K
    inv_rms = 1.0
    if HAS_NORM:  # transformers' Qwen3RMSNorm in fp32: x / sqrt(mean(x^2) + eps), then the weight
        sq = tl.zeros((BLOCK,), tl.float32)
        for k0 in range(0, K, BLOCK):
            cols = k0 + tl.arange(0, BLOCK)
            v = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
            sq += v * v
        inv_rms = tl.math.div_rn(1.0, tl.math.sqrt_rn(tl.sum(sq, 0) / K + eps))
    if QUANTIZE:
        amax = tl.zeros((BLOCK,), tl.float32)
        for k0 in range(0, K, BLOCK):
            cols = k0 + tl.arange(0, BLOCK)
            v = _prologue_values(
                x_row, norm_ptr, cols, K, inv_rms, hadamard_scale, HAS_NORM, GATED, HADAMARD_LOG2, BLOCK
            )
            amax = tl.maximum(amax, tl.abs(v))
        scale = tl.math.div_rn(tl.max(amax, 0), QMAX)
        divisor = tl.maximum(scale, DIVISOR_FLOOR)
        for k0 in range(0, K, BLOCK):
            cols = k0 + tl.arange(0, BLOCK)
            v = _prologue_values(
                x_row, norm_ptr, cols, K, inv_rms, hadamard_scale, HAS_NORM, GATED, HADAMARD_LOG2, BLOCK
            )
            q = tl.minimum(tl.maximum(round_half_even(tl.math.div_rn(v, divisor)), -QMAX), QMAX)
            tl.store(out_row + cols, q.to(tl.int8), mask=cols < K)
        tl.store(scale_ptr + row, scale)
    else:
        for k0 in range(0, K, BLOCK):
            cols = k0 + tl.arange(0, BLOCK)
            v = _prologue_values(
                x_row, norm_ptr, cols, K, inv_rms, hadamard_scale, HAS_NORM, GATED, HADAMARD_LOG2, BLOCK
            )
            tl.store(out_row + cols, v, mask=cols < K)


def check_input_hadamard(block: int, in_features: int) -> None:
    """ValueError unless ``block`` (R4's online Hadamard; 0: none) is one :func:`rows_prologue` can apply."""
    if block and (block & (block - 1) or PROLOGUE_BLOCK % block or in_features % block):
        raise ValueError(
            f"an online Hadamard block of {block} on {in_features} features: needs a power of two that divides "
            f"both and {PROLOGUE_BLOCK}"
        )


def rows_prologue(
    x: torch.Tensor, in_features: int, norm: RMSNorm | None, gated: bool, quantize: bool, input_hadamard: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(the GEMM's input ``[M, in_features]``: INT8 when ``quantize``, else fp32; the per-row scales or None).
    ``input_hadamard``: R4's block-diagonal Hadamard after the prologue (:func:`check_input_hadamard`)."""
    if norm is not None and gated:
        raise ValueError("a linear takes an RMSNorm or a SwiGLU gate in front, not both")
    check_input_hadamard(input_hadamard, in_features)
    if x.stride(-1) != 1:
        x = x.contiguous()
    m = x.shape[0]
    out = torch.empty(m, in_features, dtype=torch.int8 if quantize else torch.float32, device=x.device)
    scales = torch.empty(m, dtype=torch.float32, device=x.device) if quantize else None
    if m:
        _rows_prologue_kernel[(m,)](
            x,
            x.stride(0),
            x if norm is None else norm.weight,
            0.0 if norm is None else norm.eps,
            out,
            out if scales is None else scales,
            in_features,
            hadamard_scale(input_hadamard) if input_hadamard else 1.0,
            HAS_NORM=norm is not None,
            GATED=gated,
            HADAMARD_LOG2=max(input_hadamard, 1).bit_length() - 1,
            QUANTIZE=quantize,
            BLOCK=PROLOGUE_BLOCK,
        )
    return out, scales


@triton.jit
def _epilogue(
    acc,
    rm,
    rn,
    M,
    N,
    sa_ptr,
    sw_ptr,
    bias_ptr,
    res_ptr,
    res_stride,
    out_ptr,
    out_stride,
    INT8: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    """``acc * s_x * s_w (+ bias)``, then ``residual + y``: the eager reference's order of operations."""
    in_m, in_n = rm < M, rn < N
    y = acc.to(tl.float32)
    if INT8:
        sa = tl.load(sa_ptr + rm, mask=in_m, other=0.0)
        sw = tl.load(sw_ptr + rn, mask=in_n, other=0.0)
        y = (y * sa[:, None]) * sw[None, :]
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + rn, mask=in_n, other=0.0)[None, :]
    mask = in_m[:, None] & in_n[None, :]
    rows = rm.to(tl.int64)[:, None]
    if HAS_RESIDUAL:
        y = tl.load(res_ptr + rows * res_stride + rn[None, :], mask=mask, other=0.0) + y
    tl.store(out_ptr + rows * out_stride + rn[None, :], y, mask=mask)


@triton.jit
def _gemm_kernel(
    a_ptr,
    a_stride,
    w_ptr,
    M,
    N,
    K,
    sa_ptr,
    sw_ptr,
    bias_ptr,
    res_ptr,
    res_stride,
    out_ptr,
    out_stride,
    part_ptr,
    INT8: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    # grouped order: GROUP_M row tiles walk the N tiles together, so their weight tiles are reused from L2
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_rows
    pid_n = (pid % in_group) // group_rows
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # this program's share of K: whole BLOCK_K steps, the last split takes the tail
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(K, k_lo + k_per_split)
    in_m, in_n = rm < M, rn < N
    a_rows = a_ptr + rm.to(tl.int64)[:, None] * a_stride
    w_cols = w_ptr + rn.to(tl.int64)[None, :] * K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if INT8 else tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        in_k = rk < k_hi  # every K tail masked (an unmasked tail reads the next row's weights)
        a = tl.load(a_rows + rk[None, :], mask=in_m[:, None] & in_k[None, :], other=0)
        w = tl.load(w_cols + rk[:, None], mask=in_n[None, :] & in_k[:, None], other=0)
        if INT8:
            acc = tl.dot(a, w, acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    if SPLIT_K == 1:
        _epilogue(
            acc, rm, rn, M, N, sa_ptr, sw_ptr, bias_ptr, res_ptr, res_stride, out_ptr, out_stride,
            INT8, HAS_BIAS, HAS_RESIDUAL,
        )  # fmt: skip
    else:
        part = part_ptr + pid_k.to(tl.int64) * M * N + rm.to(tl.int64)[:, None] * N + rn[None, :]
        tl.store(part, acc, mask=in_m[:, None] & in_n[None, :])


@triton.jit
def _split_k_reduce_kernel(
    part_ptr,
    M,
    N,
    sa_ptr,
    sw_ptr,
    bias_ptr,
    res_ptr,
    res_stride,
    out_ptr,
    out_stride,
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Sum the INT32 partials of a split-K GEMM (exact, in any order) and apply the epilogue."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for s in range(SPLIT_K):
        acc += tl.load(part_ptr + s * M * N + offs, mask=mask, other=0)
    _epilogue(
        acc, rm, rn, M, N, sa_ptr, sw_ptr, bias_ptr, res_ptr, res_stride, out_ptr, out_stride,
        True, HAS_BIAS, HAS_RESIDUAL,
    )  # fmt: skip


@dataclass(frozen=True)
class GemmConfig:
    """One tile shape of :func:`gemm`. ``split_k`` > 1 splits K over that many programs per output tile
    (decode shapes: few rows, so the N tiles alone leave most SMs idle)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


# Every configuration choose_config can return (the tests run each one).
DECODE_CONFIGS = (  # M <= 16: weight streaming; wide K steps for long vector loads
    GemmConfig(16, 64, 256, num_warps=4, num_stages=4),
    GemmConfig(16, 128, 128, num_warps=4, num_stages=4),
)
SMALL_BATCH_CONFIGS = (GemmConfig(64, 64, 128, num_warps=4, num_stages=4),)  # 16 < M <= 64
PREFILL_CONFIGS = (  # M > 64: compute bound, square-ish tiles
    GemmConfig(128, 128, 64, num_warps=8, num_stages=3),
    GemmConfig(64, 128, 128, num_warps=4, num_stages=3),
)
# float weights: one configuration for every M, so the fp32 summation order never depends on the batch
FLOAT_CONFIG = GemmConfig(16, 64, 64, num_warps=4, num_stages=3)
# Under Triton's interpreter each program costs milliseconds of Python whatever its size: one wide tile for
# every shape keeps the number of programs, and so the interpreted tests, small.
INTERPRETER_CONFIG = GemmConfig(16, 4096, 64, num_warps=4, num_stages=1)
# Split K only while each split still covers this many BLOCK_K steps (fewer: the reduction costs more than
# the extra programs gain).
MIN_K_STEPS_PER_SPLIT = 2
# Aim for this many programs per SM in a decode-shaped GEMM (enough to hide load latency).
PROGRAMS_PER_SM = 4
MAX_SPLIT_K = 16


def choose_config(m: int, n: int, k: int, int8: bool, num_sms: int, interpreted: bool = False) -> GemmConfig:
    """The configuration for an ``[m, k] x [n, k]^T`` GEMM: a fixed rule of the shape (no timing), so runs
    are reproducible and every choice is one the tests ran."""
    if interpreted:
        return INTERPRETER_CONFIG
    if not int8:
        return FLOAT_CONFIG
    if m > 64:
        return PREFILL_CONFIGS[0] if m >= 512 and n >= 1024 else PREFILL_CONFIGS[1]
    tile = (DECODE_CONFIGS[0] if n <= 4096 else DECODE_CONFIGS[1]) if m <= 16 else SMALL_BATCH_CONFIGS[0]
    tiles = triton.cdiv(m, tile.block_m) * triton.cdiv(n, tile.block_n)
    wanted = triton.cdiv(PROGRAMS_PER_SM * num_sms, tiles)
    most = max(1, k // (MIN_K_STEPS_PER_SPLIT * tile.block_k))
    split = max(1, min(wanted, most, MAX_SPLIT_K))
    return GemmConfig(tile.block_m, tile.block_n, tile.block_k, split, tile.group_m, tile.num_warps, tile.num_stages)


def gemm(
    a: torch.Tensor,
    weight: torch.Tensor,
    *,
    a_scale: torch.Tensor | None = None,
    w_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: GemmConfig,
) -> torch.Tensor:
    """``a [M, K] @ weight [N, K]^T`` with the epilogue, into ``out`` (fp32 ``[M, N]``, allocated if None).
    INT8 ``a`` and ``weight`` take their per-row and per-channel scales; float ones take none."""
    m, k = a.shape
    n = weight.shape[0]
    int8 = a.dtype == torch.int8
    if int8 != (weight.dtype == torch.int8) or int8 != (a_scale is not None and w_scale is not None):
        raise ValueError("an INT8 GEMM takes INT8 activations and weights with both scales; a float one neither")
    if not int8 and config.split_k != 1:
        raise ValueError("float GEMMs do not split K (the summation order would depend on the split)")
    if out is None:
        out = torch.empty(m, n, dtype=torch.float32, device=a.device)
    if m == 0:
        return out
    if residual is not None and residual.stride(-1) != 1:
        residual = residual.contiguous()
    tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    partials = torch.empty(config.split_k, m, n, dtype=torch.int32, device=a.device) if config.split_k > 1 else out
    dummy = out  # pointer arguments a configuration does not read
    epilogue_args = (
        dummy if a_scale is None else a_scale,
        dummy if w_scale is None else w_scale,
        dummy if bias is None else bias,
        dummy if residual is None else residual,
        0 if residual is None else residual.stride(0),
        out,
        out.stride(0),
    )
    _gemm_kernel[(tiles, config.split_k)](
        a, a.stride(0), weight, m, n, k, *epilogue_args, partials,
        INT8=int8, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, SPLIT_K=config.split_k,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
        num_warps=config.num_warps, num_stages=config.num_stages,
        enable_fp_fusion=False,  # no multiply-add contraction: the epilogue rounds as the eager reference does
    )  # fmt: skip
    if config.split_k > 1:
        grid = (triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n))
        _split_k_reduce_kernel[grid](
            partials, m, n, *epilogue_args,
            SPLIT_K=config.split_k, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, enable_fp_fusion=False,
        )  # fmt: skip
    return out


class TritonLinear:
    """A :class:`~npu.backends.base.LinearOp` on the GPU: prologue kernel, then the GEMM with its epilogue.

    INT8 weights stay ``[N, K]`` INT8 with fp32 per-channel scales; float weights keep their dtype (bf16) and
    accumulate in fp32. Output is fp32, the residual stream's dtype.
    """

    def __init__(self, weight: LinearWeight, device: torch.device, num_sms: int, input_hadamard: int = 0):
        self.int8 = isinstance(weight, Int8Linear)
        if self.int8:
            assert isinstance(weight, Int8Linear)
            self.weight = weight.qweight.contiguous().to(device)
            self.w_scale: torch.Tensor | None = weight.scale.float().contiguous().to(device)
        else:
            assert isinstance(weight, FloatLinear)
            self.weight = weight.weight.contiguous().to(device)
            self.w_scale = None
        self.bias = None if weight.bias is None else weight.bias.float().contiguous().to(device)
        self.out_features, self.in_features = self.weight.shape
        check_input_hadamard(input_hadamard, self.in_features)
        self.input_hadamard = input_hadamard  # R4's block (rows_prologue); 0: none
        self.num_sms = num_sms
        self.interpreted = device.type == "cpu"  # the kernels run in Triton's interpreter

    def __call__(
        self,
        x: torch.Tensor,
        *,
        norm: RMSNorm | None = None,
        gated: bool = False,
        residual: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        a, a_scale = rows_prologue(x, self.in_features, norm, gated, self.int8, self.input_hadamard)
        config = choose_config(
            a.shape[0], self.out_features, self.in_features, self.int8, self.num_sms, self.interpreted
        )
        return gemm(
            a,
            self.weight,
            a_scale=a_scale,
            w_scale=self.w_scale,
            bias=self.bias,
            residual=residual,
            out=out,
            config=config,
        )
