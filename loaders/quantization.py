"""INT8 weight representation, the rounding convention, and the compressed-tensors scheme.

Rounding convention (one convention, used for quantize-on-load and the ``quantize`` command alike;
it is llm-compressor's, so our checkpoints and theirs hold the same numbers):

* weights, symmetric per output channel:
  ``scale = absmax(row) / 127.5`` computed in fp32, clamped to at least fp32 eps, then rounded to the
  checkpoint's float dtype (that is what a compressed-tensors file stores);
  ``q = clamp(round_half_even(w / scale), -128, 127)``; dequantized weight = ``q * scale``.
* activations, symmetric per token at run time (as vLLM's ``scaled_int8_quant``):
  ``s = absmax(x_row) / 127``; ``q = clamp(round_half_even(x / s), -127, 127)``;
  an all-zero row gives ``s = 0`` and ``q = 0``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from loaders.config import ConfigError
from loaders.options import FLOAT_DTYPE_NAMES

# 127.5 spreads the symmetric range over all 256 int8 codes (llm-compressor's choice).
WEIGHT_QUANT_DIVISOR = 127.5
# Largest magnitude a dynamically quantized activation takes (symmetric, -127..127).
ACTIVATION_QMAX = 127.0
INT8_MIN, INT8_MAX = -128, 127
# Divisor floor for all-zero rows (their scale is 0 and their codes 0); far below any real scale.
MIN_DIVISOR = 1e-30
FLOAT_DTYPES = {name: getattr(torch, name) for name in FLOAT_DTYPE_NAMES}


def _concat_biases(parts: list[FloatLinear | Int8Linear]) -> torch.Tensor | None:
    """The output-concatenated bias of ``parts`` (zeros for a part without one), or None if none has one."""
    if all(p.bias is None for p in parts):
        return None
    return torch.cat([p.bias.float() if p.bias is not None else torch.zeros(p.out_features) for p in parts])


@dataclass
class FloatLinear:
    """A linear layer's weight kept in floating point, ``[out, in]``, and its bias ``[out]`` if it has one."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    @staticmethod
    def concat(parts: list[FloatLinear]) -> FloatLinear:
        bias = _concat_biases(parts)
        weight = torch.cat([p.weight for p in parts], dim=0)
        return FloatLinear(weight, None if bias is None else bias.to(weight.dtype))

    def dequantized(self) -> torch.Tensor:
        return self.weight.float()


@dataclass
class Int8Linear:
    """A linear layer's INT8 weight ``[out, in]`` with one fp32 scale per output channel ``[out]``, and its
    float bias ``[out]`` if it has one (added after the scales: ``y = (q_x . q_w) s_x s_w + b``)."""

    qweight: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @staticmethod
    def concat(parts: list[Int8Linear]) -> Int8Linear:
        # Per-channel scales make output-dimension concatenation exact.
        return Int8Linear(
            torch.cat([p.qweight for p in parts], dim=0),
            torch.cat([p.scale for p in parts], dim=0),
            _concat_biases(parts),
        )

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scale[:, None]


LinearWeight = FloatLinear | Int8Linear


def quantize_weight(weight: torch.Tensor, scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``[out, in]`` per output channel; returns (int8 weight, scale ``[out]`` in ``scale_dtype``).

    ``scale_dtype`` defaults to the weight's dtype, as a compressed-tensors checkpoint stores it.
    """
    scale_dtype = scale_dtype or weight.dtype
    w32 = weight.float()
    absmax = w32.abs().amax(dim=1)
    scale = (absmax / WEIGHT_QUANT_DIVISOR).clamp(min=torch.finfo(torch.float32).eps)
    scale = scale.to(scale_dtype)
    q = torch.round(w32 / scale.float()[:, None]).clamp(INT8_MIN, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Int8Linear:
    """Quantize-on-load: the same numbers as loading a checkpoint written by ``quantize`` (the bias stays float)."""
    q, scale = quantize_weight(weight)
    return Int8Linear(q, scale.float(), None if bias is None else bias.float())


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric INT8 quantization of ``[M, K]``; returns (int8 ``[M, K]``, fp32 scale ``[M]``).

    Few, in-place ops: this runs before every GEMM (abs().amax() measured 10x faster than
    linalg.vector_norm(inf) or aminmax here). A zero row divides 0 by a tiny scale: q = 0.
    """
    q, scale = quantize_symmetric(x.float(), dim=-1)
    return q, scale.squeeze(-1)


def quantize_symmetric(x: torch.Tensor, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT8 over ``dim`` (scale = absmax / 127, kept with a size-1 ``dim``), round half to even."""
    scale = x.abs().amax(dim, keepdim=True).div_(ACTIVATION_QMAX)
    q = (x / scale.clamp_min(MIN_DIVISOR)).round_().clamp_(-ACTIVATION_QMAX, ACTIVATION_QMAX).to(torch.int8)
    return q, scale


# ----------------------------------------------------------------------------------------------
# compressed-tensors
# ----------------------------------------------------------------------------------------------
SUPPORTED_CT_FORMATS = ("int-quantized", "naive-quantized")
CT_QUANT_CONFIG_KEYS = ("quantization_config", "compression_config")


def _refuse(what: str, value: Any, group: str) -> ConfigError:
    return ConfigError(
        f"compressed-tensors config_groups.{group}: unsupported {what}={value!r}; a8w8-serve reads only "
        "INT8 symmetric per-channel weights with INT8 dynamic per-token activations (W8A8)"
    )


@dataclass(frozen=True)
class CompressedTensorsW8A8:
    """The parsed ``quantization_config`` of a compressed-tensors W8A8 checkpoint."""

    targets: tuple[str, ...]
    ignore: tuple[str, ...]
    format: str

    @staticmethod
    def _matches(pattern: str, name: str) -> bool:
        if pattern.startswith("re:"):
            return re.match(pattern[3:], name) is not None
        return pattern == name

    def is_quantized(self, module_name: str, class_name: str = "Linear") -> bool:
        """Whether the linear module ``module_name`` holds INT8 weights in this checkpoint."""
        if any(self._matches(p, module_name) for p in self.ignore):
            return False
        return any(t == class_name or self._matches(t, module_name) for t in self.targets)

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> CompressedTensorsW8A8 | None:
        """Parse the config block if present; None for an unquantized checkpoint."""
        qc = next((cfg[k] for k in CT_QUANT_CONFIG_KEYS if cfg.get(k)), None)
        if qc is None:
            return None
        if not qc.get("config_groups") and qc.get("transform_config"):
            return None  # rotated but float (offline/rotate.py): loaders/transforms.py reads the transforms
        method = qc.get("quant_method")
        if method != "compressed-tensors":
            raise ConfigError(
                f"quantization_config.quant_method={method!r} is not supported (only compressed-tensors W8A8)"
            )
        fmt = qc.get("format")
        if fmt not in SUPPORTED_CT_FORMATS:
            raise ConfigError(
                f"quantization_config.format={fmt!r} is not supported; expected one of {SUPPORTED_CT_FORMATS}"
            )
        if qc.get("kv_cache_scheme"):
            raise ConfigError("quantization_config.kv_cache_scheme is set; static KV-cache scales are not supported")
        groups = qc.get("config_groups") or {}
        if not groups:
            raise ConfigError("quantization_config.config_groups is empty")
        targets: list[str] = []
        for name, group in groups.items():
            w = group.get("weights") or {}
            a = group.get("input_activations")
            if w.get("num_bits") != 8 or w.get("type", "int") != "int":
                raise _refuse("weights (num_bits, type)", (w.get("num_bits"), w.get("type")), name)
            if w.get("symmetric") is not True:
                raise _refuse("weights.symmetric", w.get("symmetric"), name)
            if w.get("strategy") != "channel":
                raise _refuse("weights.strategy", w.get("strategy"), name)
            if w.get("dynamic"):
                raise _refuse("weights.dynamic", w.get("dynamic"), name)
            if a is None:
                raise _refuse("input_activations", None, name)
            if a.get("num_bits") != 8 or a.get("type", "int") != "int":
                raise _refuse("input_activations (num_bits, type)", (a.get("num_bits"), a.get("type")), name)
            if a.get("symmetric") is not True:
                raise _refuse("input_activations.symmetric", a.get("symmetric"), name)
            if a.get("dynamic") is not True or a.get("strategy") != "token":
                raise _refuse("input_activations (dynamic, strategy)", (a.get("dynamic"), a.get("strategy")), name)
            if group.get("output_activations"):
                raise _refuse("output_activations", group.get("output_activations"), name)
            targets.extend(group.get("targets") or [])
        return cls(targets=tuple(targets), ignore=tuple(qc.get("ignore") or ()), format=fmt)

    @staticmethod
    def config_block(ignore: list[str]) -> dict[str, Any]:
        """The ``quantization_config`` block llm-compressor writes for W8A8 (int8, channel/token)."""
        return {
            "quant_method": "compressed-tensors",
            "format": "int-quantized",
            "quantization_status": "compressed",
            "ignore": list(ignore),
            "kv_cache_scheme": None,
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {
                        "num_bits": 8,
                        "type": "int",
                        "symmetric": True,
                        "strategy": "channel",
                        "dynamic": False,
                        "group_size": None,
                        "block_structure": None,
                        "observer": "minmax",
                        "actorder": None,
                        "observer_kwargs": {},
                    },
                    "input_activations": {
                        "num_bits": 8,
                        "type": "int",
                        "symmetric": True,
                        "strategy": "token",
                        "dynamic": True,
                        "group_size": None,
                        "block_structure": None,
                        "observer": None,
                        "actorder": None,
                        "observer_kwargs": {},
                    },
                    "output_activations": None,
                }
            },
            "global_compression_ratio": None,
        }
