"""GPTQ rounding of INT8 per-channel weights (Frantar et al. 2022; llm-compressor's ``GPTQModifier``).

The scale of each output channel stays absmax / 127 (the format does not change); what changes is which
integer each weight rounds to: the columns are quantized in turn, and each one's rounding error is spread over
the columns not yet quantized, weighted by the inverse of the layer's input Hessian ``H = X^T X`` (from a
calibration pass of the float model), so that the layer's *output* on such inputs moves least. In the rotated
SmolLM2 the INT8-rounded weights were the larger share of the A8W8 loss (README, "Quality"); this is the
field's answer to that, at no run-time cost.

Hessians are taken from one pass of the float model over the calibration text (inputs of every layer from
float activations, not layer by layer from the quantized model): simpler, and the A8W8 model's activations
differ little from the float ones.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from loaders.quantization import INT8_MAX, INT8_MIN, quantize_weight
from npu.backends.base import UnfusedLinear
from npu.runner import ModelRunner
from offline.calibration import calibration_pass

# The fused ops of a layer and the checkpoint modules each one's input feeds.
FUSED_INPUTS = {
    "qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o": ("self_attn.o_proj",),
    "gate_up": ("mlp.gate_proj", "mlp.up_proj"),
    "down": ("mlp.down_proj",),
}
DAMPING = 0.01  # of the mean diagonal, added to H's diagonal (GPTQ's percdamp)
COLUMN_BLOCK = 128  # columns updated lazily together (GPTQ's block size; the result does not depend on it)


class _HessianRecorder:
    """Hooks a float linear op's GEMM and accumulates ``X^T X`` of its inputs (after any norm, gate and
    online rotation: what the weight multiplies)."""

    def __init__(self, op: UnfusedLinear):
        self.gemm = op.gemm
        self.xtx: torch.Tensor | None = None
        self.rows = 0
        op.gemm = self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        xd = x.double()
        self.xtx = xd.t() @ xd if self.xtx is None else self.xtx + xd.t() @ xd
        self.rows += x.shape[0]
        return self.gemm(x)


def calibration_hessians(model_dir: Path) -> dict[str, torch.Tensor]:
    """``H`` (float64, ``[in, in]``, averaged over tokens) of every decoder linear's input, by module name
    (``model.layers.N.self_attn.q_proj``, ...), from the float model over the calibration text."""
    recorders: list[dict[str, _HessianRecorder]] = []

    def hook(runner: ModelRunner) -> None:
        for layer in runner.model.layers:
            recorders.append({name: _HessianRecorder(getattr(layer, name)) for name in FUSED_INPUTS})

    calibration_pass(model_dir, hook, "GPTQ calibration")
    out = {}
    for i, rec in enumerate(recorders):
        for fused, modules in FUSED_INPUTS.items():
            h = rec[fused].xtx / max(rec[fused].rows, 1)
            for m in modules:
                out[f"model.layers.{i}.{m}"] = h
    return out


def gptq_quantize(
    weight: torch.Tensor, hessian: torch.Tensor, scale_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(``[N, K]`` int8, ``[N]`` scale in ``scale_dtype``): ``weight`` rounded to INT8 per output channel with
    GPTQ's error feedback under ``hessian`` ``[K, K]``; the scales are :func:`quantize_weight`'s."""
    _, stored_scale = quantize_weight(weight, scale_dtype)
    scale = stored_scale.double()
    w = weight.double().clone()
    k = w.shape[1]
    h = hessian.double().clone()
    dead = h.diagonal() == 0  # inputs that never fired: their columns cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(DAMPING * h.diagonal().mean())
    # the upper Cholesky factor of H^-1: row i holds the weights of column i's error over the later columns
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    for i1 in range(0, k, COLUMN_BLOCK):
        i2 = min(i1 + COLUMN_BLOCK, k)
        w1, h1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        err = torch.zeros_like(w1)
        for i in range(i2 - i1):
            col = w1[:, i]
            qc = torch.clamp(torch.round(col / scale), INT8_MIN, INT8_MAX)
            q[:, i1 + i] = qc
            e = (col - qc * scale) / h1[i, i]
            w1[:, i:] -= e[:, None] * h1[i, i:][None, :]
            err[:, i] = e
        w[:, i2:] -= err @ hinv[i1:i2, i2:]
    return q.to(torch.int8), stored_scale


def gptq_rounding(model_dir: Path) -> Callable[[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The ``rounding`` argument of :func:`loaders.writer.quantize_checkpoint` for the float checkpoint
    ``model_dir``: GPTQ under Hessians from its calibration pass (scales stored in the weight's dtype)."""
    hessians = calibration_hessians(Path(model_dir))

    def rounding(module: str, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return gptq_quantize(weight, hessians[module], weight.dtype)

    return rounding
