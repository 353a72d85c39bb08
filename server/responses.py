"""Response bodies as pydantic models: what the handlers build and serialize, and what /openapi.json documents.

Names follow the OpenAI API's types (``ChatCompletion``, ``ChatCompletionChunk``, ``Completion`` ...) so that a
client generated from our schema reads like the OpenAI SDK. A field without a default is always in the JSON,
null or not (and "required" in the schema); one with a default appears only where the handler set it, as OpenAI
leaves out what does not apply (a delta's absent parts, a choice's ``stop_reason`` before it finished, usage on
every chunk but the last). pydantic's own ``exclude_unset`` does that in its compiled serializer, not a Python
hook per model (which cost several times as much per chunk; ``python benchmarks/api_bench.py`` measures the API
process's CPU per streamed chunk).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

FinishReason = Literal["stop", "length", "tool_calls", "abort"]


class ResponseBody(BaseModel):
    """A response body or a part of one. A field without a default is always in the JSON (null or not); a field
    with one appears only when the handler set it (pydantic's ``exclude_unset``), as OpenAI leaves out what does
    not apply. Serialized only through :meth:`serialized` (or :meth:`as_dict`), which say so."""

    def serialized(self) -> str:
        """The JSON text of this body."""
        return self.model_dump_json(exclude_unset=True)

    def as_dict(self) -> dict:
        """The body as JSON-ready Python values."""
        return self.model_dump(mode="json", exclude_unset=True)


class FullBody(ResponseBody):
    """A body of an API that leaves nothing out (the Responses and Messages APIs): every field is always in the
    JSON, null or not."""

    def serialized(self) -> str:
        return self.model_dump_json()

    def as_dict(self) -> dict:
        return self.model_dump(mode="json")


# ---- shared parts ------------------------------------------------------------------------------------
class PromptTokensDetails(ResponseBody):
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache


class CompletionUsage(ResponseBody):
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


class ErrorBody(ResponseBody):
    message: str
    type: str
    param: str | None
    code: int | str | None


class ErrorResponse(ResponseBody):
    error: ErrorBody


# ---- logprobs ----------------------------------------------------------------------------------------
class TopLogprob(ResponseBody):
    token: str
    logprob: float
    bytes: list[int]  # the token's UTF-8 bytes (a token may be part of a character)


class ChatCompletionTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(ResponseBody):
    content: list[ChatCompletionTokenLogprob]


class CompletionLogprobs(ResponseBody):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]  # each token's character offset in the choice's text


# ---- tool calls --------------------------------------------------------------------------------------
class Function(ResponseBody):
    name: str
    arguments: str  # the JSON text of the arguments object, as the model wrote it


class ChatCompletionMessageToolCall(ResponseBody):
    id: str
    type: Literal["function"]
    function: Function


class ChoiceDeltaToolCallFunction(ResponseBody):
    name: str | None = None  # in the call's first delta only
    arguments: str


class ChoiceDeltaToolCall(ResponseBody):
    index: int
    id: str | None = None  # in the call's first delta only, with type
    type: Literal["function"] | None = None
    function: ChoiceDeltaToolCallFunction


# ---- chat completions --------------------------------------------------------------------------------
class ChatCompletionMessage(ResponseBody):
    role: Literal["assistant"]
    content: str | None  # None when the message is only tool calls
    tool_calls: list[ChatCompletionMessageToolCall] | None = None
    # the thinking block of a reasoning model, split off the content (both names, as vLLM gives them)
    reasoning_content: str | None = None
    reasoning: str | None = None


class ChatCompletionChoice(ResponseBody):
    index: int
    message: ChatCompletionMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason | None
    stop_reason: str | int | None  # the stop string or token id that ended the choice (vLLM's field)


class ChatCompletion(ResponseBody):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: CompletionUsage


class ChoiceDelta(ResponseBody):
    role: Literal["assistant"] | None = None  # in each choice's first chunk only
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ChoiceDeltaToolCall] | None = None


class ChatCompletionChunkChoice(ResponseBody):
    index: int
    delta: ChoiceDelta
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason | None  # set in the choice's last chunk
    stop_reason: str | int | None = None  # in the choice's last chunk only


class ChatCompletionChunk(ResponseBody):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatCompletionChunkChoice]  # empty in the usage chunk
    usage: CompletionUsage | None = None  # in the last chunk only, with stream_options.include_usage


# ---- completions -------------------------------------------------------------------------------------
class CompletionChoice(ResponseBody):
    index: int  # prompt index * n + sample index
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None
    stop_reason: str | int | None = None  # always in a response; in a stream, in the choice's last chunk


class Completion(ResponseBody):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage


class CompletionChunk(Completion):
    """A streamed :class:`Completion` (OpenAI gives both one type): usage only in the last chunk."""

    choices: list[CompletionChoice]  # empty in the usage chunk
    usage: CompletionUsage | None = None  # in the last chunk only, with stream_options.include_usage


# ---- models, tokenizer, status -----------------------------------------------------------------------
class ModelCard(ResponseBody):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str  # the first served name, never a path on this machine
    parent: str | None
    max_model_len: int


class ModelList(ResponseBody):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(ResponseBody):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(ResponseBody):
    prompt: str


class HealthStatus(ResponseBody):
    status: (
        str  # /health: ok, or why not (loading, restarting, stalled, draining, dead, unavailable); /live: alive, dead
    )
    engine: str | None = None  # /live: the engine's state
    error: str | None = None  # what went wrong, when it is not ok


class VersionInfo(ResponseBody):
    version: str
    device: str | None = None  # once the worker is up: where the model runs
    backend: str | None = None  # and on which kernels


# Streamed bodies, documented as the data of each server-sent event (not reachable from any route's JSON
# schema, so the OpenAPI document adds them to its components itself).
STREAM_CHUNKS = (ChatCompletionChunk, CompletionChunk)
