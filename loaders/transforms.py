"""compressed-tensors' ``transform_config`` (llm-compressor's SpinQuant / QuIP rotations): what a checkpoint
says was folded into its weights, and what the runtime must apply online.

Offline transforms (``weight_input`` / ``weight_output`` locations) are already in the weights: nothing to do.
Two online transforms are implemented, both deterministic Hadamards (Sylvester, compressed-tensors' type
``hadamard``):

- R4's on down_proj's input (location ``input``), block-diagonal with blocks of ``head_dim`` (a power of two),
  its matrix stored as ``<down_proj>.R4_input.weight`` (as vLLM loads it);
- R3's on queries and keys after RoPE (locations ``q_attn`` and ``k_cache`` on the attention modules, both
  together, as llm-compressor's SpinQuant writes them), one block per head (``head_dim`` = the model's).

Anything else online (an output transform, another type or target, R3 on only one of q and k) is refused with a
ConfigError naming the field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from loaders.config import ConfigError, ModelConfig
from loaders.hadamard import is_power_of_two

# The online transform's matrix in a checkpoint (compressed-tensors' f"{scheme}_{location}" module, "weight").
R4_TENSOR = "R4_input.weight"
R4_TENSOR_PATTERN = r"model\.layers\.\d+\.mlp\.down_proj\.R4_input\.weight"
DOWN_PROJ = "re:.*mlp.down_proj$"
SELF_ATTN = "re:.*self_attn$"  # R3's target: the attention module, whose query and key states it rotates
R3_LOCATIONS = ("q_attn", "k_cache")
# R3's matrices as llm-compressor stores them under the attention module (optional: we write none)
R3_TENSORS = tuple(f"R3_{location}.weight" for location in R3_LOCATIONS)
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


def transform_config(
    r1: str | None, r2_head_dim: int | None, r4_block: int | None, r3_head_dim: int | None = None
) -> dict[str, Any]:
    """The ``transform_config`` block (compressed-tensors' TransformConfig) of a checkpoint that
    ``offline/rotate.py`` rotated: R1 and R2 as offline random Hadamards, R3 and R4 as online deterministic ones."""
    groups: dict[str, Any] = {}
    if r1:
        apply = [_args(R1_WRITERS, "weight_output"), _args(R1_READERS, "weight_input", inverse=True)]
        groups["R1"] = _scheme("random-hadamard", None, apply, randomize=True)
    if r2_head_dim:
        apply = [_args([_ATTN_V], "weight_output"), _args([_ATTN_O], "weight_input", inverse=True)]
        groups["R2"] = _scheme("random-hadamard", r2_head_dim, apply, randomize=True)
    if r3_head_dim:
        apply = [_args([SELF_ATTN], location) for location in R3_LOCATIONS]
        groups["R3"] = _scheme("hadamard", r3_head_dim, apply, randomize=False)
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


def _targets_only_attention(targets: list[str]) -> bool:
    probes = ("model.layers.0.self_attn", "model.layers.0.self_attn.q_proj", "model.layers.0.mlp")
    hits = {
        p for p in probes for t in targets if t == p or t == "self_attn" or (t.startswith("re:") and re.match(t[3:], p))
    }
    return hits == {"model.layers.0.self_attn"}


def _check_deterministic(where: str, scheme: dict[str, Any]) -> None:
    if scheme.get("type") != "hadamard" or scheme.get("randomize"):
        raise ConfigError(
            f"{where}.type: online transform {scheme.get('type')!r} (randomize={scheme.get('randomize')}) "
            "is not implemented; only the deterministic 'hadamard'"
        )


@dataclass(frozen=True)
class OnlineTransforms:
    """What the runtime applies to activations: the block of R4's Hadamard on down_proj's input (or None), and
    whether R3's per-head Hadamard rotates queries and keys after RoPE."""

    down_proj_input_block: int | None = None
    qk_head_hadamard: bool = False

    @classmethod
    def from_config(cls, raw: dict[str, Any], cfg: ModelConfig) -> OnlineTransforms:
        """From config.json's ``quantization_config.transform_config`` (absent: nothing to apply)."""
        qc = raw.get("quantization_config") or {}
        tc = qc.get("transform_config")
        if not tc:
            return cls()
        groups = tc.get("config_groups") or tc.get("transform_groups")
        if not isinstance(groups, dict):
            raise ConfigError("quantization_config.transform_config.config_groups: expected an object of schemes")
        block, qk_locations = None, set()
        for name, scheme in groups.items():
            where = f"quantization_config.transform_config.config_groups.{name}"
            for i, args in enumerate(scheme.get("apply") or []):
                location = args.get("location")
                if location in OFFLINE_LOCATIONS:
                    continue  # folded into the weights already
                field = f"{where}.apply[{i}]"
                targets = list(args.get("targets") or [])
                if location in R3_LOCATIONS and _targets_only_attention(targets):
                    qk_locations.add(location)
                    size = scheme.get("head_dim") or cfg.head_dim
                    if size != cfg.head_dim or not is_power_of_two(size):
                        raise ConfigError(
                            f"{where}.head_dim: a Hadamard block of {size} on queries and keys of head_dim "
                            f"{cfg.head_dim} (needs one block per head, a power of two)"
                        )
                elif location == "input" and _targets_only_down_proj(targets):
                    size = scheme.get("head_dim") or cfg.intermediate_size
                    if not is_power_of_two(size) or cfg.intermediate_size % size:
                        raise ConfigError(
                            f"{where}.head_dim: a Hadamard block of {size} on down_proj's input of "
                            f"{cfg.intermediate_size} (needs a power of two that divides it)"
                        )
                    block = size
                else:
                    raise ConfigError(
                        f"{field}: an online transform at {location!r} on {targets} is not implemented "
                        "(only R4's, a Hadamard on down_proj's input, and R3's on q_attn and k_cache of self_attn)"
                    )
                if args.get("inverse"):
                    raise ConfigError(f"{field}.inverse: an inverse online transform is not implemented")
                _check_deterministic(where, scheme)
        if qk_locations and qk_locations != set(R3_LOCATIONS):
            (missing,) = set(R3_LOCATIONS) - qk_locations
            raise ConfigError(
                f"quantization_config.transform_config: R3 rotates queries and keys together; {missing!r} is missing "
                "(a rotation of only one of them changes every attention score)"
            )
        return cls(down_proj_input_block=block, qk_head_hadamard=bool(qk_locations))
