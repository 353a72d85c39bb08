"""Anthropic's Messages API (``/v1/messages``) as pydantic models: the request, the ``Message`` response with its
content blocks, and the events of its stream. Field names and shapes are Anthropic's (as its Python SDK's
``anthropic.types`` read them); what a field means here is in server/messages_api.py."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel

from server.responses import FullBody
from server.schemas import Int64

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # fields of the API this server does not use are ignored


class InputMessage(_Request):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class Tool(_Request):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")  # Anthropic's rule
    description: str | None = None
    input_schema: dict[str, Any]


class ToolChoice(_Request):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False


class Thinking(_Request):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: Int64 | None = None


class MessagesRequest(_Request):
    model: str
    max_tokens: Int64  # required, as Anthropic requires it
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: Int64 | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    metadata: dict[str, Any] | None = None
    stream: bool = False


class CountTokensRequest(_Request):
    """``/v1/messages/count_tokens``: a Messages request's prompt, without ``max_tokens``."""

    model: str
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None


class TokenCount(FullBody):
    input_tokens: int


# ---- the Message ------------------------------------------------------------------------------------------
class TextBlock(FullBody):
    type: Literal["text"]
    text: str


class ThinkingBlock(FullBody):
    type: Literal["thinking"]
    thinking: str
    signature: str  # (no signature is computed here: empty)


class ToolUseBlock(FullBody):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]


ContentBlock = Annotated[TextBlock | ThinkingBlock | ToolUseBlock, Field(discriminator="type")]


class Usage(FullBody):
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int  # prompt tokens found in the prefix cache
    cache_creation_input_tokens: int


class Message(FullBody):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[ContentBlock]
    stop_reason: StopReason | None
    stop_sequence: str | None
    usage: Usage


# ---- the stream's events ----------------------------------------------------------------------------------
class MessageStartEvent(FullBody):
    type: Literal["message_start"]
    message: Message


class ContentBlockStartEvent(FullBody):
    type: Literal["content_block_start"]
    index: int
    content_block: ContentBlock


class TextDelta(FullBody):
    type: Literal["text_delta"]
    text: str


class ThinkingDelta(FullBody):
    type: Literal["thinking_delta"]
    thinking: str


class InputJSONDelta(FullBody):
    type: Literal["input_json_delta"]
    partial_json: str


class ContentBlockDeltaEvent(FullBody):
    type: Literal["content_block_delta"]
    index: int
    delta: Annotated[TextDelta | ThinkingDelta | InputJSONDelta, Field(discriminator="type")]


class ContentBlockStopEvent(FullBody):
    type: Literal["content_block_stop"]
    index: int


class MessageDelta(FullBody):
    stop_reason: StopReason | None
    stop_sequence: str | None


class DeltaUsage(FullBody):
    output_tokens: int


class MessageDeltaEvent(FullBody):
    type: Literal["message_delta"]
    delta: MessageDelta
    usage: DeltaUsage


class MessageStopEvent(FullBody):
    type: Literal["message_stop"]


class PingEvent(FullBody):
    type: Literal["ping"]


class ErrorDetail(FullBody):
    type: str
    message: str


class ErrorEvent(FullBody):
    type: Literal["error"]
    error: ErrorDetail


class AnthropicError(FullBody):
    """Anthropic's error body (server/errors.py's ``anthropic_error_body``)."""

    type: Literal["error"]
    error: ErrorDetail


class MessageStreamEvent(RootModel):
    """One event of a streamed message (its ``type`` is also the SSE event's name)."""

    root: Annotated[
        MessageStartEvent
        | ContentBlockStartEvent
        | ContentBlockDeltaEvent
        | ContentBlockStopEvent
        | MessageDeltaEvent
        | MessageStopEvent
        | PingEvent
        | ErrorEvent,
        Field(discriminator="type"),
    ]
