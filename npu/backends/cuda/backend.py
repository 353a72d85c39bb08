"""The CUDA backend: A8W8 linears, q/k norm + RoPE, the INT8 KV write and paged attention as Triton kernels,
and pure decode steps replayed from CUDA graphs.

Everything the model asks of a backend runs on the GPU; the worker moves a step's batch there and the logits
back. The numerical contract is the CPU backend's (``tests/integration/test_cuda_kernels.py`` checks every kernel against
the eager :class:`~npu.backends.base.TorchOps` reference): the residual stream is fp32, INT8 GEMMs are exact in
INT32, and a sequence's tokens do not depend on the rest of its batch.

Under Triton's interpreter (``TRITON_INTERPRET=1``, set before the kernels are imported) the same kernels run
on CPU tensors, without a GPU: that is how the test suite runs them. Speed on a GPU: see the README
(``scripts/gpu_check.sh`` measures it).
"""

from __future__ import annotations

import torch

from loaders.quantization import LinearWeight
from npu.backends.base import DecoderStackInputs, RMSNorm, TorchOps
from npu.backends.cuda import attention
from npu.backends.cuda.decode_graphs import PaddedDecodeStack
from npu.backends.cuda.linear import TritonLinear
from npu.kv_cache import Int8KV, PagedKVCache

# Split-K sizing needs the number of SMs; under the interpreter there is none, and a small number keeps
# the interpreted grids (one Python pass per program) short.
INTERPRETER_SMS = 4


def _layer(cache: PagedKVCache, layer: int) -> dict[str, torch.Tensor]:
    return {name: t[layer] for name, t in cache.tensors.items()}


class CudaBackend(TorchOps):
    """Triton kernels on ``device`` (a CUDA device, or the CPU under Triton's interpreter)."""

    activation_dtype = torch.float32  # the residual stream, as on the CPU: norms and attention stay exact enough

    def __init__(self, device: torch.device, decode_graphs: bool = True):
        """``decode_graphs``: replay pure decode steps from CUDA graphs (on a CUDA device; under the interpreter
        the same bucket-padded path runs eagerly, for the tests)."""
        self.device = device
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            self.num_sms = props.multi_processor_count
            self.name = "cuda-triton"
            self.device_name = f"{device} ({props.name}, {self.num_sms} SMs, {props.total_memory / 2**30:.0f} GiB)"
        else:
            self.num_sms = INTERPRETER_SMS
            self.name = "cuda-triton-interpreter"
            self.device_name = "cpu (Triton interpreter: the CUDA kernels run in Python, for tests only)"
            self.note = "the cuda backend runs under the Triton interpreter (TRITON_INTERPRET=1): very slow"
        self.decode_graphs = decode_graphs

    def prepare_linear(self, weight: LinearWeight, input_hadamard: int = 0) -> TritonLinear:
        return TritonLinear(weight, self.device, self.num_sms, input_hadamard)

    def qk_norm_rope(
        self,
        qk: torch.Tensor,
        norm: RMSNorm | None,
        cos: torch.Tensor,
        sin_signed: torch.Tensor,
        positions: torch.Tensor,
        head_hadamard: bool = False,
    ) -> torch.Tensor:
        if qk.dtype != torch.float32 or qk.stride(2) != 1 or not (cos.is_contiguous() and sin_signed.is_contiguous()):
            return super().qk_norm_rope(qk, norm, cos, sin_signed, positions, head_hadamard)
        weight = None if norm is None else norm.weight.contiguous()
        eps = 0.0 if norm is None else norm.eps
        return attention.qk_norm_rope(qk, weight, eps, cos, sin_signed, positions, head_hadamard)

    def write_kv(self, cache: PagedKVCache, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        heads_contiguous = (k.shape[2], 1)
        if isinstance(cache.format, Int8KV) and k.stride()[1:] == heads_contiguous == v.stride()[1:]:
            attention.write_kv_int8(_layer(cache, layer), slots, k, v)
        else:
            cache.write(layer, slots, k, v)

    def prefill_attention(
        self, q: torch.Tensor, cache: PagedKVCache, layer: int, slots: torch.Tensor, scale: float
    ) -> torch.Tensor:
        if not isinstance(cache.format, Int8KV) or q.stride(2) != 1:
            return super().prefill_attention(q, cache, layer, slots, scale)  # other KV dtypes: the reference SDPA
        return attention.prefill_attention(q, _layer(cache, layer), slots.contiguous(), scale)

    def decode_attention(
        self, q: torch.Tensor, cache: PagedKVCache, layer: int, slots: torch.Tensor, lengths: torch.Tensor, scale: float
    ) -> torch.Tensor:
        if not isinstance(cache.format, Int8KV) or q.stride(2) != 1:
            return super().decode_attention(q, cache, layer, slots, lengths, scale)
        return attention.decode_attention(q, _layer(cache, layer), slots, lengths, scale).view(q.shape[0], -1)

    def prepare_decoder_stack(self, stack: DecoderStackInputs) -> PaddedDecodeStack | None:
        """Pure decode steps through CUDA graphs of the model's own layer loop."""
        if not self.decode_graphs or stack.layer_loop is None:
            return None
        hidden = stack.layers[0].qkv.in_features
        return PaddedDecodeStack(
            stack.layer_loop, hidden, stack.cos.shape[0], self.device, capture=self.device.type == "cuda"
        )
