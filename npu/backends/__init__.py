"""Kernel backends behind one interface; add an accelerator by adding a module and a registry entry."""

from __future__ import annotations

from npu.backends.base import Backend

BACKEND_NAMES = ("cpu",)


def get_backend(name: str, num_threads: int | None = None, int8_kernel: str = "auto") -> Backend:
    """Instantiate the backend called ``name`` (``int8_kernel`` selects the CPU backend's INT8 GEMM)."""
    if name == "cpu":
        from npu.backends.cpu import CpuBackend

        return CpuBackend(num_threads=num_threads, int8_kernel=int8_kernel)
    raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKEND_NAMES)}")
