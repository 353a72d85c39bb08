"""A model directory checked before anything loads: every file the engine and the worker will read, each
problem one ConfigError or CheckpointError naming the file (the CLI prints it as one ``error:`` line)."""

from __future__ import annotations

import json
from pathlib import Path

from engine.chat_template import ChatTemplate, ChatTemplateError
from engine.tokenizer import load_tokenizer
from loaders.checkpoint import CheckpointReader
from loaders.config import ConfigError, load_model_config

# JSON files besides config.json that the engine reads where present.
OPTIONAL_JSON_FILES = (
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt")


def check_model_dir(model_dir: str | Path, tokenizer_impl: str = "auto", chat_template: str | None = None) -> list[str]:
    """Check ``model_dir`` as serve and generate will read it: config.json, the other JSON files, the tokenizer,
    the weights (the index and every shard's header: present, parseable, tensors inside the file) and the chat
    template (``chat_template``: vLLM's ``--chat-template`` override). Raises on the first problem; returns
    warnings (a model without a chat template can still serve completions)."""
    model_dir = Path(model_dir)
    load_model_config(model_dir)
    for name in OPTIONAL_JSON_FILES:
        path = model_dir / name
        if path.is_file():
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ConfigError(f"{path}: cannot parse JSON: {e}") from None
    _check_tokenizer(model_dir, tokenizer_impl)
    CheckpointReader(model_dir).close()
    try:
        template = ChatTemplate.from_model_dir(model_dir, chat_template)
    except ChatTemplateError as e:
        raise ConfigError(str(e)) from None
    if template is None:
        return [
            f"{model_dir}: the model has no chat template (no chat_template.jinja, none in tokenizer_config.json): "
            "/v1/chat/completions will answer 400; give --chat-template FILE, or use /v1/completions"
        ]
    return []


def _check_tokenizer(model_dir: Path, impl: str) -> None:
    present = [name for name in TOKENIZER_FILES if (model_dir / name).is_file()]
    if "tokenizer.json" not in present and not {"vocab.json", "merges.txt"} <= set(present):
        found = f" (found only {', '.join(present)})" if present else ""
        raise ConfigError(f"{model_dir}: no tokenizer: needs tokenizer.json, or vocab.json and merges.txt{found}")
    try:
        load_tokenizer(model_dir, impl)
    except Exception as e:  # the tokenizers library raises plain Exceptions for a file it cannot read
        path = model_dir / ("tokenizer.json" if "tokenizer.json" in present else "vocab.json")
        raise ConfigError(f"{path}: cannot load the tokenizer ({type(e).__name__}: {e})") from None
