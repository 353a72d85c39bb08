"""Response builders: one request's outputs -> an endpoint's chunks (streaming) or its one response, without
HTTP (tests drive them with engine outputs directly). Each endpoint has one (server/chat.py,
server/completions.py); :class:`ChoiceState` follows one choice's text, reasoning and tool calls."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.async_engine import RequestOutput
from engine.sequence import TokenLogprob
from engine.tokenizer import Tokenizer
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

    done_event = True  # a stream ends with OpenAI's data: [DONE]

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
    def chunk(self, prompt_index: int, out: RequestOutput) -> ResponseBody | None:
        """Record an output; the event that streams it, or None when there is nothing to send."""

    def closing(self) -> Sequence[ResponseBody]:
        """The events sent after the last output (a usage chunk, or none)."""
        return []

    @abstractmethod
    def response(self) -> ResponseBody:
        """The whole answer, once every output was added."""


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
