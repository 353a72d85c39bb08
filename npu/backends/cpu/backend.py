"""CPU kernels.

The INT8 path: ``torch._int_mm`` (oneDNN s8s8->s32 with AVX-512 VNNI, weight stored ``[N, K]`` and passed as
``.t()``, needs ``torch.backends.mkldnn`` enabled) is bit-exact in INT32, takes our symmetric per-token
activation scales, and is the fastest GEMM at large M. fbgemm's ``quantized.linear_dynamic`` and oneDNN's
``qlinear_pointwise`` are faster at small M but quantize activations per tensor, asymmetric uint8: different
math. So ``_int_mm`` is the portable path, with quantize and epilogue as separate ops around it, which cost
as much again at decode sizes.

Hence our own kernel, ``a8w8_vnni.c`` (see ``vnni.py``): per-token quantization, a VNNI GEMM over prepacked
weights and the epilogue in one call, bit-identical to the ``_int_mm`` path; the default where the CPU has
AVX-512 VNNI and gcc is present (``cpu_kernels="auto"``), else ``a8w8_avx2.c`` (the same results with AVX2)
where the CPU has AVX2 and FMA. The two are measured side by side, decode and prefill
shapes, by ``python benchmarks/kernels.py`` (figures in the README's Performance section).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from loaders.quantization import FloatLinear, Int8Linear, LinearWeight, quantize_activations
from npu.backends.base import DecoderStackInputs, RMSNorm, TorchOps, UnfusedLinear
from npu.backends.cpu.decoder_stack import DecoderStack
from npu.backends.cpu.vnni import (
    ATTENTION,
    ATTENTION_PREP,
    BF16_GEMM,
    DECODER_STACK,
    FAMILIES,
    Bf16Linear,
    VnniLinear,
    Workspace,
    hadamard_log2,
    load_kernel_library,
)
from npu.config import CPU_KERNELS, INT8_KERNEL_ALIASES
from npu.host_memory import HugePageArena
from npu.kv_cache import Int8KV, PagedKVCache

log = logging.getLogger("a8w8.kernels")
_reported_fallbacks: set[str] = set()


def _kernel_failed(kernel: str, status: int) -> None:
    """A C kernel refused its call (non-zero status) and the eager path runs instead: said once per kernel,
    since it costs speed on every later call."""
    if kernel not in _reported_fallbacks:
        _reported_fallbacks.add(kernel)
        log.warning(
            "C kernel %s returned %d: the call (and any later one it refuses) runs through PyTorch", kernel, status
        )


def _kernel_ran(kernel: str, call: Callable[..., int], *args: Any) -> bool:
    """Call a C kernel; True when it did the work (status 0). False (reported once, by :func:`_kernel_failed`)
    when it refused: the caller then runs the eager path of the reference backend."""
    status = call(*args)
    if status == 0:
        return True
    _kernel_failed(kernel, status)
    return False


class Int8GemmLinear(UnfusedLinear):
    """A8W8 linear: per-token activation quantization, INT8 x INT8 -> INT32, fp32 epilogue."""

    def __init__(self, weight: Int8Linear, input_hadamard: int = 0):
        self.input_hadamard = input_hadamard
        self.qweight = weight.qweight.contiguous()  # [N, K]
        self.scale = weight.scale.float().contiguous()  # [N]
        self.bias = None if weight.bias is None else weight.bias.float().contiguous()
        self.out_features, self.in_features = self.qweight.shape

    def gemm(self, x: torch.Tensor) -> torch.Tensor:
        qx, sx = quantize_activations(x)
        acc = torch._int_mm(qx, self.qweight.t())
        # int32 * fp32 promotes to fp32 in one pass; then the per-channel scale (and bias) in place
        y = torch.mul(acc, sx[:, None]).mul_(self.scale)
        return y if self.bias is None else y.add_(self.bias)


# Output rows per chunk when FloatGemmLinear widens a BF16 weight to fp32 (bounds the widened copy: 9 MiB at
# K = 576, 16 MiB at K = 1024).
WIDEN_ROWS = 4096


class FloatGemmLinear(UnfusedLinear):
    """Float linear (the reference path and a float lm_head): the input rounded to the weight's dtype, products
    accumulated and returned in the activation dtype (fp32). For a BF16 weight that is what the kernels'
    ``bf16_gemm`` computes; ``F.linear`` in BF16 would round the output (the logits) to BF16, which on the default
    model cost perplexity +0.38 % against +0.29 % and mean KLD 0.0028 against 0.0024 (docs/quality.md)."""

    def __init__(self, weight: FloatLinear, activation_dtype: torch.dtype, input_hadamard: int = 0):
        self.input_hadamard = input_hadamard
        self.weight = weight.weight.contiguous()
        self.bias = None if weight.bias is None else weight.bias.to(self.weight.dtype).contiguous()
        self.out_features, self.in_features = self.weight.shape
        self.activation_dtype = activation_dtype

    def gemm(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == self.activation_dtype:
            return F.linear(x.to(self.activation_dtype), self.weight, self.bias)
        # products of BF16 values are exact in fp32: widen the rounded input once and the weight a chunk at a time
        rounded = x.to(self.weight.dtype).to(self.activation_dtype)
        out = torch.empty(x.shape[0], self.out_features, dtype=self.activation_dtype, device=x.device)
        for start in range(0, self.out_features, WIDEN_ROWS):
            rows = slice(start, start + WIDEN_ROWS)
            torch.mm(rounded, self.weight[rows].to(self.activation_dtype).t(), out=out[:, rows])
        return out if self.bias is None else out.add_(self.bias)


assert CPU_KERNELS == ("auto", *FAMILIES, "reference"), "npu/messages.py names every kernel family"
# the backend's name (startup summary, /version, metrics) per kernel family
BACKEND_NAMES = {
    "avx512-vnni": "cpu-vnni",
    "avx-vnni": "cpu-avx-vnni",
    "avx2": "cpu-avx2",
    "neon": "cpu-neon",
    "neon-plain": "cpu-neon-plain",
    "reference": "cpu-onednn",
}


def _layer_ptr(cache_tensor: torch.Tensor, layer: int) -> int:
    """Address of ``cache_tensor[layer]`` (a contiguous per-layer cache array) without building the view."""
    return cache_tensor.data_ptr() + layer * cache_tensor.stride(0) * cache_tensor.element_size()


class CpuBackend(TorchOps):
    device = torch.device("cpu")
    # fp32 residual stream: cheap on CPU at these widths, and keeps norms/attention exact enough.
    activation_dtype = torch.float32

    def __init__(self, num_threads: int | None = None, cpu_kernels: str = "auto"):
        cpu_kernels = INT8_KERNEL_ALIASES.get(cpu_kernels, cpu_kernels)
        if cpu_kernels not in CPU_KERNELS:
            raise ValueError(f"cpu_kernels={cpu_kernels!r}; choose one of {CPU_KERNELS}")
        if num_threads:
            torch.set_num_threads(num_threads)
        if not torch.backends.mkldnn.is_available():
            raise RuntimeError("the cpu backend needs PyTorch built with oneDNN (mkldnn)")
        torch.backends.mkldnn.enabled = True
        lib = None
        if cpu_kernels != "reference":
            reasons = []
            for name in FAMILIES if cpu_kernels == "auto" else (cpu_kernels,):
                lib, why = load_kernel_library(name)
                if lib is not None:
                    break
                reasons.append(f"{name}: {why}")
            if lib is None and cpu_kernels != "auto":
                raise RuntimeError(f"cpu kernels {cpu_kernels!r} are not available: {why}")
            if lib is None:
                self.note = (
                    f"no CPU kernel family is usable here ({'; '.join(reasons)}): INT8 GEMMs run through "
                    "torch._int_mm (oneDNN) and the rest as eager PyTorch, several times slower; check the CPU "
                    "(lscpu) and gcc, or pass --cpu-kernels reference to silence this"
                )
            elif not lib.family.complete:
                self.note = (
                    f"the {lib.family.name} kernel family does not have {', '.join(lib.family.missing())} yet: "
                    "those run as eager PyTorch"
                )
        # the chosen family's library for each kind of kernel it has (None: that kind runs as eager PyTorch)
        self._gemm = lib
        self._prep = self._with(lib, ATTENTION_PREP)
        self._attention = self._with(lib, ATTENTION)
        self._stack = self._with(lib, DECODER_STACK)
        self._bf16 = self._bf16_library(lib)
        self.kernel_family = "reference" if lib is None else lib.family.name
        self._workspace = Workspace()
        self._weight_arena = HugePageArena()  # packed weights on huge pages (npu/host_memory.py)
        self.name = BACKEND_NAMES[self.kernel_family]

    @staticmethod
    def _with(lib: Any, op: str) -> Any:
        """``lib`` where its family has kernel ``op`` (npu/backends/cpu/vnni.py), else None."""
        return lib if lib is not None and op in lib.family.ops else None

    @staticmethod
    def _bf16_library(lib: Any) -> Any:
        """The chosen family's BF16 GEMM where this CPU runs it, else the next family's that it runs (an AVX-512
        CPU without AVX-512 BF16 takes the AVX2 family's), else None (F.linear)."""
        if lib is None:
            return None
        names = list(FAMILIES)
        for name in names[names.index(lib.family.name) :]:
            other = lib if name == lib.family.name else load_kernel_library(name)[0]
            if other is not None and BF16_GEMM in other.family.ops and other.has_bf16:
                return other
        return None

    def prepare_linear(self, weight: LinearWeight, input_hadamard: int = 0):
        if isinstance(weight, Int8Linear):
            return (
                VnniLinear(weight, self._gemm, self._workspace, self._weight_arena, input_hadamard)
                if self._gemm is not None
                else Int8GemmLinear(weight, input_hadamard)
            )
        if (
            weight.weight.dtype == torch.bfloat16 and weight.bias is None and self._bf16 is not None
        ):  # (a float linear with a bias: the reference path)
            return Bf16Linear(weight.weight, self._bf16, self._workspace, self._weight_arena, input_hadamard)
        return FloatGemmLinear(weight, self.activation_dtype, input_hadamard)

    def prepare_decoder_stack(self, stack: DecoderStackInputs) -> DecoderStack | None:
        """All layers of a decode step in one C call, where every kernel of the loop is ours."""
        if self._stack is None or not DecoderStack.applies_to(stack.layers, stack.cos, stack.sin_signed):
            return None
        prepared = DecoderStack(self._stack, self._workspace, stack)
        return prepared if prepared.supported else None

    def qk_norm_rope(
        self,
        qk: torch.Tensor,
        norm: RMSNorm | None,
        cos: torch.Tensor,
        sin_signed: torch.Tensor,
        positions: torch.Tensor,
        head_hadamard: bool = False,
    ) -> torch.Tensor:
        """In place with our C kernel where ``qk`` is fp32 with contiguous heads; else the eager ops."""
        t, h, d = qk.shape
        if (
            self._prep is None
            or qk.dtype != torch.float32
            or qk.stride(2) != 1
            or qk.stride(1) != d
            or not cos.is_contiguous()
            or not sin_signed.is_contiguous()
            or positions.dtype != torch.long
            or not positions.is_contiguous()
        ):
            return super().qk_norm_rope(qk, norm, cos, sin_signed, positions, head_hadamard)
        if _kernel_ran(
            "qk_norm_rope",
            self._prep.qk_norm_rope,
            qk.data_ptr(),
            t,
            qk.stride(0),
            h,
            d,
            None if norm is None else norm.weight.data_ptr(),
            0.0 if norm is None else norm.eps,
            cos.data_ptr(),
            sin_signed.data_ptr(),
            positions.data_ptr(),
            hadamard_log2(d if head_hadamard else 0),
        ):
            return qk
        return super().qk_norm_rope(qk, norm, cos, sin_signed, positions, head_hadamard)

    def write_kv(self, cache: PagedKVCache, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """INT8 caches through our C kernel (quantize + scatter in one pass); other dtypes as the cache does."""
        t, h, d = k.shape
        usable = (
            self._prep is not None
            and isinstance(cache.format, Int8KV)
            and k.dtype == torch.float32
            and v.dtype == torch.float32
            and k.stride()[1:] == (d, 1)
            and v.stride()[1:] == (d, 1)
            and slots.dtype == torch.long
            and slots.is_contiguous()
        )
        if usable:
            c = cache.tensors
            if _kernel_ran(
                "kv_write_int8",
                self._prep.kv_write_int8,
                k.data_ptr(),
                v.data_ptr(),
                t,
                k.stride(0),
                v.stride(0),
                h,
                d,
                slots.data_ptr(),
                _layer_ptr(c["k"], layer),
                _layer_ptr(c["k_scale"], layer),
                _layer_ptr(c["v"], layer),
                _layer_ptr(c["v_scale"], layer),
            ):
                return
        cache.write(layer, slots, k, v)

    def argmax_rows(self, logits: torch.Tensor) -> torch.Tensor:
        if self._prep is None or logits.dtype != torch.float32 or logits.dim() != 2 or not logits.is_contiguous():
            return super().argmax_rows(logits)
        out = torch.empty(logits.shape[0], dtype=torch.long)
        self._prep.argmax_rows(logits.data_ptr(), logits.shape[0], logits.shape[1], out.data_ptr())
        return out

    def prefill_attention(
        self, q: torch.Tensor, cache: PagedKVCache, layer: int, slots: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Causal attention of a prompt chunk straight from an INT8 paged cache (our C kernel); the reference
        SDPA path where the kernel does not apply (other KV dtypes, no kernel)."""
        n, hq, d = q.shape
        if (
            self._attention is None
            or not isinstance(cache.format, Int8KV)
            or q.dtype != torch.float32
            or q.stride()[1:] != (d, 1)
            or not slots.is_contiguous()
            or slots.dtype != torch.long
        ):
            return super().prefill_attention(q, cache, layer, slots, scale)
        t = cache.tensors
        out = torch.empty(n, hq * d, dtype=torch.float32)
        if not _kernel_ran(
            "paged_attention_prefill_int8",
            self._attention.paged_attention_prefill_int8,
            q.data_ptr(),
            q.stride(0) if n > 1 else hq * d,
            n,
            slots.numel() - n,
            hq,
            t["k"].shape[2],
            d,
            _layer_ptr(t["k"], layer),
            _layer_ptr(t["k_scale"], layer),
            _layer_ptr(t["v"], layer),
            _layer_ptr(t["v_scale"], layer),
            slots.data_ptr(),
            scale,
            out.data_ptr(),
        ):
            return super().prefill_attention(q, cache, layer, slots, scale)
        return out

    def decode_attention(
        self, q: torch.Tensor, cache: PagedKVCache, layer: int, slots: torch.Tensor, lengths: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Single-token attention of ``q`` ``[S, Hq, D]`` straight from an INT8 paged cache (our C kernel); the
        reference SDPA path where the kernel does not apply (other KV dtypes, no kernel)."""
        s, hq, d = q.shape
        if (
            self._attention is None
            or not isinstance(cache.format, Int8KV)
            or q.dtype != torch.float32
            or q.stride()[1:] != (d, 1)
        ):
            return super().decode_attention(q, cache, layer, slots, lengths, scale)
        t = cache.tensors
        hkv = t["k"].shape[2]
        out = torch.empty(s, hq, d, dtype=torch.float32)
        if not _kernel_ran(
            "paged_attention_decode_int8",
            self._attention.paged_attention_decode_int8,
            q.data_ptr(),
            q.stride(0),
            s,
            hq,
            hkv,
            d,
            _layer_ptr(t["k"], layer),
            _layer_ptr(t["k_scale"], layer),
            _layer_ptr(t["v"], layer),
            _layer_ptr(t["v_scale"], layer),
            slots.data_ptr(),
            lengths.data_ptr(),
            slots.shape[1],
            scale,
            out.data_ptr(),
        ):
            return super().decode_attention(q, cache, layer, slots, lengths, scale)
        return out.view(s, hq * d)
