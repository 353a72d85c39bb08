"""Typed model configuration parsed from a Hugging Face ``config.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Qwen3 is Llama plus per-head RMSNorm of q and k (q_norm/k_norm); both run through one model class.
SUPPORTED_ARCHITECTURES = ("Qwen3ForCausalLM", "LlamaForCausalLM")
ARCHITECTURES_WITH_QK_NORM = ("Qwen3ForCausalLM",)
# rope_scaling types whose math we implement; anything else is refused by name.
SUPPORTED_ROPE_SCALING = (None, "default")


class ConfigError(ValueError):
    """A config file is missing, unreadable, or describes something we do not support."""


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
    rope_theta: float
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]
    torch_dtype: str = "bfloat16"
    rope_scaling: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def qk_norm(self) -> bool:
        """Whether attention normalizes q and k per head before RoPE (Qwen3 yes, Llama no)."""
        return self.architecture in ARCHITECTURES_WITH_QK_NORM

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"{source}: unsupported architecture architectures={archs!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        rope_scaling = cfg.get("rope_scaling")
        rope_type = None
        if rope_scaling is not None:
            rope_type = rope_scaling.get("rope_type", rope_scaling.get("type"))
        if rope_type not in SUPPORTED_ROPE_SCALING:
            raise ConfigError(
                f"{source}: unsupported rope_scaling type {rope_type!r} (rope_scaling={rope_scaling!r}); "
                "only plain RoPE (rope_scaling null) is implemented"
            )
        if cfg.get("use_sliding_window"):
            raise ConfigError(f"{source}: use_sliding_window=true is not supported")
        for flag in ("attention_bias", "mlp_bias"):
            if cfg.get(flag):
                raise ConfigError(f"{source}: {flag}=true is not supported (no linear biases)")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: unsupported hidden_act={cfg.get('hidden_act')!r}; only silu (SwiGLU)")
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            return cls(
                architecture=arch,
                hidden_size=hidden,
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads", heads)),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                intermediate_size=int(cfg["intermediate_size"]),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(cfg.get("rope_theta", 10000.0)),
                vocab_size=int(cfg["vocab_size"]),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
                eos_token_ids=eos_ids,
                torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
                rope_scaling=rope_scaling,
                raw=cfg,
            )
        except KeyError as e:
            raise ConfigError(f"{source}: missing required field {e.args[0]!r}") from None

    def validate(self, source: str = "config.json") -> None:
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"{source}: num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ConfigError(f"{source}: head_dim={self.head_dim} must be even for RoPE")


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


@dataclass(frozen=True)
class GenerationDefaults:
    """Sampling defaults from ``generation_config.json`` (all optional)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    eos_token_ids: tuple[int, ...] = ()


def load_generation_defaults(model_dir: str | Path) -> GenerationDefaults:
    """Read ``generation_config.json`` if present; an absent file means no defaults."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return GenerationDefaults()
    cfg = read_json(path)
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    # do_sample=false in HF means greedy; express that as temperature 0.
    temperature = cfg.get("temperature")
    if cfg.get("do_sample") is False:
        temperature = 0.0
    return GenerationDefaults(
        temperature=temperature,
        top_p=cfg.get("top_p"),
        top_k=cfg.get("top_k"),
        min_p=cfg.get("min_p"),
        repetition_penalty=cfg.get("repetition_penalty"),
        eos_token_ids=eos_ids,
    )
