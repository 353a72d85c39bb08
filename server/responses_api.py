"""``/v1/responses``: OpenAI's Responses API on the chat path.

A request is mapped to a chat completion request (input items to messages, ``instructions`` to a system message,
function tools, ``text.format`` to a response format, ``reasoning.effort`` to Qwen3's thinking switch) and runs
through :func:`server.chat.prepare_chat`: the same chat template, sampling parameters, grammars, reasoning split and
tool-call parser. :class:`ResponsesBuilder` turns the chat choice into output items (``reasoning``, ``message``,
``function_call``) and, streamed, into the API's typed events. Stored responses (``store``, the default) serve
``previous_response_id`` and ``GET`` / ``DELETE /v1/responses/{id}`` (server/response_store.py).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response as HTTPResponse

from engine.tokenizer import Tokenizer
from server.chat import prepare_chat
from server.context import ServingContext
from server.errors import APIError
from server.reasoning import THINK_END
from server.request_mapping import ClientDisconnected, renamed_chat_errors, validated_chat_request
from server.response_builder import (
    CALL,
    REASONING,
    TEXT,
    OutputPart,
    PartEvent,
    PartsBuilder,
)
from server.response_store import StoredResponse
from server.responses_schemas import (
    BUILT_IN_TOOL_TYPES,
    ArgumentsDeltaEvent,
    ArgumentsDoneEvent,
    ContentPartEvent,
    DeletedResponse,
    ErrorEvent,
    FunctionCallItem,
    IncompleteDetails,
    InputTokensDetails,
    MessageItem,
    OutputItemEvent,
    OutputText,
    OutputTokensDetails,
    ReasoningItem,
    ReasoningText,
    Response,
    ResponseLifecycleEvent,
    ResponsesRequest,
    ResponseUsage,
    TextDeltaEvent,
    TextDoneEvent,
    ToolChoiceFunction,
)
from server.schemas import ChatCompletionRequest
from server.streaming import collected_response, indexed, json_response, sse_response

# The chat fields a Responses request's errors are reported under, by the name the client used.
CHAT_TO_RESPONSES_PARAMS = {
    "messages": "input",
    "max_completion_tokens": "max_output_tokens",
    "max_tokens": "max_output_tokens",
    "response_format": "text.format",
    "response_format.json_schema.schema": "text.format.schema",
    "chat_template_kwargs": "reasoning",
}
TEXT_PART_TYPES = ("input_text", "output_text", "text")


# ---- request -> chat messages -----------------------------------------------------------------------------
def _text_of(content: Any, where: str, part_types: tuple[str, ...] = TEXT_PART_TYPES) -> str:
    """A message's content (a string, or text parts) as one string; anything but text is a 400 naming it."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where} must be a string or a list of content parts", where)
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in part_types:
            raise APIError(
                400, f"{where}[{j}]: content of type {kind!r} is not supported (only text)", f"{where}[{j}].type"
            )
        texts.append(str(part.get("text", "")))
    return "".join(texts)


def input_messages(items: str | list[dict[str, Any]], history: list[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """Input items (or a string: one user message) as chat messages. Consecutive assistant items (a reasoning
    item, message text, function calls) make one assistant message. A ``function_call_output`` must answer a
    ``function_call`` before it, in these items or in ``history``."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    calls = {c["id"] for m in history for c in m.get("tool_calls") or ()}
    out: list[dict[str, Any]] = []
    turn: dict[str, Any] | None = None  # the assistant message consecutive assistant items add to
    reasoning: str | None = None  # a reasoning item's text, for the assistant message that follows it

    def assistant() -> dict[str, Any]:
        nonlocal turn, reasoning
        if turn is None:
            turn = {"role": "assistant", "content": None}
            if reasoning is not None:
                turn["reasoning_content"], reasoning = reasoning, None
            out.append(turn)
        return turn

    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise APIError(400, f"{where} must be an object (an input item)", where)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message" and item.get("role") == "assistant":
            message = assistant()
            message["content"] = (message["content"] or "") + _text_of(item.get("content"), f"{where}.content")
        elif kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer"):
                raise APIError(400, f"{where}.role: {role!r} is not one of user, assistant, system, developer", where)
            out.append({"role": role, "content": _text_of(item.get("content"), f"{where}.content")})
            turn = None
        elif kind == "function_call":
            missing = [k for k in ("call_id", "name") if not isinstance(item.get(k), str) or not item[k]]
            if missing:
                raise APIError(400, f"{where}: a function_call needs {' and '.join(missing)}", f"{where}.{missing[0]}")
            if not isinstance(item.get("arguments", ""), str):
                raise APIError(400, f"{where}.arguments must be a string (the arguments' JSON)", f"{where}.arguments")
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item.get("arguments") or "{}"},
            }
            assistant().setdefault("tool_calls", []).append(call)
            calls.add(item["call_id"])
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if call_id not in calls:
                raise APIError(
                    400,
                    f"{where}: no function_call with call_id {call_id!r} comes before this function_call_output "
                    "(in the input or in the previous response)",
                    f"{where}.call_id",
                )
            out.append({"role": "tool", "tool_call_id": call_id, "content": _text_of(item.get("output", ""), where)})
            turn = None
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            reasoning = _text_of(parts, f"{where}.content", ("reasoning_text", "summary_text", "text"))
            turn = None
        else:
            raise APIError(400, f"{where}: input items of type {kind!r} are not supported", f"{where}.type")
    return out


def _function_tools(req: ResponsesRequest) -> list[dict[str, Any]] | None:
    """The function tools in chat's shape; a built-in tool is a 400 naming it."""
    if not req.tools:
        return None
    tools = []
    for i, tool in enumerate(req.tools):
        if tool.type != "function":
            what = "a built-in tool" if tool.type in BUILT_IN_TOOL_TYPES else "a tool type"
            raise APIError(
                400, f"tools[{i}]: {tool.type!r} is {what} this server does not run (only function tools)", "tools"
            )
        function = {"name": tool.name, "description": tool.description, "parameters": tool.parameters}
        tools.append({"type": "function", "function": {k: v for k, v in function.items() if v is not None}})
    return tools


def to_chat_request(req: ResponsesRequest, conversation: list[dict[str, Any]]) -> ChatCompletionRequest:
    """The chat completion request that runs ``req`` over ``conversation`` (its messages, after the previous
    response's)."""
    messages = ([{"role": "system", "content": req.instructions}] if req.instructions else []) + conversation
    chat: dict[str, Any] = {
        "model": req.model,
        "messages": messages,
        "max_completion_tokens": req.max_output_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "seed": req.seed,
        "user": req.user,
        "stream": req.stream,
        "parallel_tool_calls": req.parallel_tool_calls,
        "tools": _function_tools(req),
    }
    if isinstance(req.tool_choice, ToolChoiceFunction):
        chat["tool_choice"] = {"type": "function", "function": {"name": req.tool_choice.name}}
    elif req.tool_choice is not None:
        chat["tool_choice"] = req.tool_choice
    fmt = req.text.format if req.text is not None else None
    if fmt is not None and fmt.type == "json_schema":
        schema = {"name": fmt.name or "response", "schema": fmt.json_schema, "strict": fmt.strict}
        chat["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif fmt is not None and fmt.type == "json_object":
        chat["response_format"] = {"type": "json_object"}
    if req.reasoning is not None and req.reasoning.effort is not None:
        chat["chat_template_kwargs"] = {"enable_thinking": req.reasoning.effort not in ("none", "minimal")}
    return validated_chat_request(chat, "input")


def _mapped(req: ResponsesRequest, history: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], ChatCompletionRequest]:
    """The conversation (``history``, then the input) and the chat request that runs it."""
    conversation = history + input_messages(req.input, history)
    return conversation, to_chat_request(req, conversation)


# ---- the builder ------------------------------------------------------------------------------------------
ITEM_ID_PREFIXES = {REASONING: "rs", TEXT: "msg", CALL: "fc"}
TEXT_EVENT_NAMES = {REASONING: "reasoning_text", TEXT: "output_text"}


class ResponsesBuilder(PartsBuilder):
    """One chat choice -> a ``Response`` (its output items and usage) or its stream of typed events. Both go
    through :meth:`chunk` (non-streamed, its events are dropped), so the items and their ids are the same.
    ``on_complete(response)`` runs once the response is whole (streamed: on the event loop; to store it)."""

    # (its stream ends with response.completed, or response.incomplete)

    def __init__(
        self,
        tokenizer: Tokenizer,
        skeleton: dict[str, Any],
        prompt_tokens: int,
        *,
        thinking: bool,
        tools: bool,
        on_complete: Callable[[Response], None] | None = None,
    ):
        super().__init__(prompt_tokens, thinking=thinking, tools=tools)
        self.skeleton = skeleton
        self.think_end_id = tokenizer.token_to_id(THINK_END)
        self.on_complete = on_complete
        self._ids: dict[int, str] = {}  # each part's item id, by its index
        self._sequence = 0
        self.final: Response | None = None

    # ---- events
    def _event(self, cls: type, **fields: Any) -> Any:
        event = cls(sequence_number=self._sequence, **fields)
        self._sequence += 1
        return event

    def _item_id(self, part: OutputPart) -> str:
        if part.index not in self._ids:
            self._ids[part.index] = f"{ITEM_ID_PREFIXES[part.kind]}_{uuid.uuid4().hex}"
        return self._ids[part.index]

    def _item(self, part: OutputPart, status: str) -> ReasoningItem | MessageItem | FunctionCallItem:
        item_id, whole = self._item_id(part), status != "in_progress"
        if part.kind == REASONING:
            content = [ReasoningText(type="reasoning_text", text=part.text)] if whole else []
            return ReasoningItem(type="reasoning", id=item_id, summary=[], content=content, status=status)
        if part.kind == TEXT:
            content = [OutputText(type="output_text", text=part.text, annotations=[])] if whole else []
            return MessageItem(type="message", id=item_id, role="assistant", status=status, content=content)
        arguments = part.text if whole else ""
        return FunctionCallItem(
            type="function_call", id=item_id, call_id=part.id, name=part.name, arguments=arguments, status=status
        )

    def _part_model(self, part: OutputPart, text: str) -> OutputText | ReasoningText:
        if part.kind == REASONING:
            return ReasoningText(type="reasoning_text", text=text)
        return OutputText(type="output_text", text=text, annotations=[])

    def _status(self, part: OutputPart) -> str:
        """A closed item's status: the last one is incomplete when the response ran out of tokens."""
        incomplete = self.choices[0].finish_reason == "length" and part is self.parts.parts[-1]
        return "incomplete" if incomplete else "completed"

    def events(self, changes: list[PartEvent]) -> list[Any]:
        events: list[Any] = []
        for change in changes:
            part = change.part
            at = {"item_id": self._item_id(part), "output_index": part.index}
            if change.action == "open":
                item = self._item(part, "in_progress")
                events.append(
                    self._event(OutputItemEvent, type="response.output_item.added", output_index=part.index, item=item)
                )
                if part.kind != CALL:
                    events.append(
                        self._event(
                            ContentPartEvent,
                            type="response.content_part.added",
                            content_index=0,
                            part=self._part_model(part, ""),
                            **at,
                        )
                    )
            elif change.action == "delta" and part.kind == CALL:
                events.append(self._event(ArgumentsDeltaEvent, delta=change.text, **at))
            elif change.action == "delta":
                name = f"response.{TEXT_EVENT_NAMES[part.kind]}.delta"
                events.append(self._event(TextDeltaEvent, type=name, content_index=0, delta=change.text, **at))
            elif part.kind == CALL:  # close
                events.append(self._event(ArgumentsDoneEvent, name=part.name, arguments=part.text, **at))
            else:
                name = f"response.{TEXT_EVENT_NAMES[part.kind]}.done"
                events.append(self._event(TextDoneEvent, type=name, content_index=0, text=part.text, **at))
                events.append(
                    self._event(
                        ContentPartEvent,
                        type="response.content_part.done",
                        content_index=0,
                        part=self._part_model(part, part.text),
                        **at,
                    )
                )
            if change.action == "close":
                item = self._item(part, self._status(part))
                events.append(
                    self._event(OutputItemEvent, type="response.output_item.done", output_index=part.index, item=item)
                )
        return events

    # ---- the builder's interface
    def opening(self) -> list[ResponseLifecycleEvent]:
        start = self._response("in_progress", [], None, None)
        return [
            self._event(ResponseLifecycleEvent, type="response.created", response=start),
            self._event(ResponseLifecycleEvent, type="response.in_progress", response=start),
        ]

    def closing(self) -> list[Any]:
        events = self.events(self.parts.finish())
        response = self._finish()
        kind = "response.incomplete" if response.status == "incomplete" else "response.completed"
        events.append(self._event(ResponseLifecycleEvent, type=kind, response=response))
        return events

    def response(self) -> Response:
        self.closing()
        assert self.final is not None
        return self.final

    def error_event(self, status: int, message: str, param: str | None) -> dict[str, str]:
        error = self._event(ErrorEvent, code=str(status), message=message, param=param)
        return {"event": "error", "data": error.serialized()}

    # ---- the Response object
    def _reasoning_tokens(self) -> int:
        """Output tokens up to and including ``</think>`` (all of them if the model never closed it)."""
        ch = self.choices[0]
        if ch.parser is None or not ch.parser.saw_reasoning:
            return 0
        ids = ch.token_ids
        return ids.index(self.think_end_id) + 1 if self.think_end_id in ids else len(ids)

    def _finish(self) -> Response:
        ch = self.choices[0]
        incomplete = ch.finish_reason == "length"
        usage = ResponseUsage(
            input_tokens=self.prompt_tokens,
            input_tokens_details=InputTokensDetails(cached_tokens=ch.cached_tokens),
            output_tokens=self.completion_tokens,
            output_tokens_details=OutputTokensDetails(reasoning_tokens=self._reasoning_tokens()),
            total_tokens=self.prompt_tokens + self.completion_tokens,
        )
        details = IncompleteDetails(reason="max_output_tokens") if incomplete else None
        output = [self._item(part, self._status(part)) for part in self.parts.parts]
        self.final = self._response("incomplete" if incomplete else "completed", output, usage, details)
        if self.on_complete is not None:
            self.on_complete(self.final)
        return self.final

    def _response(
        self, status: str, output: list[Any], usage: ResponseUsage | None, details: IncompleteDetails | None
    ) -> Response:
        return Response(status=status, output=output, usage=usage, incomplete_details=details, **self.skeleton)


# ---- the endpoint -----------------------------------------------------------------------------------------
def _skeleton(req: ResponsesRequest, response_id: str, model: str) -> dict[str, Any]:
    """The Response fields that echo the request."""
    fmt = req.text.format if req.text is not None and req.text.format is not None else None
    text_format = fmt.model_dump(by_alias=True, exclude_none=True) if fmt is not None else {"type": "text"}
    tool_choice = req.tool_choice.model_dump() if isinstance(req.tool_choice, ToolChoiceFunction) else req.tool_choice
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "error": None,
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "model": model,
        "parallel_tool_calls": req.parallel_tool_calls,
        "previous_response_id": req.previous_response_id,
        "reasoning": req.reasoning.model_dump(exclude_none=True) if req.reasoning is not None else None,
        "store": req.store,
        "temperature": req.temperature,
        "text": {"format": text_format},
        "tool_choice": tool_choice or "auto",
        "tools": [t.model_dump(exclude_none=True) for t in req.tools or []],
        "top_p": req.top_p,
        "user": req.user,
        "metadata": req.metadata or {},
    }


async def create_response(ctx: ServingContext, req: ResponsesRequest, request: Request) -> HTTPResponse:
    history: list[dict[str, Any]] = []
    if req.previous_response_id is not None:
        stored = ctx.responses.get(req.previous_response_id)
        if stored is None:
            raise APIError(
                404,
                f"Previous response with id '{req.previous_response_id}' not found (never stored, deleted, or evicted "
                "from this server's store)",
                "previous_response_id",
            )
        history = stored.conversation
    with renamed_chat_errors(CHAT_TO_RESPONSES_PARAMS):
        # (in a thread: work in proportion to the input, which may be a body of many MB)
        conversation, chat_req = await asyncio.to_thread(_mapped, req, history)
        try:
            chat = await prepare_chat(ctx, chat_req, request)
        except ClientDisconnected:
            ctx.metrics.observe_aborted()
            return HTTPResponse(status_code=499)
    response_id = f"resp_{uuid.uuid4().hex}"
    stream = ctx.engine.add_request(chat.prompt_ids, chat.params, response_id)
    ctx.metrics.observe_request("responses")

    def store(response: Response) -> None:
        if req.store:
            output = [item.as_dict() for item in response.output]
            ctx.responses.put(response.id, StoredResponse(response.serialized(), conversation + input_messages(output)))

    builder = ResponsesBuilder(
        ctx.engine.tokenizer,
        _skeleton(req, response_id, chat.model),
        len(chat.prompt_ids),
        thinking=chat.thinking,
        tools=chat.tools is not None,
    )
    if req.stream:
        builder.on_complete = store  # (closing() runs on the event loop, in the stream)
        return sse_response(ctx, request, [response_id], indexed(stream), builder)
    answer = await collected_response(ctx, request, indexed(stream), builder)
    if builder.final is not None:
        store(builder.final)
    return answer


def retrieve_response(ctx: ServingContext, response_id: str) -> HTTPResponse:
    stored = ctx.responses.get(response_id)
    if stored is None:
        raise APIError(404, f"Response with id '{response_id}' not found.", "response_id")
    return HTTPResponse(stored.body, media_type="application/json")


def delete_response(ctx: ServingContext, response_id: str) -> HTTPResponse:
    if not ctx.responses.delete(response_id):
        raise APIError(404, f"Response with id '{response_id}' not found.", "response_id")
    return json_response(DeletedResponse(id=response_id, object="response.deleted", deleted=True))
