"""Kernel backends behind one interface; add an accelerator by adding a module and a registry entry."""

from __future__ import annotations

from npu.backends.base import Backend

BACKEND_NAMES = ("cpu",)


def get_backend(name: str, num_threads: int | None = None) -> Backend:
    """Instantiate the backend called ``name``."""
    if name == "cpu":
        from npu.backends.cpu import CpuBackend

        return CpuBackend(num_threads=num_threads)
    raise ValueError(f"unknown backend {name!r}; available: {', '.join(BACKEND_NAMES)}")
