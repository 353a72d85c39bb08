"""Convert a llama.cpp GGUF (Llama architecture) into an ordinary Hugging Face checkpoint directory.

Tensors are dequantized with the ``gguf`` package to float32 (Q4_1/Q8_0 values are exact in fp32),
llama.cpp's Q/K row permutation for RoPE is undone, and the tokenizer is rebuilt with the
``tokenizers`` library from the GGUF vocabulary and merges, with the pre-tokenizer the GGUF names.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from loaders.config import ConfigError
from loaders.writer import save_tensors

# GGUF token types (llama.cpp's llama_token_type)
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_tensor_name(gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    base, _, suffix = gguf_name.rpartition(".")
    parts = base.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    raise ConfigError(f"GGUF tensor {gguf_name!r} has no Llama counterpart")


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's HF->GGUF converter does to q/k rows (interleaves the two RoPE halves)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of :func:`llama_cpp_permute`: back to rotate-half (HF) row order."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# llama.cpp's sampling metadata (``general.sampling.*``, written by its converter from a model's own
# generation_config.json) -> the generation_config.json field each one becomes.
GGUF_SAMPLING_FIELDS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_k": "top_k",
    "general.sampling.top_p": "top_p",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repetition_penalty",
}


def gguf_sampling(reader) -> dict[str, Any]:
    """The sampling defaults a GGUF file carries, as generation_config.json fields (none: empty)."""
    out = {}
    for key, name in GGUF_SAMPLING_FIELDS.items():
        value = _field(reader, key)
        if value is not None:
            out[name] = int(value) if name == "top_k" else float(value)
    return out


def _field(reader, key: str, default: Any = None) -> Any:
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def build_tokenizer_json(tokens: list[str], types: list[int], merges: list[str], pre: str):
    """A ``tokenizers.Tokenizer`` for a GPT-2 style byte-level BPE GGUF vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # llama.cpp: digits one by one, then the GPT-2 regex
        pre_tok = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("gpt2", "default"):
        pre_tok = byte_level
    else:
        raise ConfigError(f"GGUF tokenizer.ggml.pre={pre!r} is not supported (smollm, gpt2)")
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges])
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tok
    tok.decoder = decoders.ByteLevel()
    added = [
        AddedToken(t, special=ty == TOKEN_TYPE_CONTROL, normalized=False)
        for t, ty in zip(tokens, types)
        if ty in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)
    ]
    tok.add_tokens([a for a in added if not a.special])
    tok.add_special_tokens([a for a in added if a.special])
    return tok


def convert_gguf(
    src: str | Path,
    dst: str | Path,
    dtype: torch.dtype = torch.float32,
    sampling_defaults: dict[str, Any] | None = None,
) -> Path:
    """Write ``dst`` as a Hugging Face LlamaForCausalLM checkpoint from the GGUF file ``src``. Its
    generation_config.json gets the file's sampling metadata; ``sampling_defaults`` (e.g. a model card's
    recommendation) fill the fields the file does not set."""
    from gguf import GGUFReader
    from gguf.quants import dequantize

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ConfigError(f"{src}: no such file")
    try:
        # The reader maps the file and parses every header and tensor record up front: a file that is not
        # GGUF, or is cut short, fails here (with whatever the parser hit: a bad magic, an index past the end).
        reader = GGUFReader(str(src))
    except (ValueError, IndexError, KeyError, struct.error, OSError) as e:
        raise ConfigError(
            f"{src}: not a readable GGUF file ({type(e).__name__}: {e}); is it a whole GGUF file?"
        ) from None
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ConfigError(f"{src}: general.architecture={arch!r}; only 'llama' GGUF files are converted")
    n_head = int(_field(reader, "llama.attention.head_count"))
    n_kv = int(_field(reader, "llama.attention.head_count_kv", n_head))
    hidden = int(_field(reader, "llama.embedding_length"))
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type"))
    tensors: dict[str, torch.Tensor] = {}
    for t in tqdm(reader.tensors, desc=f"converting {src.name}", unit="tensor", disable=None):
        shape = tuple(int(x) for x in reversed(t.shape))  # GGUF lists ne0 (the input dim) first
        try:
            arr = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        except (ValueError, IndexError) as e:
            raise ConfigError(
                f"{src}: tensor {t.name!r}: cannot read its data for shape {shape} ({e}); is the file truncated?"
            ) from None
        name = hf_tensor_name(t.name)
        if name.endswith("self_attn.q_proj.weight"):
            arr = llama_cpp_unpermute(arr, n_head)
        elif name.endswith("self_attn.k_proj.weight"):
            arr = llama_cpp_unpermute(arr, n_kv)
        tensors[name] = torch.from_numpy(np.array(arr, copy=True)).to(dtype)
    tied = "lm_head.weight" not in tensors
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    unk = _field(reader, "tokenizer.ggml.unknown_token_id")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": hidden // n_head,
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        "vocab_size": len(tokens),
        "tie_word_embeddings": tied,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    dst.mkdir(parents=True, exist_ok=True)
    save_tensors(tensors, dst)
    (dst / "config.json").write_text(json.dumps(config, indent=2))

    tok = build_tokenizer_json(
        tokens,
        types,
        list(_field(reader, "tokenizer.ggml.merges")),
        str(_field(reader, "tokenizer.ggml.pre", "default")),
    )
    tok.save(str(dst / "tokenizer.json"))
    name_of = lambda i: None if i is None else tokens[int(i)]  # noqa: E731
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "bos_token": name_of(bos),
        "eos_token": name_of(eos),
        "pad_token": name_of(pad),
        "unk_token": name_of(unk),
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "special": ty == TOKEN_TYPE_CONTROL,
                "normalized": False,
                "lstrip": False,
                "rstrip": False,
                "single_word": False,
            }
            for i, (t, ty) in enumerate(zip(tokens, types))
            if ty in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)
        },
    }
    template = _field(reader, "tokenizer.chat_template")
    if template:
        tok_cfg["chat_template"] = template
    (dst / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False))
    sampling = {**(sampling_defaults or {}), **gguf_sampling(reader)}
    if sampling and sampling.get("temperature", 1.0) > 0:
        sampling["do_sample"] = True  # transformers samples only with it; a temperature alone means greedy there
    (dst / "generation_config.json").write_text(
        json.dumps({"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad, **sampling}, indent=2)
    )
    return dst
