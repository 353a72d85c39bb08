"""The CPU backend's own AVX-512 kernels, built with gcc on first use and loaded with ctypes:
the A8W8 GEMM (``a8w8_vnni.c``) and decode attention over the paged INT8 KV cache (``paged_attention.c``).

The library is compiled once per source version into the a8w8-serve cache directory (a second or two:
it includes no PyTorch headers). Where the CPU lacks AVX-512 VNNI, or no C compiler is installed,
:func:`load_vnni_library` returns None with the reason, and the backend keeps ``torch._int_mm``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import torch

from loaders.cache import cache_dir
from loaders.quantization import Int8Linear

SOURCES = [Path(__file__).with_name(name) for name in ("a8w8_vnni.c", "paged_attention.c")]
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")
CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-fopenmp", "-shared", "-fPIC"]


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@lru_cache(maxsize=1)
def load_vnni_library() -> tuple[ctypes.CDLL | None, str]:
    """(library, "") when usable, else (None, why not)."""
    missing = [f for f in REQUIRED_CPU_FLAGS if f not in _cpu_flags()]
    if missing:
        return None, f"CPU lacks {', '.join(missing)}"
    compiler = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    source = b"".join(src.read_bytes() for src in SOURCES)
    digest = hashlib.sha256(source + " ".join(CFLAGS).encode()).hexdigest()[:16]
    lib_path = cache_dir() / "kernels" / f"a8w8_vnni-{digest}.so"
    if not lib_path.is_file():
        if compiler is None:
            return None, "no C compiler (gcc) found"
        lib_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = lib_path.with_suffix(f".tmp{os.getpid()}")
        result = subprocess.run([compiler, *CFLAGS, *map(str, SOURCES), "-o", str(tmp), "-lm"],
                                capture_output=True, text=True)
        if result.returncode != 0:
            return None, f"compiling the CPU kernels failed: {result.stderr.strip()[:500]}"
        os.replace(tmp, lib_path)
    lib = ctypes.CDLL(str(lib_path))
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.a8w8_packed_k.argtypes, lib.a8w8_packed_k.restype = [i], i
    lib.a8w8_packed_n.argtypes, lib.a8w8_packed_n.restype = [i], i
    lib.a8w8_pack.argtypes, lib.a8w8_pack.restype = [p, i, i, p, p], None
    lib.a8w8_gemm.argtypes, lib.a8w8_gemm.restype = [p, i, i, p, p, p, i, p, p, p], None
    lib.paged_attention_decode_int8.argtypes = [p, i, i, i, i, p, p, p, p, p, p, i, ctypes.c_float, p]
    lib.paged_attention_decode_int8.restype = i
    return lib, ""


class VnniLinear:
    """A8W8 linear through the VNNI kernel: activation quantization, GEMM and epilogue in one call.

    Gives the same numbers as ``Int8GemmLinear`` (same quantization, exact INT32 sums, same epilogue order).
    """

    def __init__(self, weight: Int8Linear, lib: ctypes.CDLL):
        self.lib = lib
        n, k = weight.qweight.shape
        self.out_features, self.in_features = n, k
        self.kp, np_ = lib.a8w8_packed_k(k), lib.a8w8_packed_n(n)
        q = weight.qweight.contiguous()
        self.packed = torch.empty(np_ * self.kp, dtype=torch.int8)
        self.wsum = torch.empty(np_, dtype=torch.int32)
        lib.a8w8_pack(q.data_ptr(), n, k, self.packed.data_ptr(), self.wsum.data_ptr())
        self.scale = torch.zeros(np_, dtype=torch.float32)
        self.scale[:n] = weight.scale.float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().contiguous()
        m = x.shape[0]
        out = torch.empty(m, self.out_features, dtype=torch.float32)
        xq = torch.empty(m, self.kp, dtype=torch.uint8)
        sx = torch.empty(m, dtype=torch.float32)
        self.lib.a8w8_gemm(x.data_ptr(), m, self.in_features, self.packed.data_ptr(), self.wsum.data_ptr(),
                           self.scale.data_ptr(), self.out_features, out.data_ptr(), xq.data_ptr(), sx.data_ptr())
        return out
