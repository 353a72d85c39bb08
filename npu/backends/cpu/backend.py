"""CPU kernels.

INT8 path choice, measured with ``benchmarks/kernels.py`` (2-core Zen 4, [3072 x 1024] weights cycled
through 96 MiB so that they come from DRAM): ``torch._int_mm`` (oneDNN s8s8->s32 with AVX-512 VNNI,
weight stored ``[N, K]`` and passed as ``.t()``, needs ``torch.backends.mkldnn`` enabled) is bit-exact
in INT32, supports our symmetric per-token activation scales, and is the fastest GEMM at large M
(837 GOP/s at M=2048). fbgemm's ``quantized.linear_dynamic`` is faster at M=1..16 (21 vs 18 GB/s at
M=1) but quantizes activations per tensor, asymmetric uint8 (different math, and a deprecated API);
oneDNN ``qlinear_pointwise`` likewise takes per-tensor uint8 activations. So ``_int_mm`` it is; the
quantize and epilogue around it are the known cost to fuse next.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loaders.quantization import FloatLinear, Int8Linear, LinearWeight, quantize_activations


class Int8GemmLinear:
    """A8W8 linear: per-token activation quantization, INT8 x INT8 -> INT32, fp32 epilogue."""

    def __init__(self, weight: Int8Linear):
        self.qweight = weight.qweight.contiguous()  # [N, K]
        self.scale = weight.scale.float().contiguous()  # [N]
        self.out_features = self.qweight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        qx, sx = quantize_activations(x)
        acc = torch._int_mm(qx, self.qweight.t())
        # int32 * fp32 promotes to fp32 in one pass; then the per-channel scale in place
        return torch.mul(acc, sx[:, None]).mul_(self.scale)


class FloatGemmLinear:
    """Float linear in the weight's own dtype (the reference path and float lm_head)."""

    def __init__(self, weight: FloatLinear, activation_dtype: torch.dtype):
        self.weight = weight.weight.contiguous()
        self.out_features = self.weight.shape[0]
        self.activation_dtype = activation_dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight).to(self.activation_dtype)


class CpuBackend:
    name = "cpu"
    device = torch.device("cpu")
    # fp32 residual stream: cheap on CPU at these widths, and keeps norms/attention exact enough.
    activation_dtype = torch.float32

    def __init__(self, num_threads: int | None = None):
        if num_threads:
            torch.set_num_threads(num_threads)
        if not torch.backends.mkldnn.is_available():
            raise RuntimeError("the cpu backend needs PyTorch built with oneDNN (mkldnn)")
        torch.backends.mkldnn.enabled = True

    def prepare_linear(self, weight: LinearWeight):
        if isinstance(weight, Int8Linear):
            return Int8GemmLinear(weight)
        return FloatGemmLinear(weight, self.activation_dtype)
