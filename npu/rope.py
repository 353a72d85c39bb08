"""Rotary position embedding tables for each implemented RoPE type, computed as transformers computes them.

Every type is a rule for the inverse frequencies plus an attention factor that scales cos and sin (1 except
for YaRN). The model precomputes ``cos`` and ``sin`` for every position once; kernels only read the tables,
so a RoPE type is nothing but an entry of :data:`INV_FREQ_RULES`. Tested against transformers' own rotary
embedding classes, past the original context length included.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from loaders.config import RopeConfig

# YaRN's defaults for the boundaries of its ramp between interpolated and extrapolated frequencies (paper).
YARN_BETA_FAST, YARN_BETA_SLOW = 32.0, 1.0


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _default(theta: float, dim: int, p: dict[str, Any]) -> tuple[torch.Tensor, float]:
    return _base_inv_freq(theta, dim), 1.0


def _linear(theta: float, dim: int, p: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """Position interpolation: every frequency divided by ``factor``."""
    return _base_inv_freq(theta, dim) / p["factor"], 1.0


def _llama3(theta: float, dim: int, p: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """Llama 3.1: long wavelengths divided by ``factor``, short ones kept, a smooth blend between."""
    inv_freq = _base_inv_freq(theta, dim)
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled), 1.0


def _yarn(theta: float, dim: int, p: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """YaRN: interpolated low frequencies, extrapolated high ones, a linear ramp between, and cos/sin scaled
    by ``attention_factor`` (default ``0.1 ln(factor) + 1``)."""
    factor, old_len = p["factor"], p["original_max_position_embeddings"]

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        if p.get("mscale") and p.get("mscale_all_dim"):
            attention_factor = mscale(factor, p["mscale"]) / mscale(factor, p["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast = p.get("beta_fast") or YARN_BETA_FAST
    beta_slow = p.get("beta_slow") or YARN_BETA_SLOW

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(old_len / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no division by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation_weight = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
    return inv_freq, float(attention_factor)


INV_FREQ_RULES: dict[str, Callable[[float, int, dict[str, Any]], tuple[torch.Tensor, float]]] = {
    "default": _default,
    "linear": _linear,
    "llama3": _llama3,
    "yarn": _yarn,
}


def rope_tables(rope: RopeConfig, head_dim: int, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 ``cos`` and ``sin`` ``[max_positions, head_dim]`` (both halves of a head rotate by the same
    angles, transformers' rotate-half layout), each scaled by the type's attention factor."""
    inv_freq, attention_factor = INV_FREQ_RULES[rope.rope_type](rope.theta, head_dim, rope.params)
    freqs = torch.arange(max_positions, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * attention_factor, emb.sin() * attention_factor
