"""Load a Qwen3 checkpoint into typed weights: INT8 linears (read or quantized on load) or float linears."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from loaders.checkpoint import CheckpointError, CheckpointReader
from loaders.config import ConfigError, ModelConfig, load_model_config, read_json
from loaders.hadamard import sylvester
from loaders.options import Quantization
from loaders.quantization import (
    FLOAT_DTYPES,
    CompressedTensorsW8A8,
    FloatLinear,
    Int8Linear,
    LinearWeight,
    quantize_linear,
)
from loaders.transforms import R3_TENSORS, R4_TENSOR, OnlineTransforms

FLOAT_TENSOR_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# a stored transform matrix: llm-compressor's SpinQuantModifier writes R3's and R4's in its `precision`, float64 by
# default
TRANSFORM_TENSOR_DTYPES = (*FLOAT_TENSOR_DTYPES, torch.float64)
# Tensors a checkpoint may carry that the model does not need: old transformers saved the RoPE inverse
# frequencies (recomputed from config.json), and a tied model's lm_head is the embedding.
REDUNDANT_TENSORS = (r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"model\.rotary_emb\.inv_freq")
TIED_LM_HEAD = r"lm_head\.weight"
ATTN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def linear_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """``[out, in]`` of each linear module of one decoder layer, by its name inside the layer."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    return {
        "self_attn.q_proj": (cfg.q_size, h),
        "self_attn.k_proj": (cfg.kv_size, h),
        "self_attn.v_proj": (cfg.kv_size, h),
        "self_attn.o_proj": (h, cfg.q_size),
        "mlp.gate_proj": (i, h),
        "mlp.up_proj": (i, h),
        "mlp.down_proj": (h, i),
    }


def norm_shapes(cfg: ModelConfig) -> dict[str, tuple[int]]:
    """Shapes of the per-layer norm weights, by name inside the layer (q/k norms only where the model has them)."""
    shapes = {"input_layernorm": (cfg.hidden_size,), "post_attention_layernorm": (cfg.hidden_size,)}
    if cfg.qk_norm:
        shapes.update({"self_attn.q_norm": (cfg.head_dim,), "self_attn.k_norm": (cfg.head_dim,)})
    return shapes


@dataclass
class LayerWeights:
    norms: dict[str, torch.Tensor]
    linears: dict[str, LinearWeight]


@dataclass
class ModelWeights:
    config: ModelConfig
    embed_tokens: torch.Tensor
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    lm_head: LinearWeight
    quantization: Quantization
    # what runs on activations beyond the linears (R4's Hadamard on down_proj's input, loaders/transforms.py)
    online: OnlineTransforms = OnlineTransforms()

    def linear_bytes(self) -> int:
        """Bytes of linear weights (including lm_head) read once per decode step."""
        total = 0
        for lw in [*(w for layer in self.layers for w in layer.linears.values()), self.lm_head]:
            if isinstance(lw, Int8Linear):
                total += lw.qweight.numel() + lw.scale.numel() * 4
            else:
                total += lw.weight.numel() * lw.weight.element_size()
        return total


class _LinearLoader:
    """Reads one linear module as INT8 (from the file or quantized on load) or float, per the scheme."""

    def __init__(self, reader: CheckpointReader, scheme: CompressedTensorsW8A8 | None, mode: Quantization):
        self.reader, self.scheme, self.mode = reader, scheme, mode

    def load(self, module: str, shape: tuple[int, int], has_bias: bool = False) -> LinearWeight:
        bias = self.reader.get(f"{module}.bias", (shape[0],), FLOAT_TENSOR_DTYPES) if has_bias else None
        stored_int8 = self.scheme is not None and self.scheme.is_quantized(module)
        if stored_int8:
            q = self.reader.get(f"{module}.weight", shape, (torch.int8,))
            name = f"{module}.weight_scale"
            scale = self.reader.get(name, None, FLOAT_TENSOR_DTYPES)
            if tuple(scale.shape) not in ((shape[0], 1), (shape[0],)):
                raise CheckpointError(
                    f"{self.reader.file_of(name)}: tensor {name!r} has shape {list(scale.shape)}, "
                    f"expected [{shape[0]}, 1] or [{shape[0]}]"
                )
            for extra in ("weight_zero_point", "input_scale"):
                if self.reader.has(f"{module}.{extra}"):
                    raise CheckpointError(
                        f"{self.reader.file_of(f'{module}.{extra}')}: tensor '{module}.{extra}' present: "
                        "asymmetric weights / static activation scales are not supported"
                    )
            weight = Int8Linear(q, scale.reshape(-1).float(), None if bias is None else bias.float())
            if self.mode is Quantization.NONE:
                return FloatLinear(weight.dequantized(), None if bias is None else bias.float())
            return weight
        w = self.reader.get(f"{module}.weight", shape, FLOAT_TENSOR_DTYPES)
        # Float checkpoints are quantized on load, all but lm_head; a quantized checkpoint's float linears
        # (its `ignore` list: lm_head, and whatever its author kept in float) stay float, as in vLLM.
        if self.mode is Quantization.A8W8 and module != "lm_head" and self.scheme is None:
            return quantize_linear(w, bias)
        return FloatLinear(w, bias)


def _cast_float_parts(weights: ModelWeights, dtype: torch.dtype) -> None:
    """Embedding, norms and float linears in ``dtype`` (INT8 linears and their fp32 scales are untouched)."""

    def cast(lw: LinearWeight) -> LinearWeight:
        if isinstance(lw, FloatLinear):
            return FloatLinear(lw.weight.to(dtype), None if lw.bias is None else lw.bias.to(dtype))
        return lw

    tied = weights.lm_head.weight is weights.embed_tokens if isinstance(weights.lm_head, FloatLinear) else False
    weights.embed_tokens = weights.embed_tokens.to(dtype)
    weights.final_norm = weights.final_norm.to(dtype)
    for layer in weights.layers:
        layer.norms = {k: v.to(dtype) for k, v in layer.norms.items()}
        layer.linears = {k: cast(v) for k, v in layer.linears.items()}
    weights.lm_head = FloatLinear(weights.embed_tokens) if tied else cast(weights.lm_head)


def _check_online_matrix(reader: CheckpointReader, name: str, block: int) -> None:
    """A checkpoint's stored matrix of an online transform (R4's on down_proj's input, R3's on queries and keys)
    must be the deterministic Hadamard the kernels apply (entries +-1, or normalized by 1/sqrt(block)): the
    kernels compute the transform, they do not read the matrix."""
    if not reader.has(name):
        return  # (optional: the config says what it is)
    m = reader.get(name, (block, block), TRANSFORM_TENSOR_DTYPES).double()
    h = sylvester(block)
    if not (torch.equal(m, h) or torch.allclose(m, h / block**0.5, rtol=1e-2, atol=0.0)):
        raise CheckpointError(
            f"{reader.file_of(name)}: tensor {name!r} is not Sylvester's Hadamard matrix of order {block} "
            "(the transform_config's deterministic 'hadamard', which the kernels compute)"
        )


def load_model_weights(
    model_dir: str | Path,
    quantization: Quantization | str = Quantization.AUTO,
    progress: bool | None = None,
    quantize_lm_head: bool = False,
    dtype: str = "auto",
) -> ModelWeights:
    """Load every tensor of a Qwen3 checkpoint, checking names, shapes and dtypes.

    ``quantization``: ``auto``/``a8w8`` run every decoder linear in A8W8 (quantizing float weights on
    load); ``none`` keeps float weights (INT8 checkpoints are dequantized: a reference path only).
    ``quantize_lm_head`` (A8W8 only): also run a float lm_head in A8W8; it is the largest single matrix
    read per decode step (a tied embedding stays float for the lookup).
    ``dtype``: ``auto`` keeps the checkpoint's float dtype for the float parts (embedding, norms, float
    linears); a name of FLOAT_DTYPES converts them (``float32`` makes ``quantization="none"`` an exact
    reference for any checkpoint). Float weights are quantized to INT8 from the checkpoint's values.
    """
    if dtype != "auto" and dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype={dtype!r}; choose auto or one of {', '.join(FLOAT_DTYPES)}")
    model_dir = Path(model_dir)
    mode = Quantization(quantization)
    if mode is Quantization.AUTO:
        mode = Quantization.A8W8
    cfg = load_model_config(model_dir)
    raw_config = read_json(model_dir / "config.json")
    scheme = CompressedTensorsW8A8.from_config(raw_config)
    online = OnlineTransforms.from_config(raw_config, cfg)
    reader = CheckpointReader(model_dir)
    reader.preload()
    loader = _LinearLoader(reader, scheme, mode)
    show = sys.stderr.isatty() if progress is None else progress

    embed = reader.get("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size), FLOAT_TENSOR_DTYPES)
    layers: list[LayerWeights] = []
    for i in tqdm(range(cfg.num_layers), desc="loading layers", disable=not show, file=sys.stderr):
        prefix = f"model.layers.{i}"
        norms = {
            name: reader.get(f"{prefix}.{name}.weight", shape, FLOAT_TENSOR_DTYPES)
            for name, shape in norm_shapes(cfg).items()
        }
        linears = {
            name: loader.load(f"{prefix}.{name}", shape, name in cfg.linear_biases)
            for name, shape in linear_shapes(cfg).items()
        }
        if online.down_proj_input_block:
            _check_online_matrix(reader, f"{prefix}.mlp.down_proj.{R4_TENSOR}", online.down_proj_input_block)
        if online.qk_head_hadamard:
            for tensor in R3_TENSORS:
                _check_online_matrix(reader, f"{prefix}.self_attn.{tensor}", cfg.head_dim)
        layers.append(LayerWeights(norms=norms, linears=linears))
    final_norm = reader.get("model.norm.weight", (cfg.hidden_size,), FLOAT_TENSOR_DTYPES)
    if reader.has("lm_head.weight") and not cfg.tie_word_embeddings:
        lm_head = loader.load("lm_head", (cfg.vocab_size, cfg.hidden_size))
    elif cfg.tie_word_embeddings:
        lm_head = FloatLinear(embed)
    else:
        raise CheckpointError(
            f"{model_dir}: missing tensor 'lm_head.weight' (expected shape {[cfg.vocab_size, cfg.hidden_size]}; "
            "tie_word_embeddings is false)"
        )
    reader.check_all_read(REDUNDANT_TENSORS + ((TIED_LM_HEAD,) if cfg.tie_word_embeddings else ()))
    reader.close()
    if quantize_lm_head and mode is Quantization.A8W8 and isinstance(lm_head, FloatLinear):
        lm_head = quantize_linear(lm_head.weight)
    weights = ModelWeights(cfg, embed, layers, final_norm, lm_head, mode, online)
    if dtype != "auto":
        _cast_float_parts(weights, FLOAT_DTYPES[dtype])
    return weights


__all__ = [
    "CheckpointError",
    "ConfigError",
    "LayerWeights",
    "ModelWeights",
    "Quantization",
    "load_model_weights",
    "linear_shapes",
    "norm_shapes",
]
