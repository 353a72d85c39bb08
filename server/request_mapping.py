"""Requests -> what the engine takes: prompts (chat template, token ids), sampling parameters, grammars, and the
checks that refuse a request before it costs anything (each a 400 naming the field at fault)."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterator
from typing import Any

from fastapi import Request
from pydantic import ValidationError

from engine.sampling_params import InvalidRequest, PromptTooLong, SamplingParams, StructuredOutput
from engine.structured_output import GrammarBusy, GrammarError, ThinkTokens
from server.constraints import OutputConstraint
from server.context import ServingContext
from server.errors import RETRY_AFTER_SECONDS, APIError
from server.reasoning import THINK_END, THINK_START
from server.schemas import ChatCompletionRequest, ChatMessage, SamplingFields
from server.streaming import wait_for_disconnect
from server.tool_calls import CALL_CLOSE, CALL_OPEN, messages_without_tool_support


class ClientDisconnected(Exception):
    """The client left while its request was being prepared (its grammar compiled): nothing to answer."""


async def structured_output(
    ctx: ServingContext, constraint: OutputConstraint | None, request: Request
) -> StructuredOutput | None:
    """The constraint compiled on the grammar compiler's own threads (never the ones that tokenize other
    requests). A grammar that does not compile, or is over its budget, is a 400 naming the field it came from;
    too many grammars waiting is a 429. If the client leaves meanwhile, a compile that has not started is
    dropped and ClientDisconnected raised."""
    if constraint is None:
        return None
    try:
        future = ctx.engine.compile_grammar(constraint.grammar)
    except GrammarError as e:
        raise APIError(400, f"{constraint.param}: {e}", constraint.param) from None
    except GrammarBusy as e:
        raise APIError(429, f"{e}; retry later", constraint.param, {"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
    compiled = asyncio.wrap_future(future)
    listener = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({compiled, listener}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        listener.cancel()
    if compiled not in done:
        future.cancel()  # (a compile already running finishes, within its CPU budget, and is cached)
        raise ClientDisconnected
    try:
        return StructuredOutput(compiled.result())
    except GrammarError as e:
        raise APIError(400, f"{constraint.param}: {e}", constraint.param) from None


def think_tokens(ctx: ServingContext) -> ThinkTokens | None:
    """The model's ``<think>`` / ``</think>`` token ids, if it thinks in them (else a constrained answer starts at
    once)."""
    tokenizer = ctx.engine.tokenizer
    open_id, close_id = tokenizer.token_to_id(THINK_START), tokenizer.token_to_id(THINK_END)
    return ThinkTokens(open_id, close_id) if ctx.reasoning and None not in (open_id, close_id) else None


@contextlib.contextmanager
def input_named(name: str, max_tokens_param: str = "max_tokens"):
    """A too-long prompt raised inside is a 400 naming the field at fault: this endpoint's input ("messages"
    or "prompt") when the prompt alone does not fit, else the field that asked for the completion's length."""
    try:
        yield
    except PromptTooLong as e:
        fits_alone = not e.at_least and e.prompt_tokens < e.max_model_len
        raise APIError(400, e.describe(name), max_tokens_param if fits_alone else name) from None


# Logprob entries (a token's own and its top_logprobs) one non-streamed response may hold: at about 80 bytes
# each in JSON, 262144 make a body of some 20 MB. n = 16 answers of 3000 tokens with top_logprobs 20 made one of
# 85 MB, built and sent as one piece. A streamed response sends them as they come, so it is not bounded.
MAX_LOGPROB_ENTRIES = 262_144


def refuse_a_huge_logprobs_body(
    ctx: ServingContext, stream: bool, n: int, prompt_lengths: list[int], max_tokens: int | None, top: int | None
) -> None:
    """A 400 naming ``param`` for a non-streamed request whose logprobs could exceed :data:`MAX_LOGPROB_ENTRIES`."""
    if stream or top is None:
        return
    tokens = sum(max_tokens or max(ctx.engine.max_model_len - p, 0) for p in prompt_lengths)
    entries = n * tokens * (1 + top)
    if entries > MAX_LOGPROB_ENTRIES:
        raise APIError(
            400,
            f"this request could return {entries} logprob entries in one response (n {n} x {tokens} tokens x "
            f"{1 + top}), over the limit of {MAX_LOGPROB_ENTRIES} for a response that is not streamed: stream "
            "it (stream: true), or ask for fewer tokens, choices or top logprobs",
            "logprobs",
        )


def refuse_stream_options_without_stream(req: SamplingFields) -> None:
    if req.stream_options is not None and not req.stream:
        raise APIError(400, "stream_options can only be given with stream=true", "stream_options")


def sampling_params(
    ctx: ServingContext, req: SamplingFields, max_tokens: int | None, logprobs: int | None
) -> SamplingParams:
    """Model defaults (generation_config.json), then the request's fields."""
    defaults = ctx.engine.generation_defaults
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if not all(k.lstrip("-").isdigit() for k in req.logit_bias or {}):
        raise APIError(400, "logit_bias keys must be token ids", "logit_bias")
    logit_bias = {int(k): float(v) for k, v in (req.logit_bias or {}).items()}

    def pick(value, default, fallback):
        return value if value is not None else (default if default is not None else fallback)

    return SamplingParams(
        n=req.n,
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        temperature=pick(req.temperature, defaults.temperature, 1.0),
        top_p=pick(req.top_p, defaults.top_p, 1.0),
        top_k=pick(req.top_k, defaults.top_k, 0),
        min_p=pick(req.min_p, defaults.min_p, 0.0),
        seed=req.seed,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=pick(req.repetition_penalty, defaults.repetition_penalty, 1.0),
        logit_bias=logit_bias,
        stop=stop,
        stop_token_ids=list(req.stop_token_ids or []),
        include_stop_str_in_output=req.include_stop_str_in_output,
        ignore_eos=req.ignore_eos,
        logprobs=logprobs,
        skip_special_tokens=req.skip_special_tokens,
    )


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as the template expects them; content parts must be text. Only an assistant message may lack
    content (OpenAI's rule: its tool calls may be all it says)."""
    out = []
    for i, m in enumerate(messages):
        if m.content is None and m.role != "assistant":
            raise APIError(400, f"messages[{i}].content is required for a {m.role} message", "messages")
        d = m.model_dump(exclude_none=True)
        if m.role == "developer":
            d["role"] = "system"
        if isinstance(m.content, list):
            texts = []
            for part in m.content:
                if part.get("type") != "text":
                    raise APIError(
                        400,
                        f"messages[{i}].content: only text parts are supported, got {part.get('type')!r}",
                        "messages",
                    )
                texts.append(str(part.get("text", "")))
            d["content"] = "".join(texts)
        out.append(d)
    return out


# What the template gets from the request's own fields: chat_template_kwargs may not set these.
RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "tools", "add_generation_prompt", "continue_final_message"})


def chat_prompt_ids(
    ctx: ServingContext,
    messages: list[ChatMessage],
    add_generation_prompt: bool,
    kwargs: dict[str, Any] | None,
    continue_final_message: bool = False,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """Render the chat template and tokenize. CPU work in proportion to the input: run it in a thread.
    ``continue_final_message`` leaves the last message open for the model to continue (vLLM's and
    transformers' meaning: no generation prompt after it, so it cannot be combined with one). ``tools``
    reach the template; a template that renders no tools gets them as system instructions instead."""
    template = ctx.engine.chat_template
    if template is None:
        raise APIError(400, "this model has no chat template; use /v1/completions", "messages")
    reserved = sorted(set(kwargs or ()) & RESERVED_TEMPLATE_KWARGS)
    if reserved:
        raise APIError(
            400,
            f"chat_template_kwargs cannot set {', '.join(reserved)}: the request's own fields set "
            f"{'it' if len(reserved) == 1 else 'them'}",
            f"chat_template_kwargs.{reserved[0]}",
        )
    if continue_final_message and add_generation_prompt:
        raise APIError(
            400,
            "continue_final_message and add_generation_prompt cannot both be true: set "
            "add_generation_prompt to false to continue the final message",
            "continue_final_message",
        )
    dicts = message_dicts(messages)
    if not template.renders_tools and (tools or any(m.get("tool_calls") or m["role"] == "tool" for m in dicts)):
        dicts, tools = messages_without_tool_support(dicts, tools), None
    text = template.render(
        dicts,
        add_generation_prompt=add_generation_prompt,
        continue_final_message=continue_final_message,
        tools=tools,
        **(kwargs or {}),
    )
    return ctx.engine.encode_prompt(text)


def call_token_ids(ctx: ServingContext) -> tuple[int | None, int | None]:
    """The tokenizer's ``<tool_call>`` and ``</tool_call>`` tokens, where it has them (Qwen3 does)."""
    tok = ctx.engine.tokenizer
    return tok.token_to_id(CALL_OPEN), tok.token_to_id(CALL_CLOSE)


def completion_prompts(ctx: ServingContext, prompt) -> list[tuple[str, list[int]]]:
    """(text, token ids) per prompt; a prompt may be text or token ids, one or a list. CPU work in
    proportion to the input: run it in a thread."""
    engine = ctx.engine

    def from_ids(ids: list[int]) -> tuple[str, list[int]]:
        return engine.prompt_from_ids(ids), list(ids)

    if isinstance(prompt, str):
        return [(prompt, engine.encode_prompt(prompt))]
    if not prompt:
        raise InvalidRequest("prompt is empty", "prompt")
    if all(isinstance(x, int) for x in prompt):
        return [from_ids(prompt)]
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append((p, engine.encode_prompt(p)))
        elif isinstance(p, list) and all(isinstance(x, int) for x in p):
            out.append(from_ids(p))
        else:
            raise InvalidRequest("prompt must be a string, a list of strings, or token id lists", "prompt")
    return out


# ---- another API's request on the chat path (the Responses and Messages APIs) --------------------------------
def validated_chat_request(fields: dict[str, Any], messages_param: str) -> ChatCompletionRequest:
    """The chat completion request another API's request maps to (fields left None are left out); what chat's
    model refuses is a 400 naming the field, ``messages_param`` for the messages."""
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as e:
        first = e.errors()[0]
        field = str(first.get("loc", ("messages",))[0])
        param = messages_param if field == "messages" else field
        raise APIError(400, f"{param}: {first.get('msg', 'invalid')}", param) from None


@contextlib.contextmanager
def renamed_chat_errors(renames: dict[str, str]) -> Iterator[None]:
    """Errors raised on the chat path, with the chat fields they name renamed to the fields of the API the client
    used: the ``param``, and in the message only names no prose word can be (those with an underscore, whole),
    so that a rename of ``stop`` or ``messages`` never rewrites a sentence."""
    try:
        with input_named("messages", "max_completion_tokens"):
            yield
    except APIError as e:
        message = e.message
        for chat_name, ours in renames.items():
            if "_" in chat_name and "." not in chat_name:
                message = re.sub(rf"\b{re.escape(chat_name)}\b", ours, message)
        raise APIError(e.status, message, renames.get(e.param or "", e.param), e.headers) from None
