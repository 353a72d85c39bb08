"""The decoder layers of a pure decode step in one C call (``decoder_stack.c``).

The model's layer loop calls seven kernels per layer through Python; on a 28-layer model that Python is
about 3 ms of a 25-35 ms batch-1 step (worker_bench's "other"). :class:`DecoderStack` hands the same kernel
sequence to C once per step, with pointers gathered when the model is loaded, and the result is bit-identical
to the loop (``tests/integration/test_worker.py`` compares them). It applies where every linear is a :class:`VnniLinear`,
the KV cache is INT8 and the residual stream fp32; elsewhere the model keeps its loop.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import torch

from npu.backends.base import DecoderStackInputs, RMSNorm
from npu.backends.cpu.vnni import SCRATCH_ALIGN, VnniLinear, Workspace, hadamard_log2
from npu.kv_cache import Int8KV, PagedKVCache

_p, _i, _f, _l = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_long


class _PackedLinear(ctypes.Structure):
    _fields_ = [
        ("wp", _p),
        ("wsum", _p),
        ("sw", _p),
        ("bias", _p),
        ("n", _i),
        ("k", _i),
        ("input_hadamard_log2", _i),
    ]


class _StackLayer(ctypes.Structure):
    _fields_ = [
        ("qkv", _PackedLinear),
        ("o", _PackedLinear),
        ("gate_up", _PackedLinear),
        ("down", _PackedLinear),
        ("input_norm", _p),
        ("post_norm", _p),
        ("qk_norm", _p),
        ("input_eps", _f),
        ("post_eps", _f),
        ("qk_eps", _f),
        ("qk_hadamard_log2", _i),
    ]


class _DecoderStack(ctypes.Structure):
    _fields_ = [
        ("num_layers", _i),
        ("num_heads", _i),
        ("num_kv_heads", _i),
        ("head_dim", _i),
        ("layers", ctypes.POINTER(_StackLayer)),
        ("cos", _p),
        ("sin_signed", _p),
        ("scale", _f),
    ]


class _KvCache(ctypes.Structure):
    _fields_ = [
        ("k", _p),
        ("v", _p),
        ("k_scale", _p),
        ("v_scale", _p),
        ("layer_stride", _l),
        ("scale_layer_stride", _l),
    ]


def _declare(lib: ctypes.CDLL) -> None:
    """Argument types of the library's stack entry points."""
    lib.decoder_stack_check.argtypes, lib.decoder_stack_check.restype = [ctypes.POINTER(_DecoderStack)], _i
    lib.decoder_stack_decode.argtypes = [
        ctypes.POINTER(_DecoderStack),
        ctypes.POINTER(_KvCache),
        _p,
        _i,
        _p,
        _p,
        _p,
        _p,
        _i,
        _p,
        _p,
        _p,
        _p,
        _p,
    ]
    lib.decoder_stack_decode.restype = None


def _packed(op: VnniLinear) -> _PackedLinear:
    return _PackedLinear(
        op.packed.data_ptr(),
        op.wsum.data_ptr(),
        op.scale.data_ptr(),
        None if op.bias is None else op.bias.data_ptr(),
        op.out_features,
        op.in_features,
        hadamard_log2(op.input_hadamard),
    )


class DecoderStack:
    """Pointers to every layer's prepared weights, and the call that runs all layers of a decode step."""

    def __init__(
        self,
        lib: ctypes.CDLL,
        workspace: Workspace,
        inputs: DecoderStackInputs,
    ):
        _declare(lib)
        layers, head_dim, cos, sin_signed = inputs.layers, inputs.head_dim, inputs.cos, inputs.sin_signed
        self.lib, self.workspace = lib, workspace
        self.num_heads, self.head_dim = inputs.num_heads, head_dim
        self._keep = [cos, sin_signed]  # the C side holds raw pointers into these (the layers keep the rest)
        rows = []
        for layer in layers:
            qk_norm: RMSNorm | None = layer.qk_norm
            rows.append(
                _StackLayer(
                    _packed(layer.qkv),
                    _packed(layer.o),
                    _packed(layer.gate_up),
                    _packed(layer.down),
                    layer.input_norm.weight.data_ptr(),
                    layer.post_norm.weight.data_ptr(),
                    None if qk_norm is None else qk_norm.weight.data_ptr(),
                    layer.input_norm.eps,
                    layer.post_norm.eps,
                    0.0 if qk_norm is None else qk_norm.eps,
                    hadamard_log2(head_dim if layer.qk_hadamard else 0),
                )
            )
        self._layers = (_StackLayer * len(rows))(*rows)
        self._stack = _DecoderStack(
            len(rows),
            inputs.num_heads,
            inputs.num_kv_heads,
            head_dim,
            self._layers,
            cos.data_ptr(),
            sin_signed.data_ptr(),
            inputs.scale,
        )
        self.qkv_features = layers[0].qkv.out_features
        self.gate_up_features = layers[0].gate_up.out_features
        self.widest_input = max(max(op.in_features for op in (ly.qkv, ly.o, ly.gate_up, ly.down)) for ly in layers)
        self.supported = lib.decoder_stack_check(ctypes.byref(self._stack)) == 0

    @staticmethod
    def applies_to(layers: Sequence[Any], cos: torch.Tensor, sin_signed: torch.Tensor) -> bool:
        """True when every linear of every layer is a VNNI linear and the norm weights and RoPE tables are
        contiguous fp32 (what the kernels read)."""
        tensors = [cos, sin_signed] + [
            norm.weight for ly in layers for norm in (ly.input_norm, ly.post_norm, ly.qk_norm) if norm is not None
        ]
        return all(isinstance(op, VnniLinear) for ly in layers for op in (ly.qkv, ly.o, ly.gate_up, ly.down)) and all(
            t.dtype == torch.float32 and t.is_contiguous() for t in tensors
        )

    def decode(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        context_slots: torch.Tensor,
        lengths: torch.Tensor,
        cache: PagedKVCache,
    ) -> bool:
        """Run every layer on ``x`` ``[S, hidden]`` (one new token per sequence, updated in place); False when
        this call does not apply (then nothing was touched)."""
        t = cache.tensors
        if not (
            self.supported
            and isinstance(cache.format, Int8KV)
            and t["k"].stride() == t["v"].stride()
            and t["k_scale"].stride() == t["v_scale"].stride()
            and x.dtype == torch.float32
            and x.is_contiguous()
            and positions.dtype == torch.long
            and positions.is_contiguous()
            and slot_mapping.dtype == torch.long
            and slot_mapping.is_contiguous()
            and context_slots.dtype == torch.long
            and context_slots.is_contiguous()
            and lengths.dtype == torch.int32
            and lengths.is_contiguous()
        ):
            return False
        s = x.shape[0]
        kv = _KvCache(
            t["k"].data_ptr(),
            t["v"].data_ptr(),
            t["k_scale"].data_ptr(),
            t["v_scale"].data_ptr(),
            t["k"].stride(0),
            t["k_scale"].stride(0),
        )
        qkv = torch.empty(s, self.qkv_features, dtype=torch.float32)
        attn = torch.empty(s, self.num_heads * self.head_dim, dtype=torch.float32)
        gate_up = torch.empty(s, self.gate_up_features, dtype=torch.float32)
        # per-token activation scales, then the quantized panels from a cache line boundary
        panels_at = -(-4 * s // SCRATCH_ALIGN) * SCRATCH_ALIGN
        scratch = self.workspace.get(panels_at + self.lib.a8w8_panel_bytes(s, self.widest_input))
        self.lib.decoder_stack_decode(
            ctypes.byref(self._stack),
            ctypes.byref(kv),
            x.data_ptr(),
            s,
            positions.data_ptr(),
            slot_mapping.data_ptr(),
            context_slots.data_ptr(),
            lengths.data_ptr(),
            context_slots.shape[1],
            qkv.data_ptr(),
            attn.data_ptr(),
            gate_up.data_ptr(),
            scratch.data_ptr() + panels_at,
            scratch.data_ptr(),
        )
        return True
