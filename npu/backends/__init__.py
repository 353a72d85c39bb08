"""Kernel backends behind one interface; add an accelerator by adding a module and a registry entry."""

from __future__ import annotations

import os

from npu.backends.base import Backend
from npu.config import Device

# What --device takes: auto picks cuda where PyTorch sees a CUDA device and Triton is installed, else cpu.
DEVICE_NAMES = tuple(d.value for d in Device)


def _triton_missing() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"the cuda backend needs Triton ({e}); install it with pip install 'a8w8-serve[cuda]'"
    return None


def triton_interpreter_on() -> bool:
    """Triton's own documented switch: kernels run in its Python interpreter, on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` or ``cpu``; the others as given."""
    if device not in DEVICE_NAMES:
        raise ValueError(f"unknown device {device!r}; choose one of {', '.join(DEVICE_NAMES)}")
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() and _triton_missing() is None else "cpu"


def get_backend(device: str, num_threads: int | None = None, cpu_kernels: str = "auto") -> Backend:
    """The backend for ``device`` (``cpu_kernels`` selects the CPU backend's kernel family). ``cuda`` without a
    CUDA device runs the Triton kernels in Triton's interpreter when ``TRITON_INTERPRET=1`` (tests), else fails."""
    import torch

    device = resolve_device(str(device))  # (a Device or its value)
    if device == "cpu":
        from npu.backends.cpu import CpuBackend

        return CpuBackend(num_threads=num_threads, cpu_kernels=str(cpu_kernels))
    missing = _triton_missing()
    if missing:
        raise RuntimeError(missing)
    from npu.backends.cuda import CudaBackend

    if torch.cuda.is_available():
        return CudaBackend(torch.device("cuda", torch.cuda.current_device()))
    if triton_interpreter_on():
        return CudaBackend(torch.device("cpu"), decode_graphs=False)
    raise RuntimeError(
        "--device cuda: PyTorch sees no CUDA device (torch.cuda.is_available() is False; "
        f"torch {torch.__version__}); use --device cpu"
    )
