"""What a request asks the output to be: ``response_format``, vLLM's ``guided_*`` fields, and for chat the
tools and ``tool_choice``; resolved to at most one grammar, with a 400 naming the field for what cannot be."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from engine.structured_output import (
    Grammar,
    GrammarError,
    ThinkTokens,
    json_schema_grammar,
    lark_grammar,
    lark_json,
    lark_literal,
    lark_regex,
    optional_think,
    regex_grammar,
)
from server.errors import APIError
from server.schemas import ChatCompletionRequest, NamedToolChoice, SamplingFields
from server.tool_calls import tool_call_grammar

# The most options a guided_choice can have: the grammar engine keeps all of them in one Earley row, which it
# caps at 2000 items (the option count + 1).
MAX_CHOICES = 1999


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


def thinking_grammar(lark: str, think: ThinkTokens | None, json_numbers: bool = False) -> Grammar:
    """A Lark grammar, behind an optional think block when the model may think (``think``)."""
    if think is None:
        return lark_grammar(lark, json_numbers)
    return lark_grammar(optional_think(lark, think), json_numbers, think)


def _compiled_or_400(param: str, build) -> Grammar:
    try:
        return build()
    except GrammarError as e:
        raise APIError(400, f"{param}: {e}", param) from None


def answer_constraint(req: SamplingFields, think: ThinkTokens | None = None) -> OutputConstraint | None:
    """The constraint of ``response_format`` / ``guided_json`` / ``guided_regex`` / ``guided_choice``; with
    ``think`` (a thinking model), an optional think block may come first."""
    _count_constraints(req)
    schema = answer_schema(req)
    if schema is not None:
        value, param = schema
        if think is None:
            return OutputConstraint(_compiled_or_400(param, lambda: json_schema_grammar(value)), param)
        grammar = _compiled_or_400(param, lambda: thinking_grammar(f"start: {lark_json(value)}\n", think, True))
        return OutputConstraint(grammar, param)
    if req.guided_regex is not None:
        if think is None:
            return OutputConstraint(regex_grammar(req.guided_regex), "guided_regex")
        grammar = thinking_grammar(f"start: {lark_regex(req.guided_regex)}\n", think)
        return OutputConstraint(grammar, "guided_regex")
    if req.guided_choice is not None:
        if len(req.guided_choice) > MAX_CHOICES:  # (refused before the grammar text is even built)
            raise APIError(
                400,
                f"{len(req.guided_choice)} options: at most {MAX_CHOICES} (the grammar engine's limit)",
                "guided_choice",
            )
        options = " | ".join(lark_literal(c) for c in req.guided_choice)
        return OutputConstraint(thinking_grammar(f"start: ({options})\n", think), "guided_choice")
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
    req: ChatCompletionRequest,
    use: ToolUse | None,
    call_token_ids: tuple[int | None, int | None],
    think: ThinkTokens | None,
) -> OutputConstraint | None:
    """The one grammar of a chat request: forced tool calls, or calls-or-answer, or the answer format; with
    ``think``, each behind an optional think block."""
    answer = answer_constraint(req, think)
    if use is None:
        return answer
    if use.choice == "auto":
        if answer is None:
            return None  # free text; calls are parsed from it
        schema = answer_schema(req)
        if schema is None:
            raise APIError(400, "with tools, only a JSON response_format can constrain the answer", answer.param)
        # The model may call tools or answer in the format asked for.
        grammar = tool_call_grammar(use.tools, use.parallel, *call_token_ids, or_json_schema=schema[0], think=think)
        return OutputConstraint(grammar, schema[1])
    if answer is not None:
        raise APIError(
            400, f"{answer.param} cannot be combined with a tool_choice that forces a tool call", answer.param
        )
    tools = use.tools if use.choice == "required" else [t for t in use.tools if t["function"]["name"] == use.choice]
    return OutputConstraint(tool_call_grammar(tools, use.parallel, *call_token_ids, think=think), "tools")
