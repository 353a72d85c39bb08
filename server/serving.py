"""``/v1/chat/completions`` and ``/v1/completions``: request -> engine -> OpenAI responses (SSE or JSON)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from sse_starlette.sse import EventSourceResponse

from engine.async_engine import AsyncEngine, RequestOutput, RequestStream
from engine.sampling_params import InvalidRequest, PromptTooLong, SamplingParams, StructuredOutput
from engine.sequence import TokenLogprob
from engine.structured_output import GrammarBusy, GrammarError, ThinkTokens
from server.constraints import OutputConstraint, answer_constraint, chat_constraint, tool_use
from server.errors import RETRY_AFTER_SECONDS, APIError, error_body, to_api_error
from server.guard import USAGE_STATE_KEY
from server.metrics import ServerMetrics
from server.reasoning import THINK_END, THINK_START, ReasoningParser
from server.responses import (
    ChatCompletion,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionMessage,
    ChatCompletionTokenLogprob,
    ChoiceDelta,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionUsage,
    ResponseBody,
    TopLogprob,
)
from server.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, SamplingFields
from server.tool_calls import CALL_CLOSE, CALL_OPEN, ToolCallDelta, ToolCallParser, messages_without_tool_support

DONE = "[DONE]"
StreamChunk = ChatCompletionChunk | CompletionChunk


def json_response(body: ResponseBody, status_code: int = 200) -> Response:
    """``body`` serialized by its model (compact JSON, UTF-8)."""
    return Response(body.serialized(), status_code=status_code, media_type="application/json")


@dataclass
class ServingContext:
    engine: AsyncEngine
    metrics: ServerMetrics
    served_model_names: list[str]
    reasoning: bool  # the model's template thinks in <think>...</think>
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]

    def check_model(self, name: str | None) -> str:
        if name is not None and name not in self.served_model_names:
            raise APIError(404, f"The model `{name}` does not exist.", "model")
        return self.model_name


# ------------------------------------------------------------------------------------------------
# request -> sampling params
# ------------------------------------------------------------------------------------------------
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
        future = ctx.engine.core.grammars.submit(constraint.grammar)
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
    return ctx.engine.core.encode_prompt(text)


def call_token_ids(ctx: ServingContext) -> tuple[int | None, int | None]:
    """The tokenizer's ``<tool_call>`` and ``</tool_call>`` tokens, where it has them (Qwen3 does)."""
    tok = ctx.engine.tokenizer
    return tok.token_to_id(CALL_OPEN), tok.token_to_id(CALL_CLOSE)


# ------------------------------------------------------------------------------------------------
# helpers for both endpoints
# ------------------------------------------------------------------------------------------------
async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so the next message is a disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_unless_disconnected(request: Request, coro, metrics: ServerMetrics) -> Any:
    """Await ``coro``; if the client disconnects first, cancel it (which aborts its requests)."""
    task = asyncio.ensure_future(coro)
    listener = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass
        metrics.observe_aborted()
        return Response(status_code=499)
    finally:
        listener.cancel()
        if not task.done():
            task.cancel()


async def merge_streams(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' outputs as they come: (stream index, output)."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    sentinel = object()

    async def pump(i: int, s: RequestStream) -> None:
        try:
            async for out in s:
                await queue.put((i, out))
        except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
            await queue.put((i, e))
        finally:
            await queue.put((i, sentinel))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(streams)
    try:
        while remaining:
            i, item = await queue.get()
            if item is sentinel:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


def note_usage(request: Request, prompt_tokens: int, choices: list[ChoiceState]) -> None:
    """Leave the request's token counts for its log line (server/guard.py)."""
    setattr(request.state, USAGE_STATE_KEY, (prompt_tokens, sum(c.completion_tokens for c in choices)))


def sse_response(
    ctx: ServingContext,
    request_ids: list[str],
    opening: list[StreamChunk],
    outputs: AsyncIterator[tuple[int, RequestOutput]],
    chunk_of: Callable[[int, RequestOutput], StreamChunk | None],
    closing: Callable[[], StreamChunk | None],
) -> EventSourceResponse:
    """The SSE skeleton both streaming endpoints share: the ``opening`` events, one chunk per output (``chunk_of``
    of (prompt index, output); None: nothing to send), then ``closing()`` (the usage chunk, or None) and
    ``[DONE]``. A client that goes away aborts ``request_ids``; an error after the stream started is one data
    event (the status line has been sent)."""

    async def events() -> AsyncIterator[str]:
        try:
            for event in opening:
                yield event.serialized()
            async for p, out in outputs:
                if out.finished:
                    ctx.metrics.observe_finished(out)
                body = chunk_of(p, out)
                if body is not None:
                    yield body.serialized()
            last = closing()
            if last is not None:
                yield last.serialized()
        except (asyncio.CancelledError, GeneratorExit):
            for rid in request_ids:
                ctx.engine.abort(rid)
            ctx.metrics.observe_aborted()
            raise
        except Exception as e:
            err = to_api_error(e)
            yield json.dumps(error_body(err.status, err.message, err.param))
        yield DONE

    return EventSourceResponse(events(), ping=15)


async def _indexed(stream: RequestStream) -> AsyncIterator[tuple[int, RequestOutput]]:
    """One request's outputs as (prompt index 0, output), the shape :func:`merge_streams` gives."""
    async for out in stream:
        yield 0, out


def _token_str(ctx: ServingContext, token_id: int) -> str:
    return ctx.engine.tokenizer.decode([token_id], skip_special_tokens=False)


def chat_logprobs(ctx: ServingContext, lps: list[TokenLogprob]) -> ChoiceLogprobs:
    def entry(tid: int, lp: float) -> TopLogprob:
        s = _token_str(ctx, tid)
        return TopLogprob(token=s, logprob=lp, bytes=list(s.encode("utf-8")))

    def chosen(x: TokenLogprob) -> ChatCompletionTokenLogprob:
        top = [entry(t, lp) for t, lp in (x.top or [])]
        return ChatCompletionTokenLogprob(**dict(entry(x.token_id, x.logprob)), top_logprobs=top)

    return ChoiceLogprobs(content=[chosen(x) for x in lps])


def completion_logprobs(ctx: ServingContext, lps: list[TokenLogprob], offset: int) -> CompletionLogprobs:
    tokens = [_token_str(ctx, x.token_id) for x in lps]
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[x.logprob for x in lps],
        top_logprobs=[{_token_str(ctx, t): lp for t, lp in (x.top or [])} for x in lps],
        text_offset=offsets,
    )


@dataclass
class ChoiceState:
    text: str = ""
    reasoning: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    completion_tokens: int = 0
    cached_tokens: int = 0
    parser: ReasoningParser | None = None
    tool_parser: ToolCallParser | None = None

    def add(self, out: RequestOutput) -> tuple[str, str, list[ToolCallDelta]]:
        """Record an output; returns its (reasoning, content, tool call) deltas."""
        self.token_ids.extend(out.new_token_ids)
        self.logprobs.extend(out.new_logprobs)
        self.completion_tokens = out.completion_tokens
        self.cached_tokens = out.cached_tokens
        reasoning, content = "", out.new_text
        if self.parser is not None:
            reasoning, content = self.parser.feed(out.new_text)
            if out.finished:
                r2, c2 = self.parser.finish()
                reasoning, content = reasoning + r2, content + c2
        calls: list[ToolCallDelta] = []
        if self.tool_parser is not None:
            content, calls = self.tool_parser.feed(content)
            if out.finished:
                c2, more = self.tool_parser.finish()
                content, calls = content + c2, calls + more
        if out.finished:
            self.finish_reason = out.finish_reason
            self.stop_reason = out.stop_reason
            if self.tool_parser is not None and self.tool_parser.calls and out.finish_reason == "stop":
                self.finish_reason = "tool_calls"  # OpenAI's: the model stopped to have its calls run
        self.text += content
        self.reasoning += reasoning
        return reasoning, content, calls


# ------------------------------------------------------------------------------------------------
# chat
# ------------------------------------------------------------------------------------------------
async def create_chat_completion(ctx: ServingContext, req: ChatCompletionRequest, request: Request) -> Response:
    with input_named("messages", "max_completion_tokens" if req.max_completion_tokens else "max_tokens"):
        try:
            return await _chat_completion(ctx, req, request)
        except ClientDisconnected:
            ctx.metrics.observe_aborted()
            return Response(status_code=499)


async def _chat_completion(ctx: ServingContext, req: ChatCompletionRequest, request: Request) -> Response:
    model = ctx.check_model(req.model)
    refuse_stream_options_without_stream(req)
    use = tool_use(req)
    thinking = ctx.reasoning and (req.chat_template_kwargs or {}).get("enable_thinking", True) is not False
    constraint = chat_constraint(req, use, call_token_ids(ctx), think_tokens(ctx) if thinking else None)
    prompt_ids = await asyncio.to_thread(
        chat_prompt_ids,
        ctx,
        req.messages,
        req.add_generation_prompt,
        req.chat_template_kwargs,
        req.continue_final_message,
        use.tools if use else None,
    )
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs requires logprobs=true", "top_logprobs")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    max_tokens = req.max_completion_tokens or req.max_tokens
    default_max = ctx.engine.generation_defaults.max_new_tokens
    if max_tokens is None and default_max is not None:
        # the model's default length, cut to the context left (vLLM's rule); a prompt with no room left keeps
        # None, so it is refused for its own length
        room = ctx.engine.max_model_len - len(prompt_ids)
        max_tokens = min(default_max, room) if room > 0 else None
    params = sampling_params(ctx, req, max_tokens, logprobs)
    # every cheap check first: the grammar is compiled only for a request that will run
    ctx.engine.check_request(prompt_ids, params, req.priority)
    refuse_a_huge_logprobs_body(ctx, req.stream, params.n, [len(prompt_ids)], max_tokens, logprobs)
    params = dataclasses.replace(params, structured=await structured_output(ctx, constraint, request))
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    stream = ctx.engine.add_request(prompt_ids, params, request_id, priority=req.priority)
    choices = [
        ChoiceState(
            parser=ReasoningParser() if thinking else None, tool_parser=ToolCallParser() if use is not None else None
        )
        for _ in range(params.n)
    ]
    prompt_tokens = len(prompt_ids)

    def usage() -> CompletionUsage:
        return CompletionUsage.of(prompt_tokens, sum(c.completion_tokens for c in choices), choices[0].cached_tokens)

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def base(**kw: Any) -> ChatCompletionChunk:
            return ChatCompletionChunk(
                id=request_id, object="chat.completion.chunk", created=int(time.time()), model=model, **kw
            )

        opening = [
            base(
                choices=[
                    ChatCompletionChunkChoice(
                        index=i, delta=ChoiceDelta(role="assistant", content=""), logprobs=None, finish_reason=None
                    )
                ]
            )
            for i in range(params.n)
        ]

        def chunk_of(_: int, out: RequestOutput) -> ChatCompletionChunk | None:
            ch = choices[out.index]
            reasoning, content, calls = ch.add(out)
            delta: dict[str, Any] = {}  # only the parts this output has (unset fields are left out)
            if reasoning:
                delta.update(reasoning_content=reasoning, reasoning=reasoning)
            if content:
                delta["content"] = content
            if calls:
                delta["tool_calls"] = [c.as_model() for c in calls]
            if not delta and not out.finished and not out.new_logprobs:
                return None
            choice = ChatCompletionChunkChoice(
                index=out.index,
                delta=ChoiceDelta(**delta),
                logprobs=chat_logprobs(ctx, out.new_logprobs) if logprobs is not None else None,
                finish_reason=ch.finish_reason if out.finished else None,
                **({"stop_reason": out.stop_reason} if out.finished else {}),  # only in the last chunk
            )
            return base(choices=[choice])

        def closing() -> ChatCompletionChunk | None:
            note_usage(request, prompt_tokens, choices)
            return base(choices=[], usage=usage()) if include_usage else None

        return sse_response(ctx, [request_id], opening, _indexed(stream), chunk_of, closing)

    async def collect() -> Response:
        async for out in stream:
            choices[out.index].add(out)
            if out.finished:
                ctx.metrics.observe_finished(out)
        note_usage(request, prompt_tokens, choices)
        # (built and serialized in a thread: n long answers with logprobs make a body of many MB)
        return await asyncio.to_thread(answer)

    def answer() -> Response:
        result_choices = []
        for i, ch in enumerate(choices):
            message: dict[str, Any] = {"role": "assistant", "content": ch.text}
            if ch.tool_parser is not None and ch.tool_parser.calls:
                message.update(content=ch.text or None, tool_calls=[c.as_model() for c in ch.tool_parser.calls])
            if ch.parser is not None and ch.parser.saw_reasoning:
                message.update(reasoning_content=ch.reasoning, reasoning=ch.reasoning)
            result_choices.append(
                ChatCompletionChoice(
                    index=i,
                    message=ChatCompletionMessage(**message),
                    logprobs=chat_logprobs(ctx, ch.logprobs) if logprobs is not None else None,
                    finish_reason=ch.finish_reason,
                    stop_reason=ch.stop_reason,
                )
            )
        body = ChatCompletion(
            id=request_id,
            object="chat.completion",
            created=int(time.time()),
            model=model,
            choices=result_choices,
            usage=usage(),
        )
        return json_response(body)

    return await run_unless_disconnected(request, collect(), ctx.metrics)


# ------------------------------------------------------------------------------------------------
# completions
# ------------------------------------------------------------------------------------------------
def completion_prompts(ctx: ServingContext, prompt) -> list[tuple[str, list[int]]]:
    """(text, token ids) per prompt; a prompt may be text or token ids, one or a list. CPU work in
    proportion to the input: run it in a thread."""
    core = ctx.engine.core

    def from_ids(ids: list[int]) -> tuple[str, list[int]]:
        core.check_prompt_ids(ids)  # before decoding: ids past the vocabulary or the context never reach it
        return core.tokenizer.decode(ids), list(ids)

    if isinstance(prompt, str):
        return [(prompt, core.encode_prompt(prompt))]
    if not prompt:
        raise InvalidRequest("prompt is empty", "prompt")
    if all(isinstance(x, int) for x in prompt):
        return [from_ids(prompt)]
    out = []
    for p in prompt:
        if isinstance(p, str):
            out.append((p, core.encode_prompt(p)))
        elif isinstance(p, list) and all(isinstance(x, int) for x in p):
            out.append(from_ids(p))
        else:
            raise InvalidRequest("prompt must be a string, a list of strings, or token id lists", "prompt")
    return out


async def create_completion(ctx: ServingContext, req: CompletionRequest, request: Request) -> Response:
    with input_named("prompt"):
        try:
            return await _completion(ctx, req, request)
        except ClientDisconnected:
            ctx.metrics.observe_aborted()
            return Response(status_code=499)


async def _completion(ctx: ServingContext, req: CompletionRequest, request: Request) -> Response:
    model = ctx.check_model(req.model)
    refuse_stream_options_without_stream(req)
    constraint = answer_constraint(req)
    if req.suffix:
        raise APIError(400, "suffix is not supported", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, "best_of is not supported (only best_of equal to n, the default)", "best_of")
    prompts = await asyncio.to_thread(completion_prompts, ctx, req.prompt)
    params = sampling_params(ctx, req, req.max_tokens if req.max_tokens is not None else 16, req.logprobs)
    for _, ids in prompts:  # every cheap check first: the grammar is compiled only for a request that will run
        ctx.engine.check_request(ids, params, req.priority)
    lengths = [len(ids) for _, ids in prompts]
    refuse_a_huge_logprobs_body(ctx, req.stream, params.n, lengths, params.max_tokens, req.logprobs)
    params = dataclasses.replace(params, structured=await structured_output(ctx, constraint, request))
    request_id = f"cmpl-{uuid.uuid4().hex}"
    streams: list[RequestStream] = []
    try:
        for i, (_, ids) in enumerate(prompts):
            streams.append(ctx.engine.add_request(ids, params, f"{request_id}-{i}", priority=req.priority))
    except Exception:
        for s in streams:
            ctx.engine.abort(s.request_id)
        raise
    n = params.n
    choices = [ChoiceState() for _ in range(len(prompts) * n)]
    prompt_tokens = sum(len(ids) for _, ids in prompts)

    def usage() -> CompletionUsage:
        cached = sum(choices[p * n].cached_tokens for p in range(len(prompts)))
        return CompletionUsage.of(prompt_tokens, sum(c.completion_tokens for c in choices), cached)

    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(**kw: Any) -> CompletionChunk:
            return CompletionChunk(id=request_id, object="text_completion", created=int(time.time()), model=model, **kw)

        opening = [
            chunk(choices=[CompletionChoice(index=p * n + i, text=text, logprobs=None, finish_reason=None)])
            for p, (text, _) in enumerate(prompts if req.echo else [])
            for i in range(n)
        ]

        def chunk_of(p: int, out: RequestOutput) -> CompletionChunk | None:
            idx = p * n + out.index
            ch = choices[idx]
            offset = len(ch.text)
            _, text, _ = ch.add(out)
            if not text and not out.finished and not out.new_logprobs:
                return None
            choice = CompletionChoice(
                index=idx,
                text=text,
                logprobs=completion_logprobs(ctx, out.new_logprobs, offset) if req.logprobs is not None else None,
                finish_reason=out.finish_reason if out.finished else None,
                **({"stop_reason": out.stop_reason} if out.finished else {}),  # only in the last chunk
            )
            return chunk(choices=[choice])

        def closing() -> CompletionChunk | None:
            note_usage(request, prompt_tokens, choices)
            return chunk(choices=[], usage=usage()) if include_usage else None

        return sse_response(ctx, [st.request_id for st in streams], opening, merge_streams(streams), chunk_of, closing)

    async def collect() -> Response:
        async for p, out in merge_streams(streams):
            choices[p * n + out.index].add(out)
            if out.finished:
                ctx.metrics.observe_finished(out)
        note_usage(request, prompt_tokens, choices)
        return await asyncio.to_thread(answer)  # (built and serialized in a thread, as for chat)

    def answer() -> Response:
        result = []
        for idx, ch in enumerate(choices):
            prefix = prompts[idx // n][0] if req.echo else ""
            result.append(
                CompletionChoice(
                    index=idx,
                    text=prefix + ch.text,
                    logprobs=completion_logprobs(ctx, ch.logprobs, len(prefix)) if req.logprobs is not None else None,
                    finish_reason=ch.finish_reason,
                    stop_reason=ch.stop_reason,
                )
            )
        body = Completion(
            id=request_id,
            object="text_completion",
            created=int(time.time()),
            model=model,
            choices=result,
            usage=usage(),
        )
        return json_response(body)

    return await run_unless_disconnected(request, collect(), ctx.metrics)
