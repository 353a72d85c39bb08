"""The kernel interface every backend implements."""

from __future__ import annotations

from typing import Protocol

import torch

from loaders.quantization import LinearWeight


class LinearOp(Protocol):
    """A prepared linear layer: ``[M, K]`` activations (backend dtype) -> ``[M, N]`` activations."""

    out_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


class Backend(Protocol):
    """What the model forward asks of a device: where tensors live and how linears run."""

    name: str
    device: torch.device
    # dtype of the residual stream and of attention math on this backend.
    activation_dtype: torch.dtype

    def prepare_linear(self, weight: LinearWeight) -> LinearOp:
        """Move/prepack one linear weight (INT8 or float) and return the op that applies it."""
        ...

    def decode_attention(self, q: torch.Tensor, cache, layer: int, slots: torch.Tensor, lengths: torch.Tensor,
                         scale: float) -> torch.Tensor | None:
        """Optional fused kernel: attention of one query token per sequence (``q`` ``[S, Hq, D]``) over the
        padded slot lists ``slots`` ``[S, L]`` (``lengths`` ``[S]`` int32) of layer ``layer``. Return None
        to let the model use its generic path."""
        ...
