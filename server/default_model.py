"""The built-in default model: a small random-weight Qwen3 in A8W8, made on first use.

Its weights are random: it exists to show the server working on a fresh machine with no download.
It is generated deterministically (fixed seed) with the real Qwen3 tokenizer and chat template.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from loaders.assets import qwen3_tokenizer_dir
from loaders.writer import RandomModelSpec, write_random_qwen3

DEFAULT_MODEL_NAME = "qwen3-random-a8w8"
# Bump when the spec or the writer changes, so stale caches are not reused.
DEFAULT_MODEL_VERSION = "v1"
DEFAULT_MODEL_SPEC = RandomModelSpec(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
                                     intermediate_size=768, max_position_embeddings=8192, seed=0)
CACHE_ENV = "A8W8_SERVE_CACHE"  # documented override of the cache directory


def cache_dir() -> Path:
    base = os.environ.get(CACHE_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache",
                                                       "a8w8-serve")
    return Path(base)


def ensure_default_model() -> Path:
    """Path of the default model, writing it (atomically) if it is not there yet."""
    target = cache_dir() / f"{DEFAULT_MODEL_NAME}-{DEFAULT_MODEL_VERSION}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    write_random_qwen3(tmp, DEFAULT_MODEL_SPEC, quantized=True, tokenizer_dir=qwen3_tokenizer_dir())
    try:
        tmp.rename(target)
    except OSError:  # another process won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return target
