"""CPU backend: oneDNN INT8 GEMM (AVX-512 VNNI) through ``torch._int_mm``."""

from npu.backends.cpu.backend import CpuBackend

__all__ = ["CpuBackend"]
