"""Typed model configuration parsed from a Hugging Face ``config.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config file is missing, unreadable, or describes something we do not support."""


@dataclass(frozen=True)
class Architecture:
    """What one supported architecture's modeling code does, and the defaults of its transformers config
    class (used where config.json leaves a field out; checked against transformers 5.24, same as 4.5x)."""

    qk_norm: bool  # per-head RMSNorm of q and k before RoPE
    # Linears that always carry a bias, and the config flags that add biases to others.
    fixed_biases: tuple[str, ...]
    bias_flags: dict[str, tuple[str, ...]]
    defaults: dict[str, Any]


_ATTENTION_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_MLP_LINEARS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_QWEN_DEFAULTS = {
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 22016,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "eos_token_id": None,
}
ARCHITECTURES: dict[str, Architecture] = {
    # Qwen3: Llama plus q/k norm; head_dim is a field of its own (default 128, not hidden / heads).
    "Qwen3ForCausalLM": Architecture(
        qk_norm=True,
        fixed_biases=(),
        bias_flags={"attention_bias": _ATTENTION_LINEARS},
        defaults={**_QWEN_DEFAULTS, "head_dim": 128},
    ),
    # Qwen2 / Qwen2.5: q, k and v always have a bias, o_proj and the MLP never.
    "Qwen2ForCausalLM": Architecture(
        qk_norm=False, fixed_biases=_ATTENTION_LINEARS[:3], bias_flags={}, defaults={**_QWEN_DEFAULTS, "head_dim": None}
    ),
    "LlamaForCausalLM": Architecture(
        qk_norm=False,
        fixed_biases=(),
        bias_flags={"attention_bias": _ATTENTION_LINEARS, "mlp_bias": _MLP_LINEARS},
        defaults={
            "vocab_size": 32000,
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": None,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False,
            "hidden_act": "silu",
            "eos_token_id": 2,
            "head_dim": None,
        },
    ),
}
SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)
# transformers' RotaryEmbeddingConfigMixin.default_theta; none of the supported classes overrides it.
DEFAULT_ROPE_THETA = 10_000.0
# Per RoPE type: the parameters it reads (anything else in the RoPE dict is refused by name) and the ones it
# cannot do without. yarn derives a missing factor from max_position_embeddings / original length.
ROPE_TYPES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "default": ((), ()),
    "linear": (("factor",), ("factor",)),
    "llama3": (
        ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
        ("factor", "low_freq_factor", "high_freq_factor"),
    ),
    "yarn": (
        (
            "factor",
            "original_max_position_embeddings",
            "attention_factor",
            "beta_fast",
            "beta_slow",
            "mscale",
            "mscale_all_dim",
            "truncate",
        ),
        (),
    ),
}
_ROPE_COMMON_KEYS = ("rope_type", "type", "rope_theta", "partial_rotary_factor")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding: ``rope_type`` (a key of ROPE_TYPES), the base ``theta`` and the type's parameters
    (``original_max_position_embeddings`` filled in where the type uses it, as transformers does)."""

    rope_type: str = "default"
    theta: float = DEFAULT_ROPE_THETA
    params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: dict[str, Any], max_position_embeddings: int, source: str) -> RopeConfig:
        """Both formats: transformers 5's ``rope_parameters`` and 4.x's ``rope_theta`` + ``rope_scaling``
        (where both are present, ``rope_scaling`` wins and a ``rope_theta`` inside the dict wins over the
        top-level one, as in transformers' ``convert_rope_params_to_dict``)."""
        field_name = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
        rope = cfg.get(field_name) or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"{source}: {field_name} must be an object, got {rope!r}")
        if any(isinstance(v, dict) for v in rope.values()):
            raise ConfigError(
                f"{source}: {field_name} gives RoPE per layer type ({sorted(rope)}); only one RoPE "
                "for all layers is implemented"
            )
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ConfigError(
                f"{source}: {field_name}.rope_type {rope_type!r} is not implemented; "
                f"implemented: {', '.join(ROPE_TYPES)}"
            )
        allowed, required = ROPE_TYPES[rope_type]
        for key in rope:
            if key not in allowed and key not in _ROPE_COMMON_KEYS:
                raise ConfigError(
                    f"{source}: {field_name}.{key} is not implemented for rope_type {rope_type!r} "
                    f"(it reads {', '.join(allowed) or 'no parameters'})"
                )
        for key in required:
            if rope.get(key) is None:
                raise ConfigError(f"{source}: {field_name}.{key} is required for rope_type {rope_type!r}")
        partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor"))
        if partial is not None and float(partial) != 1.0:
            raise ConfigError(
                f"{source}: partial_rotary_factor={partial} is not implemented (RoPE over whole heads only)"
            )
        theta = float(rope.get("rope_theta", cfg.get("rope_theta", DEFAULT_ROPE_THETA)))
        params = {k: rope[k] for k in allowed if rope.get(k) is not None}
        if "original_max_position_embeddings" in allowed:
            params.setdefault(
                "original_max_position_embeddings", cfg.get("original_max_position_embeddings", max_position_embeddings)
            )
        if rope_type == "yarn" and params.get("factor") is None:
            params["factor"] = max_position_embeddings / params["original_max_position_embeddings"]
        return cls(rope_type, theta, params)


@dataclass(frozen=True)
class ModelConfig:
    """The architecture facts the worker needs, read from ``config.json``."""

    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]
    rope: RopeConfig = field(default_factory=RopeConfig)
    torch_dtype: str = "bfloat16"
    # Names (inside a layer, e.g. "self_attn.q_proj") of the linears that have a bias.
    linear_biases: frozenset[str] = frozenset()
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def qk_norm(self) -> bool:
        """Whether attention normalizes q and k per head before RoPE (Qwen3 yes, Qwen2 and Llama no)."""
        return ARCHITECTURES[self.architecture].qk_norm

    @property
    def rope_theta(self) -> float:
        return self.rope.theta

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch_name = archs[0] if archs else None
        if arch_name not in ARCHITECTURES:
            raise ConfigError(
                f"{source}: unsupported architecture architectures={archs!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        arch = ARCHITECTURES[arch_name]

        def get(key: str) -> Any:  # the class default only where the field is absent (null is a value)
            return cfg[key] if key in cfg else arch.defaults.get(key)

        _refuse_unimplemented(cfg, arch, source)
        try:
            hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
            max_pos = int(get("max_position_embeddings"))
            eos = get("eos_token_id")
            eos_ids = tuple(int(e) for e in eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            biases = set(arch.fixed_biases)
            for flag, linears in arch.bias_flags.items():
                if cfg.get(flag):
                    biases.update(linears)
            return cls(
                architecture=arch_name,
                hidden_size=hidden,
                num_layers=int(get("num_hidden_layers")),
                num_heads=heads,
                num_kv_heads=int(get("num_key_value_heads") or heads),
                head_dim=int(get("head_dim") or hidden // heads),
                intermediate_size=int(get("intermediate_size")),
                rms_norm_eps=float(get("rms_norm_eps")),
                vocab_size=int(get("vocab_size")),
                tie_word_embeddings=bool(get("tie_word_embeddings")),
                max_position_embeddings=max_pos,
                eos_token_ids=eos_ids,
                rope=RopeConfig.from_config(cfg, max_pos, source),
                torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
                linear_biases=frozenset(biases),
                raw=cfg,
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: {e}") from None

    def validate(self, source: str = "config.json") -> None:
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"{source}: num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"{source}: head_dim={self.head_dim} must be even for RoPE")


def _refuse_unimplemented(cfg: dict[str, Any], arch: Architecture, source: str) -> None:
    """Fields of these architectures' configs that would change the outputs in a way we do not implement."""
    if cfg.get("use_sliding_window"):
        raise ConfigError(f"{source}: use_sliding_window=true is not implemented (full attention only)")
    layer_types = cfg.get("layer_types") or []
    other = sorted({t for t in layer_types if t != "full_attention"})
    if other:
        raise ConfigError(f"{source}: layer_types has {other}; only full_attention is implemented")
    act = cfg.get("hidden_act") or arch.defaults["hidden_act"]
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act={act!r} is not implemented; only silu (SwiGLU)")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag) and flag not in arch.bias_flags:
            raise ConfigError(f"{source}: {flag}=true is not part of this architecture's modeling code")


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON file, turning every failure into a ConfigError that names the file."""
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot parse JSON: {e}") from None


def load_model_config(model_dir: str | Path) -> ModelConfig:
    """Parse and validate ``<model_dir>/config.json``."""
    path = Path(model_dir) / "config.json"
    cfg = ModelConfig.from_dict(read_json(path), source=str(path))
    cfg.validate(str(path))
    return cfg


# The request defaults a model's generation_config.json (or --override-generation-config) may set: vLLM's list,
# each key with the type it must have. ``max_new_tokens`` becomes a chat request's default ``max_tokens``.
GENERATION_DEFAULT_FIELDS: dict[str, type] = {
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "min_p": float,
    "repetition_penalty": float,
    "max_new_tokens": int,
}
# --generation-config values besides a directory: the model's own file, or none (vLLM's name for "the
# server's own defaults": temperature 1, no top-p/top-k, no length limit).
GENERATION_CONFIG_AUTO = "auto"
GENERATION_CONFIG_NONE = "vllm"


@dataclass(frozen=True)
class GenerationDefaults:
    """Sampling defaults of requests that leave a field out (from ``generation_config.json`` and the
    overrides; all optional), and the end-of-sequence ids the model's file names."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    source: str = "none"  # where the sampling values came from, for the startup summary

    def describe(self) -> str:
        """One line for the startup summary: the effective defaults and where they came from."""
        values = [f"{k} {getattr(self, k)}" for k in GENERATION_DEFAULT_FIELDS if getattr(self, k) is not None]
        if not values:
            return f"none from {self.source}: temperature 1.0, no top_p/top_k, no max_tokens"
        return f"{', '.join(values)} (from {self.source})"


def _sampling_fields(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    """The request defaults in a generation config, type-checked; ``do_sample: false`` (transformers' way of
    saying greedy) is temperature 0."""
    out = {}
    for key, kind in GENERATION_DEFAULT_FIELDS.items():
        value = cfg.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
            raise ConfigError(f"{source}: {key} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
        out[key] = kind(value)
    if cfg.get("do_sample") is False:
        out["temperature"] = 0.0
    return out


def _check_ranges(values: dict[str, Any], source: str) -> None:
    checks = {
        "temperature": (lambda v: v >= 0, "at least 0"),
        "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
        "top_k": (lambda v: v >= -1, "-1, 0 (off) or a positive count"),
        "min_p": (lambda v: 0 <= v <= 1, "in [0, 1]"),
        "repetition_penalty": (lambda v: v > 0, "greater than 0"),
        "max_new_tokens": (lambda v: v >= 1, "at least 1"),
    }
    for key, value in values.items():
        ok, want = checks[key]
        if not ok(value):
            raise ConfigError(f"{source}: {key} must be {want}, got {value}")


def load_generation_defaults(
    model_dir: str | Path,
    generation_config: str = GENERATION_CONFIG_AUTO,
    overrides: dict[str, Any] | None = None,
) -> GenerationDefaults:
    """Request defaults as vLLM's ``--generation-config`` / ``--override-generation-config`` resolve them:
    ``auto`` reads the model's ``generation_config.json`` (absent: no defaults), ``vllm`` none, anything else
    names a directory holding a ``generation_config.json``; ``overrides`` then set or replace single fields
    (an unknown key is an error). End-of-sequence ids always come from the model's own file."""
    model_file = Path(model_dir) / "generation_config.json"
    model_cfg = read_json(model_file) if model_file.is_file() else {}
    eos = model_cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    if generation_config == GENERATION_CONFIG_AUTO:
        cfg, source = model_cfg, (str(model_file) if model_file.is_file() else "the model (no generation_config.json)")
    elif generation_config == GENERATION_CONFIG_NONE:
        cfg, source = {}, "--generation-config vllm"
    else:
        path = Path(generation_config) / "generation_config.json"
        if not path.is_file():
            raise ConfigError(
                f"--generation-config {generation_config}: no generation_config.json there (give auto, vllm or a "
                "directory holding one)"
            )
        cfg, source = read_json(path), str(path)
    values = _sampling_fields(cfg, source)
    _check_ranges(values, source)
    if overrides:
        unknown = sorted(set(overrides) - set(GENERATION_DEFAULT_FIELDS))
        if unknown:
            raise ConfigError(
                f"--override-generation-config: unknown field {', '.join(unknown)} (known: "
                f"{', '.join(GENERATION_DEFAULT_FIELDS)})"
            )
        override_values = _sampling_fields(overrides, "--override-generation-config")
        _check_ranges(override_values, "--override-generation-config")
        values.update(override_values)
        source = f"{source} + --override-generation-config" if cfg else "--override-generation-config"
    return GenerationDefaults(**values, eos_token_ids=eos_ids, source=source)
