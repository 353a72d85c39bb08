"""``/v1/chat/completions``: messages -> chat template -> engine -> a ChatCompletion or its chunks."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from engine.async_engine import RequestOutput
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from server.constraints import ToolUse, chat_constraint, tool_use
from server.context import ServingContext
from server.errors import APIError
from server.request_mapping import (
    ClientDisconnected,
    call_token_ids,
    chat_prompt_ids,
    input_named,
    refuse_a_huge_logprobs_body,
    refuse_stream_options_without_stream,
    sampling_params,
    structured_output,
    think_tokens,
)
from server.response_builder import ChoiceState, ResponseBuilder, chat_logprobs
from server.responses import (
    ChatCompletion,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionChunkChoice,
    ChatCompletionMessage,
    ChoiceDelta,
    CompletionUsage,
)
from server.schemas import ChatCompletionRequest
from server.streaming import collected_response, indexed, sse_response


class ChatResponseBuilder(ResponseBuilder):
    """One chat request's ``n`` choices -> ChatCompletionChunks or one ChatCompletion. ``thinking``: the model's
    text is split into reasoning and content; ``tools``: tool calls are parsed out of it; ``logprobs``: the
    number of top logprobs per token (None: no logprobs)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        request_id: str,
        model: str,
        n: int,
        prompt_tokens: int,
        *,
        thinking: bool = False,
        tools: bool = False,
        logprobs: int | None = None,
        include_usage: bool = False,
    ):
        choices = [ChoiceState.for_chat(thinking, tools) for _ in range(n)]
        super().__init__(prompt_tokens, choices)
        self.tokenizer, self.request_id, self.model = tokenizer, request_id, model
        self.logprobs, self.include_usage = logprobs, include_usage

    def usage(self) -> CompletionUsage:
        return CompletionUsage.of(self.prompt_tokens, self.completion_tokens, self.choices[0].cached_tokens)

    def _chunk(self, **kw: Any) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.request_id, object="chat.completion.chunk", created=int(time.time()), model=self.model, **kw
        )

    def opening(self) -> list[ChatCompletionChunk]:
        return [
            self._chunk(
                choices=[
                    ChatCompletionChunkChoice(
                        index=i, delta=ChoiceDelta(role="assistant", content=""), logprobs=None, finish_reason=None
                    )
                ]
            )
            for i in range(len(self.choices))
        ]

    def add(self, prompt_index: int, out: RequestOutput) -> None:
        self.choices[out.index].add(out)

    def chunk(self, prompt_index: int, out: RequestOutput) -> list[ChatCompletionChunk]:
        ch = self.choices[out.index]
        reasoning, content, calls = ch.add(out)
        delta: dict[str, Any] = {}  # only the parts this output has (unset fields are left out)
        if reasoning:
            delta.update(reasoning_content=reasoning, reasoning=reasoning)
        if content:
            delta["content"] = content
        if calls:
            delta["tool_calls"] = [c.as_model() for c in calls]
        if not delta and not out.finished and not out.new_logprobs:
            return []
        choice = ChatCompletionChunkChoice(
            index=out.index,
            delta=ChoiceDelta(**delta),
            logprobs=chat_logprobs(self.tokenizer, out.new_logprobs) if self.logprobs is not None else None,
            finish_reason=ch.finish_reason if out.finished else None,
            **({"stop_reason": out.stop_reason} if out.finished else {}),  # only in the last chunk
        )
        return [self._chunk(choices=[choice])]

    def closing(self) -> list[ChatCompletionChunk]:
        return [self._chunk(choices=[], usage=self.usage())] if self.include_usage else []

    def response(self) -> ChatCompletion:
        result_choices = []
        for i, ch in enumerate(self.choices):
            message: dict[str, Any] = {"role": "assistant", "content": ch.text}
            if ch.tool_parser is not None and ch.tool_parser.calls:
                message.update(content=ch.text or None, tool_calls=[c.as_model() for c in ch.tool_parser.calls])
            if ch.parser is not None and ch.parser.saw_reasoning:
                message.update(reasoning_content=ch.reasoning, reasoning=ch.reasoning)
            result_choices.append(
                ChatCompletionChoice(
                    index=i,
                    message=ChatCompletionMessage(**message),
                    logprobs=chat_logprobs(self.tokenizer, ch.logprobs) if self.logprobs is not None else None,
                    finish_reason=ch.finish_reason,
                    stop_reason=ch.stop_reason,
                )
            )
        return ChatCompletion(
            id=self.request_id,
            object="chat.completion",
            created=int(time.time()),
            model=self.model,
            choices=result_choices,
            usage=self.usage(),
        )


@dataclass
class PreparedChat:
    """A chat request made ready for the engine: what every endpoint built on chat (chat completions, the
    Responses and Messages APIs) runs, with what its response builder needs to know."""

    model: str
    prompt_ids: list[int]
    params: SamplingParams
    thinking: bool  # the answer's reasoning is split from its content
    tools: ToolUse | None
    logprobs: int | None


async def prepare_chat(ctx: ServingContext, req: ChatCompletionRequest, request: Request) -> PreparedChat:
    """Render and tokenize the messages, map the sampling fields, check everything cheap, then compile the
    request's grammar (raises APIError naming the chat field at fault; ClientDisconnected when the client left
    while its grammar compiled)."""
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
    return PreparedChat(model, prompt_ids, params, thinking, use, logprobs)


async def create_chat_completion(ctx: ServingContext, req: ChatCompletionRequest, request: Request) -> Response:
    with input_named("messages", "max_completion_tokens" if req.max_completion_tokens else "max_tokens"):
        try:
            return await _chat_completion(ctx, req, request)
        except ClientDisconnected:
            ctx.metrics.observe_aborted()
            return Response(status_code=499)


async def _chat_completion(ctx: ServingContext, req: ChatCompletionRequest, request: Request) -> Response:
    chat = await prepare_chat(ctx, req, request)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    stream = ctx.engine.add_request(chat.prompt_ids, chat.params, request_id, priority=req.priority)
    ctx.metrics.observe_request("chat_completions")
    builder = ChatResponseBuilder(
        ctx.engine.tokenizer,
        request_id,
        chat.model,
        chat.params.n,
        len(chat.prompt_ids),
        thinking=chat.thinking,
        tools=chat.tools is not None,
        logprobs=chat.logprobs,
        include_usage=bool(req.stream and req.stream_options and req.stream_options.include_usage),
    )
    if req.stream:
        return sse_response(ctx, request, [request_id], indexed(stream), builder)
    return await collected_response(ctx, request, indexed(stream), builder)
