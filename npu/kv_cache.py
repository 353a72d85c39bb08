"""Paged KV cache: one flat slot array per layer, addressed through block tables.

The KV dtype is an object that the attention code asks (``write``/``read``), so INT8, BF16 and FP32
share one code path. INT8 stores one fp32 scale per (token, kv head), quantized symmetric per token per
head (K after k_norm and RoPE). ``read`` gathers one sequence's slots through its block table and
dequantizes them in the same pass (the int8 -> float conversion the attention matmuls need anyway);
the cache itself is never copied or dequantized as a whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loaders.quantization import quantize_symmetric
from npu.config import KVCacheDtype
from npu.host_memory import zeros_huge_pages


@dataclass
class KVRead:
    """K/V of a set of slots, dequantized, as the attention computation consumes them."""

    k: torch.Tensor  # [T, Hkv, D] in the activation dtype
    v: torch.Tensor


HOST = torch.device("cpu")


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeroed cache storage: on huge pages in host memory (npu/host_memory.py), plainly on a device."""
    if device.type == "cpu":
        return zeros_huge_pages(shape, dtype)
    return torch.zeros(shape, dtype=dtype, device=device)


class Int8KV:
    """INT8 K/V with one fp32 scale per (token, kv head)."""

    @staticmethod
    def bytes_per_slot(num_kv_heads: int, head_dim: int) -> int:
        return 2 * num_kv_heads * (head_dim + 4)  # K and V: int8 values + one fp32 scale per head

    @staticmethod
    def allocate(layers: int, slots: int, heads: int, head_dim: int, device: torch.device) -> dict[str, torch.Tensor]:
        return {
            "k": _zeros((layers, slots, heads, head_dim), torch.int8, device),
            "v": _zeros((layers, slots, heads, head_dim), torch.int8, device),
            "k_scale": _zeros((layers, slots, heads), torch.float32, device),
            "v_scale": _zeros((layers, slots, heads), torch.float32, device),
        }

    def write(
        self, cache: dict[str, torch.Tensor], layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        # per (token, head): the same symmetric convention as activations, over head_dim
        qk, sk = quantize_symmetric(k.float())
        qv, sv = quantize_symmetric(v.float())
        sk, sv = sk.squeeze(-1), sv.squeeze(-1)
        cache["k"][layer].index_copy_(0, slots, qk)
        cache["v"][layer].index_copy_(0, slots, qv)
        cache["k_scale"][layer].index_copy_(0, slots, sk)
        cache["v_scale"][layer].index_copy_(0, slots, sv)

    def read(self, cache: dict[str, torch.Tensor], layer: int, slots: torch.Tensor, dtype: torch.dtype) -> KVRead:
        def dequant(values: str, scales: str) -> torch.Tensor:
            q = cache[values][layer].index_select(0, slots)
            s = cache[scales][layer].index_select(0, slots)
            # convert, then scale in place: 3.6x faster here than an int8 * fp32 promoting multiply
            return q.to(dtype).mul_(s[..., None])

        return KVRead(k=dequant("k", "k_scale"), v=dequant("v", "v_scale"))


class FloatKV:
    """K/V stored in a float dtype (bf16 for serving, fp32 as an exact reference)."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def bytes_per_slot(self, num_kv_heads: int, head_dim: int) -> int:
        return 2 * num_kv_heads * head_dim * self.dtype.itemsize

    def allocate(
        self, layers: int, slots: int, heads: int, head_dim: int, device: torch.device
    ) -> dict[str, torch.Tensor]:
        return {
            "k": _zeros((layers, slots, heads, head_dim), self.dtype, device),
            "v": _zeros((layers, slots, heads, head_dim), self.dtype, device),
        }

    def write(
        self, cache: dict[str, torch.Tensor], layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        cache["k"][layer].index_copy_(0, slots, k.to(self.dtype))
        cache["v"][layer].index_copy_(0, slots, v.to(self.dtype))

    def read(self, cache: dict[str, torch.Tensor], layer: int, slots: torch.Tensor, dtype: torch.dtype) -> KVRead:
        return KVRead(
            k=cache["k"][layer].index_select(0, slots).to(dtype),
            v=cache["v"][layer].index_select(0, slots).to(dtype),
        )


def kv_format(kv_dtype: KVCacheDtype | str) -> Int8KV | FloatKV:
    """The storage object for a KV dtype name."""
    kv_dtype = KVCacheDtype(kv_dtype)
    if kv_dtype is KVCacheDtype.INT8:
        return Int8KV()
    return FloatKV(torch.bfloat16 if kv_dtype is KVCacheDtype.BF16 else torch.float32)


class PagedKVCache:
    """All layers' K/V for ``num_blocks`` blocks of ``block_size`` token slots."""

    def __init__(
        self,
        kv_dtype: KVCacheDtype | str,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_blocks: int,
        block_size: int,
        device: torch.device = HOST,
    ):
        self.format = kv_format(kv_dtype)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.device = device
        self.tensors = self.format.allocate(num_layers, num_blocks * block_size, num_kv_heads, head_dim, device)

    @staticmethod
    def blocks_for_budget(
        kv_dtype: KVCacheDtype | str,
        budget_bytes: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
    ) -> int:
        """How many blocks fit in ``budget_bytes``."""
        per_block = kv_format(kv_dtype).bytes_per_slot(num_kv_heads, head_dim) * num_layers * block_size
        return budget_bytes // per_block

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.format.write(self.tensors, layer, slots, k, v)

    def read(self, layer: int, slots: torch.Tensor, dtype: torch.dtype) -> KVRead:
        return self.format.read(self.tensors, layer, slots, dtype)

    def slots_of(self, block_table: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Slot indices of a sequence's first ``num_tokens`` tokens."""
        offsets = torch.arange(self.block_size)
        return (block_table[:, None] * self.block_size + offsets).reshape(-1)[:num_tokens]
