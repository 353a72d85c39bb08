"""Tool calls in the Hermes format that Qwen3's chat template teaches:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

:class:`ToolCallParser` splits a model's output (after any reasoning) into content and tool calls,
incrementally, so streaming and non-streaming give the same result (non-streaming feeds the whole text).
:func:`tool_call_grammar` is the grammar that forces such calls (``tool_choice`` "required" or a named
function). :func:`tools_system_prompt` teaches the format to a model whose template knows no tools.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from engine.structured_output import Grammar, ThinkTokens, lark_grammar, lark_json, lark_literal, optional_think
from server.reasoning import partial_suffix
from server.responses import (
    ChatCompletionMessageToolCall,
    ChoiceDeltaToolCall,
    ChoiceDeltaToolCallFunction,
    Function,
)

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
# What precedes the arguments object in a call: {"name": "<name>", "arguments": {
_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*\{')
# A call head longer than this is not one: OpenAI's tool names are at most 64 characters.
MAX_CALL_HEAD_CHARS = 160
# Whitespace a forced call may start with (after "</think>" a model writes a blank line) and that may
# separate calls. Bounded, so that a weak model cannot pad forever.
_GAP = r"/[ \n]{0,4}/"


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str = ""  # the JSON text of the arguments object, as the model wrote it

    def as_model(self) -> ChatCompletionMessageToolCall:
        return ChatCompletionMessageToolCall(
            id=self.id, type="function", function=Function(name=self.name, arguments=self.arguments)
        )


@dataclass
class ToolCallDelta:
    """What one stretch of output adds to a call: its start (``name`` set) and/or argument text."""

    index: int
    call: ToolCall
    started: bool = False
    arguments: str = ""

    def as_model(self) -> ChoiceDeltaToolCall:
        if self.started:
            return ChoiceDeltaToolCall(
                index=self.index,
                id=self.call.id,
                type="function",
                function=ChoiceDeltaToolCallFunction(name=self.call.name, arguments=self.arguments),
            )
        return ChoiceDeltaToolCall(index=self.index, function=ChoiceDeltaToolCallFunction(arguments=self.arguments))


class _ArgumentsScanner:
    """Finds where a JSON object ends in text that arrives in pieces (strings and escapes respected)."""

    def __init__(self) -> None:
        self.depth = 1  # the opening brace has been seen
        self.in_string = False
        self.escaped = False

    def feed(self, text: str) -> int | None:
        """Index in ``text`` just past the object's closing brace, or None if it has not closed yet."""
        for i, c in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == "\\":
                    self.escaped = True
                elif c == '"':
                    self.in_string = False
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
        return None


@dataclass
class ToolCallParser:
    """Feed content deltas; get (content delta, tool call deltas).

    A ``<tool_call>`` whose body starts ``{"name": "...", "arguments": {`` becomes a call, and its arguments
    stream as the model writes them; one that does not is given back as content, text and all. Whitespace
    between calls (and at the end) is not content.
    """

    calls: list[ToolCall] = field(default_factory=list)
    _state: str = "text"  # text -> head (inside <tool_call>, before the arguments) -> arguments -> tail -> text
    _held: str = ""  # text not yet given out: a partial tag, trailing whitespace, a call's head
    _scanner: _ArgumentsScanner | None = None
    _call_text: str = ""  # a call's text so far, while its head is incomplete

    def feed(self, delta: str) -> tuple[str, list[ToolCallDelta]]:
        text, self._held = self._held + delta, ""
        content, deltas = "", []
        while text:
            if self._state == "text":
                at = text.find(CALL_OPEN)
                if at < 0:
                    keep = partial_suffix(text, CALL_OPEN)
                    body, self._held = text[: len(text) - keep], text[len(text) - keep :]
                    stripped = body.rstrip()
                    content += stripped
                    self._held = body[len(stripped) :] + self._held  # trailing whitespace waits for more text
                    return content, deltas
                content += text[:at].rstrip()
                self._call_text = CALL_OPEN
                text = text[at + len(CALL_OPEN) :]
                self._state = "head"
            elif self._state == "head":
                self._call_text += text
                body = self._call_text[len(CALL_OPEN) :]
                m = _CALL_HEAD.match(body)
                if m is None:
                    if self._cannot_be_head(body):
                        content += self._call_text  # not a call we understand: it is content
                        text, self._state = "", "text"
                        continue
                    return content, deltas  # wait for more of the head
                name = json.loads(f'"{m.group(1)}"')
                call = ToolCall(new_tool_call_id(), name, "{")
                self.calls.append(call)
                deltas.append(ToolCallDelta(len(self.calls) - 1, call, started=True, arguments="{"))
                self._scanner = _ArgumentsScanner()
                text = body[m.end() :]
                self._state = "arguments"
            elif self._state == "arguments":
                end = self._scanner.feed(text)
                piece = text if end is None else text[:end]
                call = self.calls[-1]
                call.arguments += piece
                if deltas and deltas[-1].call is call:
                    deltas[-1].arguments += piece
                elif piece:
                    deltas.append(ToolCallDelta(len(self.calls) - 1, call, arguments=piece))
                if end is None:
                    return content, deltas
                text = text[end:]
                self._state = "tail"
            elif self._state == "tail":  # the call's closing brace and </tool_call>: not output
                at = text.find(CALL_CLOSE)
                if at < 0:
                    keep = partial_suffix(text, CALL_CLOSE)
                    self._held = text[len(text) - keep :] if keep else ""
                    return content, deltas
                text = text[at + len(CALL_CLOSE) :].lstrip()
                self._state = "text"
        return content, deltas

    @staticmethod
    def _cannot_be_head(body: str) -> bool:
        """Whether ``body`` (text after ``<tool_call>`` without a complete head) can no longer become one."""
        head = body.lstrip()
        return CALL_CLOSE in body or (head != "" and not head.startswith("{")) or len(body) > MAX_CALL_HEAD_CHARS

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """End of output: an unfinished call's head is content; trailing whitespace is dropped."""
        held, self._held = self._held, ""
        if self._state == "head":
            self._state = "text"
            return self._call_text.rstrip(), []
        if self._state == "text":
            return held.rstrip(), []
        return "", []


# ------------------------------------------------------------------------------------------------
# grammar for forced calls
# ------------------------------------------------------------------------------------------------
def call_schema(tool: dict[str, Any], index: int = 0, defs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON schema of one call's body: the tool's name, and arguments valid against its parameters.
    Parameters that use ``$ref`` (pydantic's and the OpenAI SDK's ``$defs``) refer to their own root: they go to
    ``defs`` (the root ``$defs`` of the schema this one is part of) with their references rebased there."""
    function = tool["function"]
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    if defs is not None and _has_ref(parameters):
        key = f"arguments_of_tool_{index}"
        defs[key] = _rebased(parameters, f"#/$defs/{key}")
        parameters = {"$ref": f"#/$defs/{key}"}
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, "arguments": parameters},
        "required": ["name", "arguments"],
        "additionalProperties": False,
    }


def calls_schema(tools: list[dict[str, Any]]) -> dict[str, Any]:
    """The schema of a call to any one of ``tools``, with the ``$defs`` their parameters refer to."""
    defs: dict[str, Any] = {}
    calls = [call_schema(t, i, defs) for i, t in enumerate(tools)]
    schema = {"anyOf": calls} if len(calls) > 1 else calls[0]
    return {**schema, "$defs": defs} if defs else schema


def _has_ref(schema: Any) -> bool:
    if isinstance(schema, dict):
        return "$ref" in schema or any(_has_ref(v) for v in schema.values())
    return isinstance(schema, list) and any(_has_ref(v) for v in schema)


def _rebased(schema: Any, root: str) -> Any:
    """``schema`` with its local references (``#...``) made relative to ``root`` instead of its own root."""
    if isinstance(schema, list):
        return [_rebased(v, root) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _rebased(v, root) for k, v in schema.items()}
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        out["$ref"] = root + ref[1:]
    return out


def tool_call_grammar(
    tools: list[dict[str, Any]],
    parallel: bool,
    open_token_id: int | None,
    close_token_id: int | None,
    or_json_schema: dict[str, Any] | None = None,
    think: ThinkTokens | None = None,
) -> Grammar:
    """Output that is one tool call (or, ``parallel``, one or more) to one of ``tools``, in the Hermes format.
    ``open_token_id``/``close_token_id``: the tokenizer's ``<tool_call>``/``</tool_call>`` tokens (Qwen3 has
    them), else the tags are spelled in text. ``or_json_schema``: an answer valid against it is allowed
    instead of calls (``tool_choice: "auto"`` with a ``response_format``). ``think``: an optional think block
    may come first."""
    open_tag = f"<[{open_token_id}]>" if open_token_id is not None else lark_literal(CALL_OPEN)
    close_tag = f"<[{close_token_id}]>" if close_token_id is not None else lark_literal(CALL_CLOSE)
    body = calls_schema(tools)
    calls = f"{_GAP} call ({_GAP} call)*" if parallel else f"{_GAP} call"
    start = (
        f"start: calls | {_GAP} answer\nanswer: {lark_json(or_json_schema)}\n" if or_json_schema else "start: calls\n"
    )
    lark = f'{start}calls: {calls}\ncall: {open_tag} "\\n" body "\\n" {close_tag}\nbody: {lark_json(body)}\n'
    if think is None:
        return lark_grammar(lark, json_numbers=True)
    return lark_grammar(optional_think(lark, think), json_numbers=True, think=think)


# ------------------------------------------------------------------------------------------------
# models whose chat template knows no tools
# ------------------------------------------------------------------------------------------------
def tools_system_prompt(tools: list[dict[str, Any]]) -> str:
    """The instructions Qwen3's template gives for tools (the Hermes format), for a template that has none."""
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        f"You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{listed}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
        "</tool_call>"
    )


def messages_without_tool_support(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict]:
    """Messages for a template that does not render tools: the tool instructions join the system message,
    assistant tool calls are written out in the Hermes format, and tool results become user turns wrapped
    in ``<tool_response>`` (as Qwen3's template renders them)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        m = dict(m)
        if m.get("role") == "assistant" and m.get("tool_calls"):
            parts = [m.get("content") or ""]
            for tc in m.pop("tool_calls"):
                fn = tc.get("function", tc)
                args = fn.get("arguments", {})
                args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
                parts.append(f'{CALL_OPEN}\n{{"name": "{fn.get("name", "")}", "arguments": {args}}}\n{CALL_CLOSE}')
            m["content"] = "\n".join(p for p in parts if p)
        elif m.get("role") == "tool":
            m = {"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"}
        elif m.get("content") is None:
            m["content"] = ""
        out.append(m)
    if tools:
        prompt = tools_system_prompt(tools)
        if out and out[0].get("role") == "system":
            out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out
