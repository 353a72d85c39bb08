"""Writing checkpoints: the ``quantize`` command (compressed-tensors W8A8) and random test models."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file as _save_safetensors
from tqdm import tqdm

from loaders.checkpoint import INDEX_FILE, SINGLE_FILE, CheckpointReader
from loaders.config import ConfigError, ModelConfig, load_model_config, read_json
from loaders.quantization import FLOAT_DTYPES, CompressedTensorsW8A8, quantize_weight
from loaders.weights import linear_shapes

# Files that travel with a checkpoint besides config and weights.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "generation_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
)
QWEN3_BOS_ID = 151643  # <|endoftext|>
QWEN3_EOS_ID = 151645  # <|im_end|>
EMBED_INIT_STD = 0.02  # transformers' initializer_range for Qwen3
# llm-compressor / transformers default shard size.
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


def _umask() -> int:
    """The process's umask, read without changing it where Linux reports it (os.umask can only be read by
    setting it, which would briefly give files another thread creates meanwhile the wrong permissions)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def save_file(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    """safetensors' ``save_file`` with the permissions of every other file written (safetensors creates the
    file 0600 whatever the umask; a checkpoint is shared data, readable like its config.json)."""
    _save_safetensors(tensors, path, metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy tokenizer and generation files that exist in ``src``."""
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def save_tensors(tensors: dict[str, torch.Tensor], dst: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Write tensors as ``model.safetensors``, or as shards plus an index when over ``max_shard_bytes``."""
    dst.mkdir(parents=True, exist_ok=True)
    for stale in [*dst.glob("*.safetensors"), dst / INDEX_FILE]:  # never mix with an older checkpoint
        stale.unlink(missing_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t.contiguous()
        size += nbytes
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(dst / SINGLE_FILE), metadata=metadata)
        return
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(dst / fname), metadata=metadata)
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    (dst / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def quantize_checkpoint(
    src: str | Path,
    dst: str | Path,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    ignore: tuple[str, ...] = (),
    float_dtype: str = "auto",
    rounding: Callable[[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> None:
    """Write a float checkpoint as compressed-tensors W8A8 in llm-compressor's layout.

    Every decoder linear becomes ``X.weight`` int8 ``[out, in]`` plus ``X.weight_scale`` ``[out, 1]`` in
    the original float dtype; embeddings, norms, biases and lm_head are copied as they are. ``ignore``: more
    linears to keep in float, by compressed-tensors pattern (a module name, or ``re:`` and a regex matched
    from the start of the name, e.g. ``re:.*mlp.down_proj``); they join ``lm_head`` in the config's
    ``ignore`` list, which vLLM reads the same way. ``float_dtype``: ``auto`` writes the float tensors
    (everything but the INT8 weights and their scales) as they are in ``src``, a dtype name converts them
    (e.g. a float32 conversion shipped in bfloat16, as the model was trained). ``rounding(module, weight)``:
    (int8 weight, scale) in place of :func:`quantize_weight`'s round-to-nearest (offline/gptq.py's GPTQ).
    """
    src, dst = Path(src), Path(dst)
    raw = read_json(src / "config.json")
    if CompressedTensorsW8A8.from_config(raw) is not None:
        raise ConfigError(f"{src / 'config.json'}: checkpoint is already quantized")
    cfg = load_model_config(src)
    reader = CheckpointReader(src)
    ignore_list = ["lm_head", *ignore]
    kept = CompressedTensorsW8A8(targets=("Linear",), ignore=tuple(ignore_list), format="int-quantized")
    linear_modules = {
        f"model.layers.{i}.{name}": shape
        for i in range(cfg.num_layers)
        for name, shape in linear_shapes(cfg).items()
        if kept.is_quantized(f"model.layers.{i}.{name}")
    }
    if ignore and len(linear_modules) == cfg.num_layers * len(linear_shapes(cfg)):
        raise ConfigError(
            f"--ignore {list(ignore)} matches no linear module (names look like "
            "model.layers.0.mlp.down_proj; a regex needs the re: prefix)"
        )
    out: dict[str, torch.Tensor] = {}
    for name in tqdm(reader.keys(), desc="quantizing to INT8", unit="tensor", disable=None):
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in linear_modules:
            w = reader.get(name, linear_modules[module], tuple(set(FLOAT_DTYPES.values())))
            q, scale = quantize_weight(w) if rounding is None else rounding(module, w)
            out[name] = q
            out[f"{module}.weight_scale"] = scale.reshape(-1, 1)
        else:
            t = reader.get(name)
            out[name] = t.to(FLOAT_DTYPES[float_dtype]) if float_dtype != "auto" and t.is_floating_point() else t
    missing = [m for m in linear_modules if f"{m}.weight" not in out]
    if missing:
        raise ConfigError(f"{src}: missing linear weights, e.g. {missing[0]}.weight")
    save_tensors(out, dst, max_shard_bytes)
    transforms = (raw.get("quantization_config") or {}).get("transform_config")
    raw["quantization_config"] = CompressedTensorsW8A8.config_block(ignore=ignore_list)
    if transforms:  # a rotated checkpoint (offline/rotate.py) keeps saying what runs online
        raw["quantization_config"]["transform_config"] = transforms
    if float_dtype != "auto":
        raw["torch_dtype" if "torch_dtype" in raw else "dtype"] = float_dtype
    (dst / "config.json").write_text(json.dumps(raw, indent=2))
    copy_side_files(src, dst)


@dataclass(frozen=True)
class RandomModelSpec:
    """Shape of a random Qwen3 test model. Defaults are tiny; vocab matches the real Qwen3 tokenizer."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 128
    vocab_size: int = 151936
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 4096
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    dtype: str = "bfloat16"
    seed: int = 0

    def config_dict(self) -> dict[str, Any]:
        return {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "attention_bias": False,
            "attention_dropout": 0.0,
            # Qwen3's ids; only meaningful when the vocabulary is the real one.
            "bos_token_id": QWEN3_BOS_ID if self.vocab_size > QWEN3_BOS_ID else None,
            "eos_token_id": QWEN3_EOS_ID if self.vocab_size > QWEN3_EOS_ID else None,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "max_window_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_hidden_layers": self.num_layers,
            "num_key_value_heads": self.num_kv_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": None,
            "rope_theta": self.rope_theta,
            "sliding_window": None,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": self.dtype,
            "use_cache": True,
            "use_sliding_window": False,
            "vocab_size": self.vocab_size,
        }


def random_qwen3_tensors(spec: RandomModelSpec) -> dict[str, torch.Tensor]:
    """Deterministic random weights at the spec's shapes (fan-in scaled, so activations stay O(1))."""
    g = torch.Generator().manual_seed(spec.seed)
    dtype = FLOAT_DTYPES[spec.dtype]
    cfg = load_model_config_from_spec(spec)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    def norm_weight(n: int) -> torch.Tensor:
        return (1.0 + 0.1 * torch.randn(n, generator=g)).to(dtype)

    # A small embedding (as in real initialisation) lets the layers, not the input token, steer the
    # output; otherwise a tied random model just repeats its input.
    t: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": normal(spec.vocab_size, spec.hidden_size, std=EMBED_INIT_STD)
    }
    for i in range(spec.num_layers):
        p = f"model.layers.{i}"
        t[f"{p}.input_layernorm.weight"] = norm_weight(spec.hidden_size)
        t[f"{p}.post_attention_layernorm.weight"] = norm_weight(spec.hidden_size)
        t[f"{p}.self_attn.q_norm.weight"] = norm_weight(spec.head_dim)
        t[f"{p}.self_attn.k_norm.weight"] = norm_weight(spec.head_dim)
        for name, (out_f, in_f) in linear_shapes(cfg).items():
            t[f"{p}.{name}.weight"] = normal(out_f, in_f, std=in_f**-0.5)
    t["model.norm.weight"] = norm_weight(spec.hidden_size)
    if not spec.tie_word_embeddings:
        t["lm_head.weight"] = normal(spec.vocab_size, spec.hidden_size, std=spec.hidden_size**-0.5)
    return t


def load_model_config_from_spec(spec: RandomModelSpec) -> ModelConfig:
    """The typed config a random checkpoint of this spec will have."""
    return ModelConfig.from_dict(spec.config_dict(), source="RandomModelSpec")


def write_random_qwen3(
    dst: str | Path,
    spec: RandomModelSpec = RandomModelSpec(),
    quantized: bool = False,
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """Write a random Qwen3 checkpoint (float, or compressed-tensors W8A8 when ``quantized``).

    ``tokenizer_dir`` (e.g. :func:`loaders.assets.qwen3_tokenizer_dir`) supplies tokenizer and generation files.
    """
    dst = Path(dst)
    float_dir = dst if not quantized else dst.with_name(dst.name + ".float-tmp")
    float_dir.mkdir(parents=True, exist_ok=True)
    save_tensors(random_qwen3_tensors(spec), float_dir, max_shard_bytes)
    (float_dir / "config.json").write_text(json.dumps(spec.config_dict(), indent=2))
    if tokenizer_dir is not None:
        copy_side_files(Path(tokenizer_dir), float_dir)
    if quantized:
        quantize_checkpoint(float_dir, dst, max_shard_bytes)
        shutil.rmtree(float_dir)
    return dst


class ShardWriter:
    """Writes tensors into ``model-0000i-of-0000n.safetensors`` shards as they come, holding at most one shard
    in memory; :meth:`close` renames the shards with their final count and writes the index."""

    def __init__(self, dst: Path, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.dst, self.max_shard_bytes = dst, max_shard_bytes
        dst.mkdir(parents=True, exist_ok=True)
        for stale in [*dst.glob("*.safetensors"), dst / INDEX_FILE]:
            stale.unlink(missing_ok=True)
        self._shard: dict[str, torch.Tensor] = {}
        self._size = 0
        self._files: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self._shard and self._size + nbytes > self.max_shard_bytes:
            self._flush()
        self._shard[name] = t.contiguous()
        self._size += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        path = self.dst / f"shard-{len(self._files) + 1:05d}.tmp"
        save_file(self._shard, str(path), metadata={"format": "pt"})
        self._files.append((path, list(self._shard)))
        self._shard, self._size = {}, 0

    def close(self) -> None:
        if self._shard:
            self._flush()
        weight_map = {}
        for i, (path, names) in enumerate(self._files, start=1):
            final = f"model-{i:05d}-of-{len(self._files):05d}.safetensors"
            path.rename(self.dst / final)
            weight_map.update((name, final) for name in names)
        (self.dst / INDEX_FILE).write_text(
            json.dumps({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}, indent=2)
        )


def write_random_qwen3_w8a8_streaming(
    dst: str | Path,
    spec: RandomModelSpec,
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> Path:
    """A random compressed-tensors W8A8 Qwen3 checkpoint of any size, written one tensor at a time: each linear
    is drawn in float and quantized on its own (the same distribution and rounding as
    :func:`write_random_qwen3`), so memory holds at most one shard, never a float copy of the model (a
    Qwen3-14B shape is about 16 GB on disk)."""
    dst = Path(dst)
    g = torch.Generator().manual_seed(spec.seed)
    dtype = FLOAT_DTYPES[spec.dtype]
    cfg = load_model_config_from_spec(spec)
    out = ShardWriter(dst, max_shard_bytes)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    def norm_weight(n: int) -> torch.Tensor:
        return (1.0 + 0.1 * torch.randn(n, generator=g)).to(dtype)

    out.add("model.embed_tokens.weight", normal(spec.vocab_size, spec.hidden_size, std=EMBED_INIT_STD))
    for i in range(spec.num_layers):
        p = f"model.layers.{i}"
        out.add(f"{p}.input_layernorm.weight", norm_weight(spec.hidden_size))
        out.add(f"{p}.post_attention_layernorm.weight", norm_weight(spec.hidden_size))
        out.add(f"{p}.self_attn.q_norm.weight", norm_weight(spec.head_dim))
        out.add(f"{p}.self_attn.k_norm.weight", norm_weight(spec.head_dim))
        for name, (out_f, in_f) in linear_shapes(cfg).items():
            q, scale = quantize_weight(normal(out_f, in_f, std=in_f**-0.5))
            out.add(f"{p}.{name}.weight", q)
            out.add(f"{p}.{name}.weight_scale", scale.reshape(-1, 1))
    out.add("model.norm.weight", norm_weight(spec.hidden_size))
    if not spec.tie_word_embeddings:
        out.add("lm_head.weight", normal(spec.vocab_size, spec.hidden_size, std=spec.hidden_size**-0.5))
    out.close()
    config = spec.config_dict()
    config["quantization_config"] = CompressedTensorsW8A8.config_block(ignore=["lm_head"])
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer_dir is not None:
        copy_side_files(Path(tokenizer_dir), dst)
    return dst
