"""Hadamard rotations before A8W8 quantization (QuaRot / SpinQuant's R1, R2 and R4), in compressed-tensors'
terms so that llm-compressor's checkpoints and ours describe the same thing.

An orthogonal ``R`` before a linear changes nothing in float (``x W^T = (x R)(W R)^T``) but spreads a few
outlier channels over all of them, so per-token INT8 activations lose far less. What this writes, from a float
checkpoint (float64 arithmetic, then the checkpoint's dtype):

- every RMSNorm's weight folded into the linears it feeds (the norms become ones: an RMSNorm without a weight
  commutes with a rotation), the final norm's into the lm_head, which is therefore untied from the embedding
  (as llm-compressor's SpinQuant does: a tied embedding cannot take the final norm's weight);
- **R1**, one orthogonal matrix on the residual stream: the embedding and the outputs of o_proj and down_proj
  are multiplied by it, the inputs of q/k/v/gate/up and lm_head by its inverse. A Hadamard matrix with random
  signs: ``kron`` Sylvester x Paley, one matrix across the whole width (576 = 8 x 72), or ``blocks``, a
  block-diagonal of Sylvester blocks (the largest power of two dividing the width);
- **R2**, per attention head: v_proj's output and o_proj's input, a Sylvester matrix with random signs per head;
- **R4**, on down_proj's input: the offline half (its weight times the block-diagonal Sylvester matrix) here,
  the online half (``silu(gate) * up`` times the same matrix, before it is quantized) in the runtime's kernels,
  as compressed-tensors' deterministic ``hadamard`` transform with ``head_dim`` = the block. Its matrices are
  written as ``model.layers.N.mlp.down_proj.R4_input.weight`` (entries +-1, as vLLM loads them);
- **R3** (optional), on queries and keys after RoPE: online only (nothing changes in the weights), a Sylvester
  matrix per head applied to both, so every attention score is unchanged while the keys' per-head INT8 cache
  rounding spreads over the head; compressed-tensors' ``hadamard`` at locations ``q_attn`` and ``k_cache``
  of the attention modules, as llm-compressor's SpinQuant writes it.

The checkpoint's ``quantization_config.transform_config`` says all of this in compressed-tensors' schema.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loaders.checkpoint import CheckpointReader
from loaders.config import ConfigError, ModelConfig, load_model_config, read_json
from loaders.hadamard import block_diagonal, hadamard, is_power_of_two, largest_power_of_two_block, sylvester
from loaders.transforms import R4_TENSOR, transform_config
from loaders.writer import copy_side_files, save_tensors

R1_KINDS = ("kron", "blocks")
# The online R4's block: the largest power of two dividing the intermediate size, at most this (the eager
# simulation in the rotation issue used blocks of up to 512).
DEFAULT_R4_BLOCK_LIMIT = 512


@dataclass(frozen=True)
class RotationPlan:
    """Which rotations to fold in (``r4_block_limit`` 0: no R4)."""

    r1: str | None = "kron"
    r2: bool = True
    r4_block_limit: int = DEFAULT_R4_BLOCK_LIMIT
    seed: int = 0
    r3: bool = False  # the online per-head rotation of queries and keys (the INT8 KV cache's share)


def _signs(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=generator, dtype=torch.int64).to(torch.float64) * 2 - 1


def r1_matrix(hidden: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    """The residual stream's rotation (orthogonal, float64): a Hadamard matrix with random column signs."""
    if kind == "kron":
        h = hadamard(hidden)
    elif kind == "blocks":
        h = block_diagonal(hidden, largest_power_of_two_block(hidden, hidden))
    else:
        raise ValueError(f"R1 kind {kind!r}; choose one of {R1_KINDS}")
    return _signs(hidden, generator)[:, None] * h


def r2_matrix(num_kv_heads: int, head_dim: int, generator: torch.Generator) -> torch.Tensor:
    """Per KV head (block diagonal): a normalized Sylvester matrix with random signs."""
    h = hadamard(head_dim)
    return torch.block_diag(*[_signs(head_dim, generator)[:, None] * h for _ in range(num_kv_heads)])


def r4_block(cfg: ModelConfig, limit: int) -> int:
    return largest_power_of_two_block(cfg.intermediate_size, limit)


def rotate_state_dict(t: dict[str, torch.Tensor], cfg: ModelConfig, plan: RotationPlan) -> dict[str, torch.Tensor]:
    """``t`` (a float checkpoint's tensors) with the plan's rotations folded in, in float64 then the tensors'
    own dtypes. Returns the new tensors (lm_head untied, norms ones, R4's matrices added)."""
    g = torch.Generator().manual_seed(plan.seed)
    h, hd = cfg.hidden_size, cfg.head_dim
    f64 = {k: v.double() for k, v in t.items()}
    dtypes = {k: v.dtype for k, v in t.items()}
    if cfg.tie_word_embeddings or "lm_head.weight" not in f64:
        lm_head = f64["model.embed_tokens.weight"].clone()  # untied: it takes the final norm's weight
        dtypes["lm_head.weight"] = dtypes["model.embed_tokens.weight"]
    else:
        lm_head = f64["lm_head.weight"]
    r1 = r1_matrix(h, plan.r1, g) if plan.r1 else torch.eye(h, dtype=torch.float64)
    out: dict[str, torch.Tensor] = {}

    def ones(name: str) -> None:
        f64[name] = torch.ones_like(f64[name])

    for i in range(cfg.num_layers):
        p = f"model.layers.{i}"
        g_in, g_post = f64[f"{p}.input_layernorm.weight"], f64[f"{p}.post_attention_layernorm.weight"]
        for x in "qkv":  # norm folded, then R1 on the input
            f64[f"{p}.self_attn.{x}_proj.weight"] = f64[f"{p}.self_attn.{x}_proj.weight"] * g_in[None, :] @ r1
        for x in ("gate", "up"):
            f64[f"{p}.mlp.{x}_proj.weight"] = f64[f"{p}.mlp.{x}_proj.weight"] * g_post[None, :] @ r1
        ones(f"{p}.input_layernorm.weight")
        ones(f"{p}.post_attention_layernorm.weight")
        o = f64[f"{p}.self_attn.o_proj.weight"]
        if plan.r2:
            r2 = r2_matrix(cfg.num_kv_heads, hd, g)
            f64[f"{p}.self_attn.v_proj.weight"] = r2.T @ f64[f"{p}.self_attn.v_proj.weight"]
            if f"{p}.self_attn.v_proj.bias" in f64:
                f64[f"{p}.self_attn.v_proj.bias"] = f64[f"{p}.self_attn.v_proj.bias"] @ r2
            group = cfg.num_heads // cfg.num_kv_heads  # (query head j reads KV head j // group)
            blocks = [r2[k * hd : (k + 1) * hd, k * hd : (k + 1) * hd] for k in range(cfg.num_kv_heads)]
            o = o @ torch.block_diag(*[blocks[j // group] for j in range(cfg.num_heads)])
        f64[f"{p}.self_attn.o_proj.weight"] = r1.T @ o  # R1 on the output
        if f"{p}.self_attn.o_proj.bias" in f64:
            f64[f"{p}.self_attn.o_proj.bias"] = f64[f"{p}.self_attn.o_proj.bias"] @ r1
        down = r1.T @ f64[f"{p}.mlp.down_proj.weight"]
        if plan.r4_block_limit:
            block = r4_block(cfg, plan.r4_block_limit)
            down = down @ block_diagonal(cfg.intermediate_size, block)
            out[f"{p}.mlp.down_proj.{R4_TENSOR}"] = sylvester(block).to(dtypes[f"{p}.mlp.down_proj.weight"])
        f64[f"{p}.mlp.down_proj.weight"] = down
        if f"{p}.mlp.down_proj.bias" in f64:
            f64[f"{p}.mlp.down_proj.bias"] = f64[f"{p}.mlp.down_proj.bias"] @ r1
    f64["model.embed_tokens.weight"] = f64["model.embed_tokens.weight"] @ r1
    f64["lm_head.weight"] = lm_head * f64["model.norm.weight"][None, :] @ r1
    ones("model.norm.weight")
    out.update({k: v.to(dtypes[k]) for k, v in f64.items()})
    return out


def _check_widths(cfg: ModelConfig, plan: RotationPlan, source: Path) -> None:
    """A ConfigError naming config.json's field where the plan needs a Hadamard matrix this module cannot build."""
    if plan.r3 and not is_power_of_two(cfg.head_dim):
        raise ConfigError(f"{source}: head_dim {cfg.head_dim}: R3's online rotation needs a power of two")
    checks = [("hidden_size", cfg.hidden_size, plan.r1 == "kron"), ("head_dim", cfg.head_dim, plan.r2)]
    for field, n, needed in checks:
        if needed:
            try:
                hadamard(n)
            except ValueError as exc:
                hint = " (R1 as --rotate blocks needs none)" if field == "hidden_size" else ""
                raise ConfigError(f"{source}: {field} {n}: {exc}{hint}") from None


def rotate_checkpoint(src: str | Path, dst: str | Path, plan: RotationPlan = RotationPlan()) -> Path:
    """Write ``dst``: the float checkpoint ``src`` with the plan's rotations folded in (the same function in
    float, given the online R4 the runtime applies), its config saying so (``transform_config``)."""
    src, dst = Path(src), Path(dst)
    raw = read_json(src / "config.json")
    if raw.get("quantization_config"):
        raise ConfigError(f"{src / 'config.json'}: rotate a float checkpoint (this one has a quantization_config)")
    cfg = load_model_config(src)
    _check_widths(cfg, plan, src / "config.json")
    reader = CheckpointReader(src)
    tensors = {name: reader.get(name) for name in reader.keys()}
    reader.close()
    tensors = rotate_state_dict(tensors, cfg, plan)
    save_tensors(tensors, dst)
    raw["tie_word_embeddings"] = False
    block = r4_block(cfg, plan.r4_block_limit) if plan.r4_block_limit else None
    raw["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "format": "dense",  # float weights: only the transforms are described
        "transform_config": transform_config(
            plan.r1, cfg.head_dim if plan.r2 else None, block, cfg.head_dim if plan.r3 else None
        ),
    }
    (dst / "config.json").write_text(json.dumps(raw, indent=2))
    copy_side_files(src, dst)
    return dst


def describe(plan: RotationPlan, cfg: ModelConfig) -> dict[str, Any]:
    """What the plan does to this model, for reports."""
    return {
        "r1": plan.r1,
        "r2_head_dim": cfg.head_dim if plan.r2 else None,
        "r4_block": r4_block(cfg, plan.r4_block_limit) if plan.r4_block_limit else None,
        "r3_head_dim": cfg.head_dim if plan.r3 else None,
    }
