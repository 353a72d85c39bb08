"""The CUDA backend (Triton kernels); needs the ``triton`` package (``pip install 'a8w8-serve[cuda]'``)."""

from npu.backends.cuda.backend import CudaBackend

__all__ = ["CudaBackend"]
