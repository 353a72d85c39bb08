"""Response builders: one request's outputs -> an endpoint's chunks (streaming) or its one response, without
HTTP (tests drive them with engine outputs directly). Each endpoint has one (server/chat.py,
server/completions.py, server/responses_api.py, server/messages_api.py); :class:`ChoiceState` follows one choice's
text, reasoning and tool calls, and :class:`OutputParts` splits them into the parts that the Responses and Messages
APIs stream as output items and content blocks."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.async_engine import RequestOutput
from engine.sequence import TokenLogprob
from engine.tokenizer import Tokenizer
from server.errors import error_body
from server.reasoning import ReasoningParser
from server.responses import (
    ChatCompletionTokenLogprob,
    ChoiceLogprobs,
    CompletionLogprobs,
    ResponseBody,
    TopLogprob,
)
from server.tool_calls import ToolCallDelta, ToolCallParser


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

    @staticmethod
    def for_chat(thinking: bool, tools: bool) -> ChoiceState:
        """A chat choice: its reasoning split off where the model thinks, its tool calls parsed where it has tools."""
        return ChoiceState(
            parser=ReasoningParser() if thinking else None, tool_parser=ToolCallParser() if tools else None
        )

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


class ResponseBuilder(ABC):
    """Builds one endpoint's answer to one request from its outputs: :meth:`opening`, :meth:`chunk` per output
    and :meth:`closing` when streamed; :meth:`add` per output and :meth:`response` when not."""

    done_event = True  # a stream ends with OpenAI's data: [DONE] (chat and completions; not the Responses API)
    named_events = False  # each event named by its body's ``type`` (the Responses and Messages APIs)

    def __init__(self, prompt_tokens: int, choices: list[ChoiceState]):
        self.prompt_tokens = prompt_tokens
        self.choices = choices

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.choices)

    def opening(self) -> Sequence[ResponseBody]:
        """The events sent before the first output."""
        return []

    @abstractmethod
    def add(self, prompt_index: int, out: RequestOutput) -> None:
        """Record an output (no response streamed)."""

    @abstractmethod
    def chunk(self, prompt_index: int, out: RequestOutput) -> Sequence[ResponseBody]:
        """Record an output; the events that stream it (none when there is nothing to send)."""

    def closing(self) -> Sequence[ResponseBody]:
        """The events sent after the last output (a usage chunk, or none)."""
        return []

    @abstractmethod
    def response(self) -> ResponseBody:
        """The whole answer, once every output was added."""

    def event(self, body: ResponseBody) -> str | dict[str, str]:
        """One server-sent event of the stream: OpenAI's chat and completion chunks are data only; an API whose
        events are named (:attr:`named_events`: the Responses and Messages APIs) has its event's ``type`` as the
        SSE event's name."""
        if self.named_events:
            return {"event": body.type, "data": body.serialized()}
        return body.serialized()

    def error_event(self, status: int, message: str, param: str | None) -> str | dict[str, str]:
        """The event that ends a stream which failed after it started (the status line was sent)."""
        return json.dumps(error_body(status, message, param))


def token_str(tokenizer: Tokenizer, token_id: int) -> str:
    """One token's text, special tokens included (as logprobs show them)."""
    return tokenizer.decode([token_id], skip_special_tokens=False)


def chat_logprobs(tokenizer: Tokenizer, lps: list[TokenLogprob]) -> ChoiceLogprobs:
    def entry(tid: int, lp: float) -> TopLogprob:
        s = token_str(tokenizer, tid)
        return TopLogprob(token=s, logprob=lp, bytes=list(s.encode("utf-8")))

    def chosen(x: TokenLogprob) -> ChatCompletionTokenLogprob:
        top = [entry(t, lp) for t, lp in (x.top or [])]
        return ChatCompletionTokenLogprob(**dict(entry(x.token_id, x.logprob)), top_logprobs=top)

    return ChoiceLogprobs(content=[chosen(x) for x in lps])


def completion_logprobs(tokenizer: Tokenizer, lps: list[TokenLogprob], offset: int) -> CompletionLogprobs:
    tokens = [token_str(tokenizer, x.token_id) for x in lps]
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=[x.logprob for x in lps],
        top_logprobs=[{token_str(tokenizer, t): lp for t, lp in (x.top or [])} for x in lps],
        text_offset=offsets,
    )


# ---- a choice's output as parts: what the Responses and Messages APIs stream as items or content blocks ------
REASONING, TEXT, CALL = "reasoning", "text", "call"


@dataclass
class OutputPart:
    """One part of a choice's output: its reasoning, a stretch of text, or one tool call (``text`` is then the
    call's arguments, ``id`` its call id)."""

    kind: str  # REASONING, TEXT or CALL
    index: int  # its position among the choice's parts
    text: str = ""
    id: str = ""
    name: str = ""
    done: bool = False


@dataclass
class PartEvent:
    """What a delta did to the parts: ``open`` a part, add ``text`` to it (``delta``), or ``close`` it."""

    action: str  # "open", "delta", "close"
    part: OutputPart
    text: str = ""


class OutputParts:
    """Follows a choice's (reasoning, content, tool call) deltas as a list of parts, in the order they came: a
    part is closed when another kind begins, a call when the next starts; whitespace alone opens no text part (it
    is kept for the text that may follow it, as between a model's reasoning and its calls)."""

    def __init__(self) -> None:
        self.parts: list[OutputPart] = []
        self._open: OutputPart | None = None
        self._calls: dict[int, OutputPart] = {}
        self._blank = ""

    def _switch(self, kind: str, events: list[PartEvent]) -> OutputPart:
        if self._open is not None and self._open.kind == kind and kind != CALL:
            return self._open
        if self._open is not None:
            self._open.done = True
            events.append(PartEvent("close", self._open))
        part = OutputPart(kind, len(self.parts))
        self.parts.append(part)
        self._open = part
        events.append(PartEvent("open", part))
        return part

    def feed(self, reasoning: str, content: str, calls: list[ToolCallDelta]) -> list[PartEvent]:
        events: list[PartEvent] = []
        if reasoning:
            part = self._switch(REASONING, events)
            part.text += reasoning
            events.append(PartEvent("delta", part, reasoning))
        if content:
            if self._open is None or self._open.kind != TEXT:
                content, self._blank = self._blank + content, ""
                if not content.strip():
                    self._blank = content
                    content = ""
            if content:
                part = self._switch(TEXT, events)
                part.text += content
                events.append(PartEvent("delta", part, content))
        for call in calls:
            part = self._calls.get(call.index)
            if part is None:
                self._blank = ""
                part = self._switch(CALL, events)
                part.id, part.name = call.call.id, call.call.name
                self._calls[call.index] = part
            if call.arguments:
                part.text += call.arguments
                events.append(PartEvent("delta", part, call.arguments))
        return events

    def finish(self) -> list[PartEvent]:
        """Close what is still open (at the end of the output)."""
        events = [PartEvent("close", p) for p in self.parts if not p.done]
        for part in self.parts:
            part.done = True
        self._open = None
        return events


class PartsBuilder(ResponseBuilder):
    """The builder of an API that answers one choice as parts (the Responses API's output items, the Messages
    API's content blocks), its stream named events without ``[DONE]``: each output's deltas become part events
    (:class:`OutputParts`), which :meth:`events` turns into the API's own."""

    done_event = False
    named_events = True

    def __init__(self, prompt_tokens: int, *, thinking: bool, tools: bool):
        super().__init__(prompt_tokens, [ChoiceState.for_chat(thinking, tools)])
        self.parts = OutputParts()

    @abstractmethod
    def events(self, changes: list[PartEvent]) -> list[ResponseBody]:
        """The API's events for what the parts did."""

    def add(self, prompt_index: int, out: RequestOutput) -> None:
        self.chunk(prompt_index, out)

    def chunk(self, prompt_index: int, out: RequestOutput) -> list[ResponseBody]:
        return self.events(self.parts.feed(*self.choices[0].add(out)))
