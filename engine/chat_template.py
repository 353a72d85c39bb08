"""Render a model's chat template with jinja2 exactly as transformers does."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Appended to the final message for continue_final_message, then cut off the rendering with all that follows
# (transformers' method, so both leave the same text open).
CONTINUE_FINAL_MESSAGE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


class ChatTemplateError(ValueError):
    """The template is missing, or raised while rendering these messages (a client error)."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=8)
def _compile(source: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def read_template_override(value: str) -> tuple[str, str]:
    """``--chat-template``'s value as (template source, where it came from): a file's text, or the value itself
    when it is a template (it holds ``{{`` or ``{%``) rather than a path."""
    path = Path(value)
    if path.is_file():
        return path.read_text(encoding="utf-8"), str(path)
    if "{{" in value or "{%" in value:
        return value, "--chat-template"
    raise ChatTemplateError(f"--chat-template {value}: no such file (give a Jinja file, or the template itself)")


class ChatTemplate:
    """A compiled chat template plus the special-token strings it may reference."""

    def __init__(self, source: str, special_tokens: dict[str, str] | None = None):
        self.source = source
        self.special_tokens = special_tokens or {}
        self._template = _compile(source)
        # Whether the template renders the ``tools`` it is given (Qwen3's does; SmolLM2's ignores them).
        self.renders_tools = "tools" in source

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, override: str | None = None) -> ChatTemplate | None:
        """The template from ``chat_template.jinja`` or ``tokenizer_config.json``, or ``override`` (vLLM's
        ``--chat-template``: a file, or the template itself); None if there is none. A template that does not
        compile is a ChatTemplateError naming where it came from."""
        model_dir = Path(model_dir)
        cfg_path = model_dir / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.is_file() else {}
        source, where = None, str(cfg_path)
        if override is not None:
            source, where = read_template_override(override)
        elif (model_dir / "chat_template.jinja").is_file():
            where = str(model_dir / "chat_template.jinja")
            source = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
        elif isinstance(cfg.get("chat_template"), str):
            source = cfg["chat_template"]
        elif isinstance(cfg.get("chat_template"), list):  # named templates: use "default"
            source = next((t["template"] for t in cfg["chat_template"] if t.get("name") == "default"), None)
        if source is None:
            return None
        specials = {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = cfg.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if value is not None:
                specials[key] = value
        try:
            return cls(source, specials)
        except TemplateError as e:
            raise ChatTemplateError(f"{where}: the chat template does not compile ({e})") from None

    def render(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> str:
        """Render ``messages``; extra keyword arguments (e.g. ``enable_thinking``) reach the template.
        ``continue_final_message`` leaves the last message open (nothing the template adds after its content,
        such as ``<|im_end|>``), as transformers' ``apply_chat_template(..., continue_final_message=True)``."""
        final = None
        if continue_final_message:
            final = messages[-1].get("content") if messages else None
            if not isinstance(final, str):
                raise ChatTemplateError("continue_final_message: the final message has no text content to continue")
            messages = [*messages[:-1], {**messages[-1], "content": final + CONTINUE_FINAL_MESSAGE_TAG}]
        try:
            text = self._template.render(
                messages=messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                **{**self.special_tokens, **kwargs},  # (a request may set bos_token and the like)
            )
        except ChatTemplateError:
            raise
        except (TemplateError, TypeError, AttributeError, KeyError, IndexError) as e:
            raise ChatTemplateError(f"chat template failed on these messages: {e}") from None
        if final is None:
            return text
        tag = CONTINUE_FINAL_MESSAGE_TAG.strip()
        if final.strip() not in text or tag not in text:
            raise ChatTemplateError(
                "continue_final_message: this chat template drops part of the final message, so it cannot be continued"
            )
        cut = text.rindex(tag)
        if text[cut : cut + len(CONTINUE_FINAL_MESSAGE_TAG)] == CONTINUE_FINAL_MESSAGE_TAG:
            return text[:cut]
        return text[:cut].rstrip()  # the template trimmed the message's trailing space, and so the tag's
