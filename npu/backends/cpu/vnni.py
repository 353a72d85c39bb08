"""The CPU backend's own kernels, by instruction-set family, built with gcc on first use and loaded with ctypes.

``avx512-vnni`` has them all: the A8W8 GEMM with its fused prologue/epilogue (``a8w8_vnni.c``), the BF16 GEMM
(``bf16_gemm.c``, where the CPU has AVX-512 BF16), q/k norm + RoPE and the INT8 KV write (``attention_prep.c``),
attention over the paged INT8 KV cache (``paged_attention.c``) and the one-call decoder stack
(``decoder_stack.c``). ``avx2`` (x86) has them all too (``a8w8_avx2.c``, ``bf16_gemm_avx2.c``,
``attention_prep_avx2.c``, ``paged_attention_avx2.c`` and the same ``decoder_stack.c``; ``avx-vnni`` is those files
with the GEMM's products by 256-bit vpdpbusd), and so have ``neon`` (aarch64 with sdot: the ``*_neon.c`` files) and
``neon-plain`` (the same without sdot), with the same interfaces and the same results (the BF16 GEMM's
within a bound: its sums are fused multiply-adds in the AVX2 and NEON families, vdpbf16ps in the AVX-512 one). A family's library is compiled once per
source version into the a8w8-serve cache directory (a second or two: it includes no PyTorch headers). Where the
CPU lacks a family's instructions, or no C compiler is installed, :func:`load_kernel_library` returns None with
the reason; the backend then takes the next family, or ``torch._int_mm`` and eager PyTorch.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

from loaders.cache import cache_dir
from loaders.quantization import Int8Linear
from npu.backends.base import RMSNorm
from npu.host_memory import HugePageArena

# What a family's library can export, each with the same arguments and results in every family that has it.
GEMM = "the A8W8 GEMM"  # a8w8_pack / a8w8_gemm
ATTENTION_PREP = "q/k norm + RoPE, the INT8 KV write and argmax"  # attention_prep*.c
BF16_GEMM = "the BF16 lm_head"  # bf16_gemm.c
ATTENTION = "paged attention"  # paged_attention.c
DECODER_STACK = "the one-call decoder stack"  # decoder_stack.c
ALL_OPS = frozenset({GEMM, ATTENTION_PREP, BF16_GEMM, ATTENTION, DECODER_STACK})


@dataclass(frozen=True)
class KernelFamily:
    """One build of the CPU kernels for one instruction set: its C sources, compiler flags, the CPU flags
    (``/proc/cpuinfo``) it needs, and which kernels it has (``ops``; every family has the A8W8 GEMM)."""

    name: str
    sources: tuple[str, ...]
    headers: tuple[str, ...]
    cflags: tuple[str, ...]
    cpu_flags: tuple[str, ...]
    ops: frozenset[str]
    bf16_cpu_flags: tuple[str, ...] = ()  # what its BF16 GEMM needs beyond cpu_flags (elsewhere it is not called)

    @property
    def complete(self) -> bool:
        return self.ops == ALL_OPS

    def missing(self) -> list[str]:
        """What this family does not have (those parts run as eager PyTorch), in a fixed order."""
        return [op for op in (ATTENTION, ATTENTION_PREP, BF16_GEMM, DECODER_STACK) if op not in self.ops]


# -ffp-contract=off: no implicit fused multiply-adds, so elementwise math rounds like the eager PyTorch ops
_COMMON_CFLAGS = ("-O3", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")
AVX512_VNNI = KernelFamily(
    "avx512-vnni",
    ("a8w8_vnni.c", "bf16_gemm.c", "attention_prep.c", "paged_attention.c", "decoder_stack.c"),
    (
        "simd_math.h",
        "prologue_common.h",
        "prologue_codes.h",
        "row_prologue.h",
        "cpu_kernels.h",
        "tile_dispatch.h",
        "attention_prep_common.h",
        "paged_attention_common.h",
        "paged_attention_driver.h",
        "bf16_packing.h",
    ),
    ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx512bf16", *_COMMON_CFLAGS),
    ("avx512f", "avx512bw", "avx512vl", "avx512_vnni"),
    ALL_OPS,
    bf16_cpu_flags=("avx512_bf16",),
)
# What the families narrower than AVX-512 (signed activation codes, BF16 by fused multiply-adds, a decode item's
# softmax element by element) include besides their own row prologue.
_NARROW_FAMILY_HEADERS = (
    "bf16_packing.h",
    "bf16_gemm_fma.h",
    "tile_dispatch.h",
    "prologue_common.h",
    "prologue_codes.h",
    "a8w8_signed.h",
    "cpu_kernels.h",
    "attention_prep_common.h",
    "paged_attention_common.h",
    "paged_attention_lanes.h",
    "paged_attention_driver.h",
)
# AVX2 + FMA (Intel since Haswell, AMD since Zen): every kernel; the decoder stack is the AVX-512 family's own C
# file, calling this family's kernels.
AVX2 = KernelFamily(
    "avx2",
    ("a8w8_avx2.c", "bf16_gemm_avx2.c", "attention_prep_avx2.c", "paged_attention_avx2.c", "decoder_stack.c"),
    ("row_prologue_avx2.h", *_NARROW_FAMILY_HEADERS),
    ("-mavx2", "-mfma", *_COMMON_CFLAGS),
    ("avx2", "fma"),
    ALL_OPS,
)
# aarch64 with the dot-product extension (sdot; /proc/cpuinfo "asimddp"): every kernel, the decoder stack again the
# same decoder_stack.c. Bit-exact against the x86 families under qemu-aarch64 in the tests; its speed is not
# measured on ARM hardware yet.
NEON = KernelFamily(
    "neon",
    ("a8w8_neon.c", "bf16_gemm_neon.c", "attention_prep_neon.c", "paged_attention_neon.c", "decoder_stack.c"),
    ("row_prologue_neon.h", *_NARROW_FAMILY_HEADERS),
    ("-march=armv8.2-a+dotprod", *_COMMON_CFLAGS),
    ("asimddp",),
    ALL_OPS,
)
# AVX2 + AVX-VNNI (Intel client CPUs since Alder Lake, and the Atom cores of Sierra Forest): the AVX2 family's
# files, its A8W8 GEMM's products by 256-bit vpdpbusd (VEX) instead of vpmaddubsw + vpmaddwd (a8w8_avx2.c).
AVX_VNNI = KernelFamily(
    "avx-vnni",
    AVX2.sources,
    AVX2.headers,
    ("-mavx2", "-mfma", "-mavxvnni", "-DA8W8_AVX_VNNI", *_COMMON_CFLAGS),
    ("avx2", "fma", "avx_vnni"),
    ALL_OPS,
)
# The avx-vnni family with its vpdpbusd in the AVX-512 VL encoding (the same instruction, defined alike): not a
# family to serve with, but what runs the avx-vnni source on AVX-512 VNNI CPUs (tests, benchmarks/kernels.py).
AVX_VNNI_EVEX_TWIN = KernelFamily(
    "avx-vnni-evex-twin",
    AVX_VNNI.sources,
    AVX_VNNI.headers,
    ("-mavx2", "-mfma", "-mavx512vnni", "-mavx512vl", "-DA8W8_AVX_VNNI", "-DA8W8_AVX_VNNI_EVEX", *_COMMON_CFLAGS),
    ("avx2", "fma", "avx512_vnni", "avx512vl"),
    ALL_OPS,
)
# aarch64 without the dot-product extension (ARMv8.0: Cortex-A72, Graviton 1, Raspberry Pi 4): the NEON family's
# files, its GEMM's products by widening multiplies and pairwise adds instead of sdot (a8w8_neon.c dot4_add).
NEON_PLAIN = KernelFamily(
    "neon-plain",
    NEON.sources,
    NEON.headers,
    ("-march=armv8-a", *_COMMON_CFLAGS),
    ("asimd",),
    ALL_OPS,
)
FAMILIES = {
    f.name: f for f in (AVX512_VNNI, AVX_VNNI, AVX2, NEON, NEON_PLAIN)
}  # fastest first: what ``auto`` tries in order
SCRATCH_ALIGN = 64  # cache line: activation panels start on one
# a8w8_gemm prologue codes (row_prologue.h): the kind in the low byte, log2 of R4's Hadamard block above it
PROLOGUE_NONE, PROLOGUE_RMSNORM, PROLOGUE_SILU_MUL = 0, 1, 2
PROLOGUE_HADAMARD_SHIFT = 8


def hadamard_log2(block: int) -> int:
    """log2 of an online Hadamard block (a power of two), 0 for none (block 0 or 1: the identity)."""
    if block and block & (block - 1):
        raise ValueError(f"an online Hadamard block must be a power of two, not {block}")
    return max(block, 1).bit_length() - 1


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):  # x86 "flags", aarch64 "Features" (its HWCAP names)
            return set(line.split(":", 1)[1].split())
    return set()


@cache
def load_kernel_library(name: str) -> tuple[ctypes.CDLL | None, str]:
    """The library of kernel family ``name`` (:data:`FAMILIES`): (library, "") when usable here, else (None, why
    not). Compiled once per source version into the a8w8-serve cache directory (a second or two)."""
    return build_family_library(FAMILIES[name])


def build_family_library(family: KernelFamily) -> tuple[ctypes.CDLL | None, str]:
    """:func:`load_kernel_library` of a family given whole, not cached in this process (the tests build variants
    of a family this way; the compiled library is cached on disk all the same)."""
    missing = [f for f in family.cpu_flags if f not in _cpu_flags()]
    if missing:
        return None, f"CPU lacks {', '.join(missing)}"
    compiler = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    here = Path(__file__).parent
    sources = [here / f for f in family.sources]
    source = b"".join((here / f).read_bytes() for f in family.sources + family.headers)
    digest = hashlib.sha256(source + " ".join(family.cflags).encode()).hexdigest()[:16]
    lib_path = cache_dir() / "kernels" / f"{family.name}-{digest}.so"
    if not lib_path.is_file():
        if compiler is None:
            return None, "no C compiler (gcc) found"
        lib_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = lib_path.with_suffix(f".tmp{os.getpid()}")
        result = subprocess.run(
            [compiler, *family.cflags, *map(str, sources), "-o", str(tmp), "-lm"], capture_output=True, text=True
        )
        if result.returncode != 0:
            return None, f"compiling the {family.name} CPU kernels failed: {result.stderr.strip()[:500]}"
        os.replace(tmp, lib_path)
    lib = ctypes.CDLL(str(lib_path))
    lib.family = family
    _declare_gemm(lib)
    lib.has_bf16 = False
    if ATTENTION_PREP in family.ops:
        _declare_attention_prep(lib)
    if ATTENTION in family.ops:
        _declare_attention(lib)
    if BF16_GEMM in family.ops:
        _declare_bf16(lib)
    return lib, ""


def load_vnni_library() -> tuple[ctypes.CDLL | None, str]:
    """The AVX-512 VNNI family's library (every kernel), or (None, why not)."""
    return load_kernel_library(AVX512_VNNI.name)


def _declare_gemm(lib: ctypes.CDLL) -> None:
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.a8w8_packed_k.argtypes, lib.a8w8_packed_k.restype = [i], i
    lib.a8w8_packed_n.argtypes, lib.a8w8_packed_n.restype = [i], i
    lib.a8w8_panel_bytes.argtypes, lib.a8w8_panel_bytes.restype = [i, i], ctypes.c_long
    lib.a8w8_pack.argtypes, lib.a8w8_pack.restype = [p, i, i, p, p], None
    lib.a8w8_gemm.argtypes, lib.a8w8_gemm.restype = [p, i, i, i, p, f, p, p, p, p, i, p, p, p, p], None


def _declare_attention_prep(lib: ctypes.CDLL) -> None:
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.qk_norm_rope.argtypes, lib.qk_norm_rope.restype = [p, i, i, i, i, p, f, p, p, p, i], i
    lib.argmax_rows.argtypes, lib.argmax_rows.restype = [p, i, i, p], None
    lib.kv_write_int8.argtypes, lib.kv_write_int8.restype = [p, p, i, i, i, i, i, p, p, p, p, p], i


def _declare_bf16(lib: ctypes.CDLL) -> None:
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    lib.bf16_packed_k.argtypes, lib.bf16_packed_k.restype = [i], i
    lib.bf16_packed_n.argtypes, lib.bf16_packed_n.restype = [i], i
    lib.bf16_panel_bytes.argtypes, lib.bf16_panel_bytes.restype = [i, i], ctypes.c_long
    lib.bf16_pack.argtypes, lib.bf16_pack.restype = [p, i, i, p], None
    lib.bf16_gemm.argtypes, lib.bf16_gemm.restype = [p, i, i, i, p, f, p, i, p, p, p], None
    flags = _cpu_flags()
    lib.has_bf16 = all(flag in flags for flag in lib.family.bf16_cpu_flags)


def _declare_attention(lib: ctypes.CDLL) -> None:
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.paged_attention_decode_int8.argtypes = [p, i, i, i, i, i, p, p, p, p, p, p, i, ctypes.c_float, p]
    lib.paged_attention_decode_int8.restype = i
    lib.paged_attention_prefill_int8.argtypes = [p, i, i, i, i, i, i, p, p, p, p, p, ctypes.c_float, p]
    lib.paged_attention_prefill_int8.restype = i


class Workspace:
    """Scratch bytes reused across kernel calls (the worker runs one step at a time), grown on demand:
    fresh large allocations page-fault on every call otherwise."""

    def __init__(self):
        self._buf = torch.empty(0, dtype=torch.uint8)

    def get(self, nbytes: int) -> torch.Tensor:
        if self._buf.numel() < nbytes:
            self._buf = torch.empty(nbytes, dtype=torch.uint8)
        return self._buf


def _empty(arena: HugePageArena | None, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """Packed weights: from the huge-page arena where one is given (see npu/host_memory.py)."""
    return torch.empty(numel, dtype=dtype) if arena is None else arena.empty(numel, dtype)


def _prologue_args(norm: RMSNorm | None, gated: bool, input_hadamard: int) -> tuple[int, int | None, float]:
    rotation = hadamard_log2(input_hadamard) << PROLOGUE_HADAMARD_SHIFT
    if norm is not None:
        return PROLOGUE_RMSNORM | rotation, norm.weight.data_ptr(), norm.eps
    return (PROLOGUE_SILU_MUL if gated else PROLOGUE_NONE) | rotation, None, 0.0


def _check_out(out: torch.Tensor | None, m: int, n: int) -> torch.Tensor:
    if out is None:
        return torch.empty(m, n, dtype=torch.float32)
    if out.shape != (m, n) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous fp32 [{m}, {n}] tensor")
    return out


def _input(x: torch.Tensor, in_features: int, gated: bool) -> torch.Tensor:
    x = x.float().contiguous()
    expected = in_features * (2 if gated else 1)
    if x.shape[1] != expected:
        raise ValueError(f"linear expects {expected} input features, got {x.shape[1]}")
    return x


class Bf16Linear:
    """BF16-weight linear through ``bf16_gemm.c`` (for the BF16 lm_head): prologue, the input rounded to BF16,
    fp32 accumulation and fp32 output (logits not rounded to BF16: :class:`FloatGemmLinear`'s definition),
    optional residual."""

    def __init__(
        self,
        weight: torch.Tensor,
        lib: ctypes.CDLL,
        workspace: Workspace,
        arena: HugePageArena | None = None,
        input_hadamard: int = 0,
    ):
        self.lib, self.workspace = lib, workspace
        self.input_hadamard = input_hadamard  # R4's block (npu/backends/base.py hadamard_rows); 0: none
        n, k = weight.shape
        self.out_features, self.in_features = n, k
        self.kp, np_ = lib.bf16_packed_k(k), lib.bf16_packed_n(n)
        w = weight.to(torch.bfloat16).contiguous()
        self.packed = _empty(arena, np_ * self.kp, torch.bfloat16)
        lib.bf16_pack(w.data_ptr(), n, k, self.packed.data_ptr())

    def __call__(
        self,
        x: torch.Tensor,
        *,
        norm: RMSNorm | None = None,
        gated: bool = False,
        residual: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = _input(x, self.in_features, gated)
        m = x.shape[0]
        prologue, norm_ptr, eps = _prologue_args(norm, gated, self.input_hadamard)
        if residual is not None:
            residual = residual.float().contiguous()
        out = _check_out(out, m, self.out_features)
        scratch = self.workspace.get(self.lib.bf16_panel_bytes(m, self.in_features))
        self.lib.bf16_gemm(
            x.data_ptr(),
            m,
            self.in_features,
            prologue,
            norm_ptr,
            eps,
            self.packed.data_ptr(),
            self.out_features,
            None if residual is None else residual.data_ptr(),
            out.data_ptr(),
            scratch.data_ptr(),
        )
        return out


class VnniLinear:
    """A8W8 linear through the VNNI kernel: prologue (RMSNorm or SiLU gate), activation quantization, GEMM
    and epilogue (scales, bias, residual) in one call.

    Without a prologue it gives the same numbers as ``Int8GemmLinear`` (same quantization, exact INT32
    sums, same epilogue order).
    """

    def __init__(
        self,
        weight: Int8Linear,
        lib: ctypes.CDLL,
        workspace: Workspace,
        arena: HugePageArena | None = None,
        input_hadamard: int = 0,
    ):
        self.lib, self.workspace = lib, workspace
        self.input_hadamard = input_hadamard  # R4's block (npu/backends/base.py hadamard_rows); 0: none
        n, k = weight.qweight.shape
        self.out_features, self.in_features = n, k
        self.kp, np_ = lib.a8w8_packed_k(k), lib.a8w8_packed_n(n)
        q = weight.qweight.contiguous()
        self.packed = _empty(arena, np_ * self.kp, torch.int8)
        self.wsum = torch.empty(np_, dtype=torch.int32)
        lib.a8w8_pack(q.data_ptr(), n, k, self.packed.data_ptr(), self.wsum.data_ptr())
        self.scale = torch.zeros(np_, dtype=torch.float32)
        self.scale[:n] = weight.scale.float()
        self.bias = None
        if weight.bias is not None:
            self.bias = torch.zeros(np_, dtype=torch.float32)
            self.bias[:n] = weight.bias.float()

    def __call__(
        self,
        x: torch.Tensor,
        *,
        norm: RMSNorm | None = None,
        gated: bool = False,
        residual: torch.Tensor | None = None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x = _input(x, self.in_features, gated)
        m = x.shape[0]
        prologue, norm_ptr, eps = _prologue_args(norm, gated, self.input_hadamard)
        res_ptr = None
        if residual is not None:
            residual = residual.float().contiguous()
            res_ptr = residual.data_ptr()
        out = _check_out(out, m, self.out_features)
        # activation scales first, then the quantized panels from a 64-byte boundary
        panels_at = (4 * m + SCRATCH_ALIGN - 1) // SCRATCH_ALIGN * SCRATCH_ALIGN
        scratch = self.workspace.get(panels_at + self.lib.a8w8_panel_bytes(m, self.in_features))
        self.lib.a8w8_gemm(
            x.data_ptr(),
            m,
            self.in_features,
            prologue,
            norm_ptr,
            eps,
            self.packed.data_ptr(),
            self.wsum.data_ptr(),
            self.scale.data_ptr(),
            None if self.bias is None else self.bias.data_ptr(),
            self.out_features,
            res_ptr,
            out.data_ptr(),
            scratch.data_ptr() + panels_at,
            scratch.data_ptr(),
        )
        return out
