"""What a request asks the output to be: ``response_format``, vLLM's ``guided_*`` fields, and for chat the
tools and ``tool_choice``; resolved to at most one grammar, with a 400 naming the field for what cannot be."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from engine.structured_output import (
    Grammar,
    GrammarError,
    json_schema_grammar,
    lark_grammar,
    lark_json,
    lark_literal,
    regex_grammar,
)
from server.errors import APIError
from server.schemas import ChatCompletionRequest, NamedToolChoice, SamplingFields
from server.tool_calls import tool_call_grammar

# Whitespace allowed before a constrained answer that follows "</think>" (models write a blank line there).
_AFTER_THINK_GAP = r"/[ \n]{0,4}/"


@dataclass(frozen=True)
class OutputConstraint:
    """One request's constraint: its grammar and the request field to blame if it does not compile."""

    grammar: Grammar
    param: str


@dataclass(frozen=True)
class ToolUse:
    """The tools a chat request offers and how the model may use them."""

    tools: list[dict[str, Any]]  # as the chat template takes them (OpenAI's shape)
    choice: str  # "auto", "required", or the name of the function that must be called
    parallel: bool


def answer_schema(req: SamplingFields) -> tuple[dict[str, Any], str] | None:
    """The JSON schema the answer must satisfy, and the field that asked for it; None for free text."""
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        return {"type": "object"}, "response_format"
    if rf is not None and rf.type == "json_schema":
        if rf.json_schema is None:
            raise APIError(400, "response_format of type json_schema needs a json_schema field", "response_format")
        return rf.json_schema.json_schema or {"type": "object"}, "response_format.json_schema.schema"
    if req.guided_json is not None:
        schema = req.guided_json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise APIError(400, f"guided_json is not valid JSON: {e}", "guided_json") from None
        return schema, "guided_json"
    return None


def _count_constraints(req: SamplingFields) -> None:
    given = [
        name
        for name, value in (
            (
                "response_format",
                req.response_format if req.response_format and req.response_format.type != "text" else None,
            ),
            ("guided_json", req.guided_json),
            ("guided_regex", req.guided_regex),
            ("guided_choice", req.guided_choice),
        )
        if value is not None
    ]
    if len(given) > 1:
        raise APIError(400, f"only one of {', '.join(given)} can be given", given[1])


def _json_grammar(schema: dict[str, Any], param: str, after_think: bool) -> Grammar:
    try:
        if after_think:
            return lark_grammar(f"start: {_AFTER_THINK_GAP} answer\nanswer: {lark_json(schema)}\n")
        return json_schema_grammar(schema)
    except GrammarError as e:
        raise APIError(400, f"{param}: {e}", param) from None


def answer_constraint(req: SamplingFields, after_think: bool = False) -> OutputConstraint | None:
    """The constraint of ``response_format`` / ``guided_json`` / ``guided_regex`` / ``guided_choice``."""
    _count_constraints(req)
    schema = answer_schema(req)
    if schema is not None:
        return OutputConstraint(_json_grammar(schema[0], schema[1], after_think), schema[1])
    gap = f"{_AFTER_THINK_GAP} " if after_think else ""
    if req.guided_regex is not None:
        if not after_think:
            return OutputConstraint(regex_grammar(req.guided_regex), "guided_regex")
        pattern = req.guided_regex.replace("/", "\\/")  # (a Lark regex literal is delimited by slashes)
        return OutputConstraint(lark_grammar(f"start: {gap}/{pattern}/\n"), "guided_regex")
    if req.guided_choice is not None:
        options = " | ".join(lark_literal(c) for c in req.guided_choice)
        return OutputConstraint(lark_grammar(f"start: {gap}({options})\n"), "guided_choice")
    return None


def tool_use(req: ChatCompletionRequest) -> ToolUse | None:
    """The request's tools and tool_choice, checked; None when the model is not to call tools."""
    choice = req.tool_choice
    tools = [t.model_dump(exclude_none=True) for t in req.tools or []]
    if isinstance(choice, NamedToolChoice):
        names = [t["function"]["name"] for t in tools]
        if choice.function.name not in names:
            known = ", ".join(names) if names else "none"
            raise APIError(
                400,
                f"tool_choice names the function {choice.function.name!r}, which is not in tools ({known})",
                "tool_choice",
            )
        return ToolUse(tools, choice.function.name, parallel=False)
    if choice == "required" and not tools:
        raise APIError(400, 'tool_choice "required" needs at least one tool in tools', "tool_choice")
    if choice == "none" or not tools:
        return None
    return ToolUse(tools, choice or "auto", req.parallel_tool_calls)


def chat_constraint(
    req: ChatCompletionRequest, use: ToolUse | None, call_token_ids: tuple[int | None, int | None], after_think: bool
) -> OutputConstraint | None:
    """The one grammar of a chat request: forced tool calls, or calls-or-answer, or the answer format."""
    answer = answer_constraint(req, after_think)
    if use is None:
        return answer
    if use.choice == "auto":
        if answer is None:
            return None  # free text; calls are parsed from it
        schema = answer_schema(req)
        if schema is None:
            raise APIError(400, "with tools, only a JSON response_format can constrain the answer", answer.param)
        # The model may call tools or answer in the format asked for.
        grammar = tool_call_grammar(use.tools, use.parallel, *call_token_ids, or_json_schema=schema[0])
        return OutputConstraint(grammar, schema[1])
    if answer is not None:
        raise APIError(
            400, f"{answer.param} cannot be combined with a tool_choice that forces a tool call", answer.param
        )
    tools = use.tools if use.choice == "required" else [t for t in use.tools if t["function"]["name"] == use.choice]
    return OutputConstraint(tool_call_grammar(tools, use.parallel, *call_token_ids), "tools")
