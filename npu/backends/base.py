"""The kernel interface every backend implements, and its plain-PyTorch reference implementation.

A layer asks its backend for a handful of operations: linears with an optional RMSNorm or SiLU-gate
prologue and a residual-add epilogue, q/k norm + RoPE, writing K/V into the paged cache, and attention
over the paged cache (a prompt chunk, or one token per sequence). :class:`TorchOps` implements each of them with eager PyTorch ops; a backend subclasses it and
replaces what it has faster kernels for, so every model runs on every backend and a fused kernel can be
tested against the eager op it replaces.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from loaders.quantization import LinearWeight
from npu.kv_cache import PagedKVCache


@dataclass(frozen=True)
class RMSNorm:
    """An RMSNorm applied in front of a linear: ``weight * (x / sqrt(mean(x^2) + eps))``."""

    weight: torch.Tensor
    eps: float


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Qwen3RMSNorm: normalize in fp32, cast back, scale."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gate: ``silu(x[:, :I]) * x[:, I:]`` for ``x`` = [gate | up]."""
    inter = x.shape[-1] // 2
    return F.silu(x[..., :inter]) * x[..., inter:]


def hadamard_scale(block: int) -> float:
    """The fp32 factor that normalizes a Sylvester block of order ``block`` (one constant, in every backend)."""
    return float(torch.tensor(1.0 / math.sqrt(block), dtype=torch.float64).to(torch.float32))


def hadamard_rows(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x`` ``[M, K]`` (fp32) times the block-diagonal normalized Sylvester matrix with blocks of ``block``
    (R4's online rotation of down_proj's input): the fast Walsh-Hadamard transform, butterfly stages of stride
    1, 2, 4, ... (``a + b``, ``a - b`` in fp32), then one multiplication by :func:`hadamard_scale`. Every
    backend computes exactly these operations in this order, so all give the same bits."""
    m, k = x.shape
    y = x.float().reshape(m, k // block, block)
    h = 1
    while h < block:
        y = y.reshape(m, k // block, block // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return (y.reshape(m, k) * hadamard_scale(block)).to(x.dtype)


@dataclass(frozen=True)
class DecoderStackInputs:
    """What a backend's one-call decoder stack is built from (:meth:`Backend.prepare_decoder_stack`): the model's
    layers (each with ``qkv``, ``o``, ``gate_up``, ``down``, ``input_norm``, ``post_norm``, ``qk_norm``), its
    attention shape, its RoPE tables, the attention scale, and ``layer_loop(x, batch, cache) -> x``, the model's
    own layer loop, for a backend that captures it (CUDA graphs) rather than reimplementing it."""

    layers: Sequence[Any]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    cos: torch.Tensor
    sin_signed: torch.Tensor
    scale: float
    layer_loop: Callable[..., torch.Tensor] | None = None


class LinearOp(Protocol):
    """A prepared linear layer: ``[M, K]`` activations (backend dtype) -> ``[M, N]`` activations.

    ``norm`` applies an RMSNorm to the input first, ``gated`` takes an ``[M, 2K]`` input and applies
    :func:`silu_and_mul` first (then the op's own ``input_hadamard`` rotation, R4's, where it has one),
    ``residual`` (``[M, N]``) is added to the output. ``out``, when given, is
    an ``[M, N]`` fp32 buffer the result is written to (the caller reuses it: large fresh allocations
    page-fault on every use).
    """

    out_features: int
    in_features: int  # K (the input is [M, 2K] when gated)

    def __call__(
        self,
        x: torch.Tensor,
        *,
        norm: RMSNorm | None = None,
        gated: bool = False,
        residual: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor: ...


class UnfusedLinear:
    """A :class:`LinearOp` from a plain GEMM: prologue and epilogue run as separate PyTorch ops.
    ``gemm`` includes the layer's bias, if it has one."""

    out_features: int
    in_features: int
    input_hadamard: int = 0  # block of the online Hadamard on the (gated) input (R4); 0: none

    def gemm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(
        self,
        x: torch.Tensor,
        *,
        norm: RMSNorm | None = None,
        gated: bool = False,
        residual: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if norm is not None:
            x = rms_norm(x, norm.weight, norm.eps)
        if gated:
            x = silu_and_mul(x)
        if self.input_hadamard:
            x = hadamard_rows(x, self.input_hadamard)
        y = self.gemm(x)
        if residual is not None:
            y = residual + y
        return y if out is None else out.copy_(y)


class Backend(Protocol):
    """What the model forward asks of a device."""

    name: str
    note: str | None = None  # what an operator should know about this backend's choice (logged at startup)
    device: torch.device
    device_name: str  # the device in words, for the startup summary and /version
    # dtype of the residual stream and of attention math on this backend.
    activation_dtype: torch.dtype

    def prepare_linear(self, weight: LinearWeight, input_hadamard: int = 0) -> LinearOp:
        """Move/prepack one linear weight (INT8 or float) and return the op that applies it; ``input_hadamard``
        (a power of two): its input is rotated by the block-diagonal Hadamard first (:func:`hadamard_rows`)."""
        ...

    def qk_norm_rope(
        self,
        qk: torch.Tensor,
        norm: RMSNorm | None,
        cos: torch.Tensor,
        sin_signed: torch.Tensor,
        positions: torch.Tensor,
        head_hadamard: bool = False,
    ) -> torch.Tensor:
        """Per-head RMSNorm (optional) then RoPE of ``qk`` ``[T, H, D]``; may work in place. ``head_hadamard``:
        then each head times the normalized Sylvester matrix of order D (R3, :func:`hadamard_rows`)."""
        ...

    def write_kv(self, cache: PagedKVCache, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store ``k``/``v`` ``[T, Hkv, D]`` at ``slots`` of layer ``layer`` of the paged cache."""
        ...

    def prefill_attention(
        self, q: torch.Tensor, cache: PagedKVCache, layer: int, slots: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Causal attention of one sequence's chunk of queries ``q`` ``[n, Hq, D]`` (the last ``n`` of its
        ``len(slots)`` positions) over its context ``slots`` of layer ``layer``; returns ``[n, Hq * D]``."""
        ...

    def prepare_decoder_stack(self, stack: DecoderStackInputs) -> Any | None:
        """Optional: an object whose ``decode(x, positions, slot_mapping, context_slots, lengths, cache) -> bool``
        runs all decoder layers of a pure decode step at once, with the same results as the model's layer loop
        over ``stack.layers``; None to keep the loop."""
        ...

    def argmax_rows(self, logits: torch.Tensor) -> torch.Tensor:
        """Index of the first maximum of each row of ``logits`` ``[S, V]`` (greedy sampling)."""
        ...

    def decode_attention(
        self, q: torch.Tensor, cache: PagedKVCache, layer: int, slots: torch.Tensor, lengths: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Attention of one query token per sequence (``q`` ``[S, Hq, D]``) over the padded slot lists
        ``slots`` ``[S, L]`` (``lengths`` ``[S]`` int32; slots past a row's length are ignored) of layer
        ``layer``; returns ``[S, Hq * D]``."""
        ...


class TorchOps:
    """Eager-PyTorch implementations of the :class:`Backend` operations (the reference)."""

    note: str | None = None
    device = torch.device("cpu")
    device_name = "cpu"

    def qk_norm_rope(
        self,
        qk: torch.Tensor,
        norm: RMSNorm | None,
        cos: torch.Tensor,
        sin_signed: torch.Tensor,
        positions: torch.Tensor,
        head_hadamard: bool = False,
    ) -> torch.Tensor:
        if norm is not None:
            qk = rms_norm(qk, norm.weight, norm.eps)
        c, s = cos[positions][:, None, :], sin_signed[positions][:, None, :]
        # rotate_half(x) * sin == roll(x, d/2) * [-sin, sin]: one roll instead of slice/neg/cat
        out = qk * c + qk.roll(qk.shape[-1] // 2, dims=-1) * s
        if head_hadamard:  # R3: q and k rotated alike, so q . k is unchanged while K's INT8 rounding spreads out
            t, h, d = out.shape
            out = hadamard_rows(out.reshape(t * h, d), d).reshape(t, h, d)
        return out

    def write_kv(self, cache: PagedKVCache, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        cache.write(layer, slots, k, v)

    def argmax_rows(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.argmax(-1)

    def prepare_decoder_stack(self, stack: DecoderStackInputs) -> Any | None:
        return None

    def prefill_attention(
        self, q: torch.Tensor, cache: PagedKVCache, layer: int, slots: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """The chunk's context gathered and dequantized in ``q``'s dtype, then one causal SDPA call."""
        n, hq, d = q.shape
        ctx = slots.numel()
        kv = cache.read(layer, slots, q.dtype)
        qh = q.transpose(0, 1)[None]  # [n, Hq, D] -> [1, Hq, n, D]
        k = kv.k.transpose(0, 1)[None]  # [1, Hkv, ctx, D]
        v = kv.v.transpose(0, 1)[None]
        mask, causal = None, False
        if n == ctx:
            causal = n > 1
        elif n > 1:
            # query i sits at absolute position ctx - n + i: causal aligned to the lower right. (A boolean mask,
            # not torch.nn.attention.bias.causal_lower_right: importing that module imports torch._dynamo, which
            # costs half a second at every start and imports Triton where it is installed.)
            mask = torch.ones(n, ctx, dtype=torch.bool, device=q.device).tril(ctx - n)
        out = F.scaled_dot_product_attention(
            qh, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=hq != k.shape[1]
        )
        return out[0].transpose(0, 1).reshape(n, hq * d)

    def decode_attention(
        self, q: torch.Tensor, cache: PagedKVCache, layer: int, slots: torch.Tensor, lengths: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Every row's padded context gathered and dequantized in ``q``'s dtype, then one masked SDPA call."""
        n, hq, d = q.shape
        longest = slots.shape[1]
        kv = cache.read(layer, slots.reshape(-1), q.dtype)
        hkv = kv.k.shape[1]
        k = kv.k.view(n, longest, hkv, d).transpose(1, 2)  # [S, Hkv, L, D]
        v = kv.v.view(n, longest, hkv, d).transpose(1, 2)
        keys = torch.arange(longest, device=lengths.device)
        real = (keys[None, :] < lengths[:, None])[:, None, None, :]  # [S, 1, 1, L]: True where a key is real
        out = F.scaled_dot_product_attention(q[:, :, None, :], k, v, attn_mask=real, scale=scale, enable_gqa=hq != hkv)
        return out.reshape(n, hq * d)
