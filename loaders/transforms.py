"""compressed-tensors' ``transform_config`` (llm-compressor's SpinQuant / QuIP rotations): what a checkpoint
says was folded into its weights, and what the runtime must apply online.

Offline transforms (``weight_input`` / ``weight_output`` locations) are already in the weights: nothing to do.
The one online transform implemented is R4's: a deterministic Hadamard (Sylvester, compressed-tensors' type
``hadamard``) on down_proj's input, block-diagonal with blocks of ``head_dim`` (a power of two), its matrix
stored as ``<down_proj>.R4_input.weight`` (as vLLM loads it). Anything else online (an output transform, R3 on
queries and keys, another type or target) is refused with a ConfigError naming the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from loaders.config import ConfigError
from loaders.hadamard import is_power_of_two

# The online transform's matrix in a checkpoint (compressed-tensors' f"{scheme}_{location}" module, "weight").
R4_TENSOR = "R4_input.weight"
R4_TENSOR_PATTERN = r"model\.layers\.\d+\.mlp\.down_proj\.R4_input\.weight"
DOWN_PROJ = "re:.*mlp.down_proj$"
_ATTN_V, _ATTN_O = "re:.*self_attn.v_proj$", "re:.*self_attn.o_proj$"
R1_WRITERS = ["re:.*embed_tokens$", _ATTN_O, DOWN_PROJ]
R1_READERS = [
    "re:.*self_attn.q_proj$",
    "re:.*self_attn.k_proj$",
    _ATTN_V,
    "re:.*mlp.gate_proj$",
    "re:.*mlp.up_proj$",
    "lm_head",
]
OFFLINE_LOCATIONS = ("weight_input", "weight_output")
PRECISION = "torch.float32"  # online transforms in fp32, as our kernels compute them


def _scheme(kind: str, head_dim: int | None, apply: list[dict[str, Any]], randomize: bool) -> dict[str, Any]:
    return {
        "type": kind,
        "apply": apply,
        "randomize": randomize,
        "requires_grad": False,
        "head_dim": head_dim,
        "precision": PRECISION,
    }


def _args(targets: list[str], location: str, inverse: bool = False) -> dict[str, Any]:
    return {"targets": targets, "location": location, "inverse": inverse, "ignore": []}


def transform_config(r1: str | None, r2_head_dim: int | None, r4_block: int | None) -> dict[str, Any]:
    """The ``transform_config`` block (compressed-tensors' TransformConfig) of a checkpoint that
    ``offline/rotate.py`` rotated: R1 and R2 as offline random Hadamards, R4 as an online deterministic one."""
    groups: dict[str, Any] = {}
    if r1:
        apply = [_args(R1_WRITERS, "weight_output"), _args(R1_READERS, "weight_input", inverse=True)]
        groups["R1"] = _scheme("random-hadamard", None, apply, randomize=True)
    if r2_head_dim:
        apply = [_args([_ATTN_V], "weight_output"), _args([_ATTN_O], "weight_input", inverse=True)]
        groups["R2"] = _scheme("random-hadamard", r2_head_dim, apply, randomize=True)
    if r4_block:
        apply = [_args([DOWN_PROJ], "input"), _args([DOWN_PROJ], "weight_input", inverse=True)]
        groups["R4"] = _scheme("hadamard", r4_block, apply, randomize=False)
    return {"config_groups": groups}


def _targets_only_down_proj(targets: list[str]) -> bool:
    probes = (
        "model.layers.0.mlp.down_proj",
        "model.layers.0.mlp.up_proj",
        "model.layers.0.self_attn.o_proj",
        "lm_head",
    )
    hits = {
        p for p in probes for t in targets if t == p or t == "down_proj" or (t.startswith("re:") and re.match(t[3:], p))
    }
    return hits == {"model.layers.0.mlp.down_proj"}


@dataclass(frozen=True)
class OnlineTransforms:
    """What the runtime applies to activations: the block of R4's Hadamard on down_proj's input, or None."""

    down_proj_input_block: int | None = None

    @classmethod
    def from_config(cls, raw: dict[str, Any], intermediate_size: int) -> OnlineTransforms:
        """From config.json's ``quantization_config.transform_config`` (absent: nothing to apply)."""
        qc = raw.get("quantization_config") or {}
        tc = qc.get("transform_config")
        if not tc:
            return cls()
        groups = tc.get("config_groups") or tc.get("transform_groups")
        if not isinstance(groups, dict):
            raise ConfigError("quantization_config.transform_config.config_groups: expected an object of schemes")
        block = None
        for name, scheme in groups.items():
            where = f"quantization_config.transform_config.config_groups.{name}"
            for i, args in enumerate(scheme.get("apply") or []):
                location = args.get("location")
                if location in OFFLINE_LOCATIONS:
                    continue  # folded into the weights already
                field = f"{where}.apply[{i}]"
                if location != "input" or not _targets_only_down_proj(list(args.get("targets") or [])):
                    raise ConfigError(
                        f"{field}: an online transform at {location!r} on {args.get('targets')} is not implemented "
                        "(only R4's: a Hadamard on down_proj's input)"
                    )
                if args.get("inverse"):
                    raise ConfigError(f"{field}.inverse: an inverse online transform is not implemented")
                if scheme.get("type") != "hadamard" or scheme.get("randomize"):
                    raise ConfigError(
                        f"{where}.type: online transform {scheme.get('type')!r} (randomize={scheme.get('randomize')}) "
                        "is not implemented; only the deterministic 'hadamard'"
                    )
                size = scheme.get("head_dim") or intermediate_size
                if not is_power_of_two(size) or intermediate_size % size:
                    raise ConfigError(
                        f"{where}.head_dim: a Hadamard block of {size} on down_proj's input of {intermediate_size} "
                        "(needs a power of two that divides it)"
                    )
                block = size
        return cls(down_proj_input_block=block)
