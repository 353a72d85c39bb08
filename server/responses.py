"""Response bodies as pydantic models: what the handlers build and serialize, and what /openapi.json documents.

Names follow the OpenAI API's types (``ChatCompletion``, ``ChatCompletionChunk``, ``Completion`` ...) so that a
client generated from our schema reads like the OpenAI SDK. Fields are always in the JSON, null or not, except
those a model lists in ``omitted_unless_set``: those appear only when the handler set them, as OpenAI leaves
out what does not apply (a delta's absent parts, a choice's ``stop_reason`` before it finished, usage on
every chunk but the last).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, SerializerFunctionWrapHandler, model_serializer

FinishReason = Literal["stop", "length", "tool_calls", "abort"]


class _Body(BaseModel):
    omitted_unless_set: ClassVar[frozenset[str]] = frozenset()

    # No return annotation on purpose: pydantic would take it as the serialized schema, and /openapi.json
    # would document every body as "any".
    @model_serializer(mode="wrap")
    def _leave_out_unset(self, handler: SerializerFunctionWrapHandler):
        data = handler(self)
        for name in self.omitted_unless_set:
            if name not in self.model_fields_set:
                data.pop(name, None)
        return data


# ---- shared parts ------------------------------------------------------------------------------------
class PromptTokensDetails(_Body):
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache


class CompletionUsage(_Body):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails

    @staticmethod
    def of(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> CompletionUsage:
        return CompletionUsage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
        )


class ErrorBody(_Body):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(_Body):
    error: ErrorBody


# ---- logprobs ----------------------------------------------------------------------------------------
class TopLogprob(_Body):
    token: str
    logprob: float
    bytes: list[int]  # the token's UTF-8 bytes (a token may be part of a character)


class ChatCompletionTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(_Body):
    content: list[ChatCompletionTokenLogprob]


class CompletionLogprobs(_Body):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]  # each token's character offset in the choice's text


# ---- tool calls --------------------------------------------------------------------------------------
class Function(_Body):
    name: str
    arguments: str  # the JSON text of the arguments object, as the model wrote it


class ChatCompletionMessageToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: Function


class ChoiceDeltaToolCallFunction(_Body):
    omitted_unless_set = frozenset({"name"})
    name: str | None = None  # in the call's first delta only
    arguments: str


class ChoiceDeltaToolCall(_Body):
    omitted_unless_set = frozenset({"id", "type"})
    index: int
    id: str | None = None  # in the call's first delta only, with type
    type: Literal["function"] | None = None
    function: ChoiceDeltaToolCallFunction


# ---- chat completions --------------------------------------------------------------------------------
class ChatCompletionMessage(_Body):
    omitted_unless_set = frozenset({"tool_calls", "reasoning_content", "reasoning"})
    role: Literal["assistant"] = "assistant"
    content: str | None  # None when the message is only tool calls
    tool_calls: list[ChatCompletionMessageToolCall] | None = None
    # the thinking block of a reasoning model, split off the content (both names, as vLLM gives them)
    reasoning_content: str | None = None
    reasoning: str | None = None


class ChatCompletionChoice(_Body):
    index: int
    message: ChatCompletionMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason | None
    stop_reason: str | int | None  # the stop string or token id that ended the choice (vLLM's field)


class ChatCompletion(_Body):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: CompletionUsage


class ChoiceDelta(_Body):
    omitted_unless_set = frozenset({"role", "content", "reasoning_content", "reasoning", "tool_calls"})
    role: Literal["assistant"] | None = None  # in each choice's first chunk only
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ChoiceDeltaToolCall] | None = None


class ChatCompletionChunkChoice(_Body):
    omitted_unless_set = frozenset({"stop_reason"})
    index: int
    delta: ChoiceDelta
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason | None  # set in the choice's last chunk
    stop_reason: str | int | None = None  # in the choice's last chunk only


class ChatCompletionChunk(_Body):
    omitted_unless_set = frozenset({"usage"})
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]  # empty in the usage chunk
    usage: CompletionUsage | None = None  # in the last chunk only, with stream_options.include_usage


# ---- completions -------------------------------------------------------------------------------------
class CompletionChoice(_Body):
    omitted_unless_set = frozenset({"stop_reason"})
    index: int  # prompt index * n + sample index
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None
    stop_reason: str | int | None = None  # always in a response; in a stream, in the choice's last chunk


class Completion(_Body):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage


class CompletionChunk(Completion):
    """A streamed :class:`Completion` (OpenAI gives both one type): usage only in the last chunk."""

    omitted_unless_set = frozenset({"usage"})
    choices: list[CompletionChoice]  # empty in the usage chunk
    usage: CompletionUsage | None = None  # in the last chunk only, with stream_options.include_usage


# ---- models, tokenizer, status -----------------------------------------------------------------------
class ModelCard(_Body):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str  # the first served name, never a path on this machine
    parent: str | None = None
    max_model_len: int


class ModelList(_Body):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(_Body):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(_Body):
    prompt: str


class HealthStatus(_Body):
    omitted_unless_set = frozenset({"engine", "error"})
    status: str  # /health: ok, or why not (loading, restarting, draining, dead, unavailable); /live: alive, dead
    engine: str | None = None  # /live: the engine's state
    error: str | None = None  # what went wrong, when it is not ok


class VersionInfo(_Body):
    omitted_unless_set = frozenset({"device", "backend"})
    version: str
    device: str | None = None  # once the worker is up: where the model runs
    backend: str | None = None  # and on which kernels


# Streamed bodies, documented as the data of each server-sent event (not reachable from any route's JSON
# schema, so the OpenAPI document adds them to its components itself).
STREAM_CHUNKS = (ChatCompletionChunk, CompletionChunk)
