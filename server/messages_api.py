"""``/v1/messages`` and ``/v1/messages/count_tokens``: Anthropic's Messages API on the chat path.

A request is mapped to a chat completion request (``system`` to a system message, ``tool_use`` blocks to tool
calls and ``tool_result`` blocks to tool messages, ``thinking`` blocks to the reasoning the template replays,
``tools`` with their ``input_schema``, ``tool_choice``, ``thinking`` to Qwen3's thinking switch) and runs through
:func:`server.chat.prepare_chat`: the same chat template, sampling parameters, grammars, reasoning split and tool-call
parser. :class:`MessagesBuilder` turns the chat choice into content blocks (``thinking``, ``text``, ``tool_use``)
and, streamed, into Anthropic's events. Errors are in Anthropic's shape (server/errors.py).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import Response as HTTPResponse

from server.chat import prepare_chat
from server.constraints import tool_use
from server.context import ServingContext
from server.errors import APIError, anthropic_error_body
from server.messages_schemas import (
    ContentBlockDeltaEvent,
    ContentBlockStartEvent,
    ContentBlockStopEvent,
    CountTokensRequest,
    DeltaUsage,
    InputJSONDelta,
    Message,
    MessageDelta,
    MessageDeltaEvent,
    MessagesRequest,
    MessageStartEvent,
    MessageStopEvent,
    PingEvent,
    TextBlock,
    TextDelta,
    ThinkingBlock,
    ThinkingDelta,
    TokenCount,
    ToolUseBlock,
    Usage,
)
from server.request_mapping import ClientDisconnected, chat_prompt_ids, renamed_chat_errors, validated_chat_request
from server.response_builder import (
    CALL,
    REASONING,
    OutputPart,
    PartEvent,
    PartsBuilder,
)
from server.schemas import ChatCompletionRequest
from server.streaming import collected_response, indexed, json_response, sse_response

# The chat fields a Messages request's errors are reported under, by the name the client used.
CHAT_TO_MESSAGES_PARAMS = {
    "max_completion_tokens": "max_tokens",
    "stop": "stop_sequences",
    "chat_template_kwargs": "thinking",
}
TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}


# ---- request -> chat messages -----------------------------------------------------------------------------
def _text_of(content: Any, where: str) -> str:
    """A string, or text blocks, as one string; any other block is a 400 naming it."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where} must be a string or a list of content blocks", where)
    texts = []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        if kind != "text":
            raise APIError(400, f"{where}[{j}]: blocks of type {kind!r} are not supported here (only text)", where)
        texts.append(str(block.get("text", "")))
    return "".join(texts)


def chat_messages(req: MessagesRequest | CountTokensRequest) -> list[dict[str, Any]]:
    """The request's system prompt and messages as chat messages. A ``tool_result`` must answer a ``tool_use``
    of an earlier assistant message."""
    out: list[dict[str, Any]] = []
    if req.system:
        out.append({"role": "system", "content": _text_of(req.system, "system")})
    calls: set[str] = set()
    for i, message in enumerate(req.messages):
        where = f"messages[{i}].content"
        if isinstance(message.content, str):
            out.append({"role": message.role, "content": message.content})
            continue
        if message.role == "assistant":
            turn: dict[str, Any] = {"role": "assistant", "content": None}
            for j, block in enumerate(message.content):
                kind = block.get("type")
                if kind == "text":
                    turn["content"] = (turn["content"] or "") + str(block.get("text", ""))
                elif kind == "thinking":  # (replayed: the template shows the last turn's reasoning)
                    turn["reasoning_content"] = turn.get("reasoning_content", "") + str(block.get("thinking", ""))
                elif kind == "redacted_thinking":
                    continue
                elif kind == "tool_use":
                    if not all(isinstance(block.get(k), str) and block[k] for k in ("id", "name")):
                        raise APIError(400, f"{where}[{j}]: a tool_use block needs id and name", "messages")
                    if not isinstance(block.get("input", {}), dict):
                        raise APIError(400, f"{where}[{j}].input must be an object", "messages")
                    arguments = json.dumps(block.get("input") or {}, ensure_ascii=False)
                    call = {
                        "id": block["id"],
                        "type": "function",
                        "function": {"name": block["name"], "arguments": arguments},
                    }
                    turn.setdefault("tool_calls", []).append(call)
                    calls.add(block["id"])
                else:
                    raise APIError(400, f"{where}[{j}]: blocks of type {kind!r} are not supported", "messages")
            out.append(turn)
            continue
        texts = []
        for j, block in enumerate(message.content):
            kind = block.get("type")
            if kind == "text":
                texts.append(str(block.get("text", "")))
            elif kind == "tool_result":
                call_id = block.get("tool_use_id")
                if call_id not in calls:
                    raise APIError(
                        400,
                        f"{where}[{j}]: tool_result for tool_use_id {call_id!r}, which no earlier assistant "
                        "message's tool_use block has",
                        "messages",
                    )
                result = _text_of(block.get("content", ""), f"{where}[{j}].content")
                out.append({"role": "tool", "tool_call_id": call_id, "content": result})
            else:
                raise APIError(
                    400, f"{where}[{j}]: blocks of type {kind!r} are not supported (text and tool_result)", "messages"
                )
        if texts:
            out.append({"role": "user", "content": "".join(texts)})
    return out


def to_chat_request(req: MessagesRequest | CountTokensRequest) -> ChatCompletionRequest:
    """The chat completion request that runs ``req``. Thinking is off unless ``thinking`` enables it (Anthropic's
    default), on a model that thinks."""
    chat: dict[str, Any] = {"model": req.model, "messages": chat_messages(req)}
    if isinstance(req, MessagesRequest):
        chat.update(
            max_completion_tokens=req.max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            stop=req.stop_sequences,
            stream=req.stream,
        )
    if req.tools:
        chat["tools"] = [
            {
                "type": "function",
                "function": {"name": t.name, "description": t.description, "parameters": t.input_schema},
            }
            for t in req.tools
        ]
    choice = req.tool_choice
    if choice is not None:
        if choice.type == "tool":
            if not choice.name:
                raise APIError(400, 'tool_choice of type "tool" needs the tool\'s name', "tool_choice")
            chat["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        else:
            chat["tool_choice"] = TOOL_CHOICES[choice.type]
        chat["parallel_tool_calls"] = not choice.disable_parallel_tool_use
    thinking = req.thinking is not None and req.thinking.type != "disabled"
    chat["chat_template_kwargs"] = {"enable_thinking": thinking}
    return validated_chat_request(chat, "messages")


# ---- the builder ------------------------------------------------------------------------------------------
class MessagesBuilder(PartsBuilder):
    """One chat choice -> a ``Message`` (its content blocks, stop reason and usage) or Anthropic's stream of events.
    Both go through :meth:`chunk` (non-streamed, its events are dropped)."""

    # (its stream ends with message_stop)

    def __init__(self, message_id: str, model: str, prompt_tokens: int, *, thinking: bool, tools: bool):
        super().__init__(prompt_tokens, thinking=thinking, tools=tools)
        self.message_id, self.model = message_id, model

    def _usage(self, output_tokens: int) -> Usage:
        cached = self.choices[0].cached_tokens
        return Usage(
            input_tokens=self.prompt_tokens,
            output_tokens=output_tokens,
            cache_read_input_tokens=cached,
            cache_creation_input_tokens=0,
        )

    def _stop(self) -> tuple[str | None, str | None]:
        """(stop_reason, stop_sequence) in Anthropic's terms."""
        ch = self.choices[0]
        if ch.finish_reason == "tool_calls":
            return "tool_use", None
        if ch.finish_reason == "length":
            return "max_tokens", None
        if isinstance(ch.stop_reason, str):
            return "stop_sequence", ch.stop_reason
        return "end_turn", None

    @staticmethod
    def _block(part: OutputPart, whole: bool) -> TextBlock | ThinkingBlock | ToolUseBlock:
        text = part.text if whole else ""
        if part.kind == REASONING:
            return ThinkingBlock(type="thinking", thinking=text, signature="")
        if part.kind == CALL:
            arguments: dict[str, Any] = {}
            if whole:
                try:
                    arguments = json.loads(part.text or "{}")
                except json.JSONDecodeError:
                    return TextBlock(type="text", text=part.text)  # (not an object: shown as what it is)
            return ToolUseBlock(type="tool_use", id=part.id, name=part.name, input=arguments)
        return TextBlock(type="text", text=text)

    def events(self, changes: list[PartEvent]) -> list[Any]:
        events: list[Any] = []
        for change in changes:
            part = change.part
            if change.action == "open":
                block = self._block(part, whole=False)
                events.append(ContentBlockStartEvent(type="content_block_start", index=part.index, content_block=block))
            elif change.action == "delta":
                if part.kind == REASONING:
                    delta: Any = ThinkingDelta(type="thinking_delta", thinking=change.text)
                elif part.kind == CALL:
                    delta = InputJSONDelta(type="input_json_delta", partial_json=change.text)
                else:
                    delta = TextDelta(type="text_delta", text=change.text)
                events.append(ContentBlockDeltaEvent(type="content_block_delta", index=part.index, delta=delta))
            else:
                events.append(ContentBlockStopEvent(type="content_block_stop", index=part.index))
        return events

    def opening(self) -> list[Any]:
        start = Message(
            id=self.message_id,
            type="message",
            role="assistant",
            model=self.model,
            content=[],
            stop_reason=None,
            stop_sequence=None,
            usage=self._usage(0),
        )
        return [MessageStartEvent(type="message_start", message=start), PingEvent(type="ping")]

    def closing(self) -> list[Any]:
        events = self.events(self.parts.finish())
        reason, sequence = self._stop()
        events.append(
            MessageDeltaEvent(
                type="message_delta",
                delta=MessageDelta(stop_reason=reason, stop_sequence=sequence),
                usage=DeltaUsage(output_tokens=self.completion_tokens),
            )
        )
        events.append(MessageStopEvent(type="message_stop"))
        return events

    def response(self) -> Message:
        self.parts.finish()
        reason, sequence = self._stop()
        return Message(
            id=self.message_id,
            type="message",
            role="assistant",
            model=self.model,
            content=[self._block(part, whole=True) for part in self.parts.parts],
            stop_reason=reason,
            stop_sequence=sequence,
            usage=self._usage(self.completion_tokens),
        )

    def error_event(self, status: int, message: str, param: str | None) -> dict[str, str]:
        return {"event": "error", "data": json.dumps(anthropic_error_body(status, message, param))}


# ---- the endpoints ----------------------------------------------------------------------------------------
async def create_message(ctx: ServingContext, req: MessagesRequest, request: Request) -> HTTPResponse:
    with renamed_chat_errors(CHAT_TO_MESSAGES_PARAMS):
        chat_req = await asyncio.to_thread(to_chat_request, req)  # (work in proportion to the request)
        try:
            chat = await prepare_chat(ctx, chat_req, request)
        except ClientDisconnected:
            ctx.metrics.observe_aborted()
            return HTTPResponse(status_code=499)
    message_id = f"msg_{uuid.uuid4().hex}"
    stream = ctx.engine.add_request(chat.prompt_ids, chat.params, message_id)
    ctx.metrics.observe_request("messages")
    builder = MessagesBuilder(
        message_id, chat.model, len(chat.prompt_ids), thinking=chat.thinking, tools=chat.tools is not None
    )
    if req.stream:
        return sse_response(ctx, request, [message_id], indexed(stream), builder)
    return await collected_response(ctx, request, indexed(stream), builder)


async def count_tokens(ctx: ServingContext, req: CountTokensRequest) -> HTTPResponse:
    """The prompt tokens a Messages request with these fields would have (its chat template rendered)."""
    with renamed_chat_errors(CHAT_TO_MESSAGES_PARAMS):
        ctx.check_model(req.model)
        chat_req = await asyncio.to_thread(to_chat_request, req)  # (work in proportion to the request)
        use = tool_use(chat_req)
        ids = await asyncio.to_thread(
            chat_prompt_ids,
            ctx,
            chat_req.messages,
            True,
            chat_req.chat_template_kwargs,
            False,
            use.tools if use else None,
        )
    return json_response(TokenCount(input_tokens=len(ids)))
