"""The APIs agents speak, through their own SDKs against a real server on 127.0.0.1: OpenAI's Responses API
(``openai``'s ``client.responses``, and an ``openai-agents`` Agent running its loop) and Anthropic's Messages API
(``anthropic``'s ``client.messages``). A random model answers what a grammar forces (tool calls, JSON schemas);
a replaying worker answers scripted reasoning, text and calls exactly."""

from __future__ import annotations

import json
from typing import Annotated, Literal

import anthropic
import httpx
import jsonschema
import openai
import pytest
from openai.types.shared import Reasoning
from pydantic import BaseModel, Field
from servers import MODEL, ThreadServer, metric, server_settings

from engine.tokenizer import HFTokenizer
from loaders.assets import qwen3_tokenizer_dir
from server.app import create_app

CITY_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"type": "string", "enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
RESPONSES_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather in a city",
    "parameters": CITY_SCHEMA,
}
ANTHROPIC_TOOL = {"name": "get_weather", "description": "Weather in a city", "input_schema": CITY_SCHEMA}
NO_THINKING = {"effort": "none"}  # (a random model that opens a think block may not close it in time)
REPLAYED = (
    "<think>\nThe user wants the weather.\n</think>\n\nChecking.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
)
REPLAYED_ANSWER = "<think>\nEasy.\n</think>\n\nIt is sunny."
IM_END = 151645


@pytest.fixture(scope="module")
def server(serve_model):
    s = ThreadServer(create_app(server_settings(serve_model, api_key="sekret")))
    yield s
    s.stop()


def _replay(serve_model, text: str, **settings):
    ids = HFTokenizer(qwen3_tokenizer_dir()).encode(text) + [IM_END]
    return ThreadServer(create_app(server_settings(serve_model, worker={"replay_token_ids": ids}, **settings)))


@pytest.fixture(scope="module")
def replay_calls(serve_model):
    s = _replay(serve_model, REPLAYED)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def replay_answer(serve_model):
    s = _replay(serve_model, REPLAYED_ANSWER, responses_store_max_count=2)
    yield s
    s.stop()


def _openai(s: ThreadServer, key: str = "sekret") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{s.base}/v1", api_key=key, max_retries=0)


def _anthropic(s: ThreadServer, key: str = "sekret") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=s.base, api_key=key, max_retries=0)


# ---- /v1/responses ----------------------------------------------------------------------------------------
def test_responses_text_and_usage(server):
    c = _openai(server)
    r = c.responses.create(
        model=MODEL,
        input="Hello",
        instructions="Be brief.",
        max_output_tokens=6,
        reasoning=NO_THINKING,
        metadata={"ticket": "42"},
        user="u-1",
    )
    assert r.metadata == {"ticket": "42"} and r.user == "u-1" and r.max_output_tokens == 6
    assert r.object == "response" and r.id.startswith("resp_") and r.instructions == "Be brief."
    (message,) = r.output
    assert message.type == "message" and message.role == "assistant" and r.output_text == message.content[0].text
    # a random model does not stop by itself within 6 tokens: the response ran out of them
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 6 and r.usage.output_tokens_details.reasoning_tokens == 0
    rendered = httpx.post(
        f"{server.base}/tokenize",
        json={
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
            "chat_template_kwargs": {"enable_thinking": False},
        },
    ).json()
    assert r.usage.input_tokens == rendered["count"]  # the same chat template as /v1/chat/completions
    assert r.usage.total_tokens == r.usage.input_tokens + 6
    assert metric(server.base, "a8w8:api_requests_total", 'api="responses"') >= 1


def test_responses_stream_events_are_typed_and_numbered(replay_answer):
    c = _openai(replay_answer)
    with c.responses.stream(model=MODEL, input="Weather?") as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    for kind in (
        "output_item.added",
        "content_part.added",
        "output_text.delta",
        "output_text.done",
        "output_item.done",
    ):
        assert f"response.{kind}" in types, kind
    assert "response.reasoning_text.delta" in types
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == final.output_text == "It is sunny."
    reasoning, message = final.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text.strip() == "Easy."
    assert message.type == "message" and final.status == "completed"
    ids = HFTokenizer(qwen3_tokenizer_dir()).encode(REPLAYED_ANSWER)
    assert final.usage.output_tokens_details.reasoning_tokens == ids.index(151668) + 1  # through </think>


def test_responses_parse_a_json_schema(server):
    class Weather(BaseModel):
        city: Literal["Paris", "Rome", "Oslo"]
        degrees: int = Field(ge=-40, le=50)

    c = _openai(server)
    r = c.responses.parse(
        model=MODEL, input="Weather?", text_format=Weather, max_output_tokens=40, temperature=1.0, reasoning=NO_THINKING
    )
    assert r.status == "completed"
    assert isinstance(r.output_parsed, Weather)


def test_responses_function_call_round_trip(server):
    c = _openai(server)
    tools = [RESPONSES_TOOL]
    first = c.responses.create(
        model=MODEL,
        input="What is the weather in Paris?",
        tools=tools,
        tool_choice={"type": "function", "name": "get_weather"},
        max_output_tokens=64,
        reasoning=NO_THINKING,
    )
    (call,) = [o for o in first.output if o.type == "function_call"]
    assert call.name == "get_weather" and call.call_id and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), CITY_SCHEMA)
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}
    follow = dict(tools=tools, max_output_tokens=3, reasoning=NO_THINKING)
    chained = c.responses.create(model=MODEL, previous_response_id=first.id, input=[result], **follow)
    by_hand = c.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
            result,
        ],
        **follow,
    )
    assert chained.previous_response_id == first.id
    # the stored conversation and the items passed back by hand render the same prompt
    assert chained.usage.input_tokens == by_hand.usage.input_tokens > first.usage.input_tokens


def test_responses_are_stored_retrieved_deleted_and_bounded(replay_answer):
    c = _openai(replay_answer)
    first = c.responses.create(model=MODEL, input="one")
    assert c.responses.retrieve(first.id).output_text == first.output_text == "It is sunny."
    c.responses.create(model=MODEL, input="two", store=False)  # not stored: the store keeps first
    assert c.responses.retrieve(first.id).id == first.id
    second, third = (c.responses.create(model=MODEL, input=x) for x in ("two", "three"))
    with pytest.raises(openai.NotFoundError):  # (the store holds 2: the oldest was evicted)
        c.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError) as e:
        c.responses.create(model=MODEL, input="four", previous_response_id=first.id)
    assert e.value.body["param"] == "previous_response_id"
    c.responses.delete(second.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(second.id)
    assert c.responses.retrieve(third.id).id == third.id


def test_responses_reasoning_text_and_calls_from_a_replayed_output(replay_calls):
    c = _openai(replay_calls)
    r = c.responses.create(model=MODEL, input="Weather in Paris?", tools=[RESPONSES_TOOL])
    assert [o.type for o in r.output] == ["reasoning", "message", "function_call"]
    assert r.output[1].content[0].text == "Checking."
    assert json.loads(r.output[2].arguments) == {"city": "Paris", "unit": "c"}
    with c.responses.stream(model=MODEL, input="Weather in Paris?", tools=[RESPONSES_TOOL]) as stream:
        events = list(stream)
        final = stream.get_final_response()
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert json.loads(arguments) == {"city": "Paris", "unit": "c"}
    assert [o.type for o in final.output] == ["reasoning", "message", "function_call"]
    assert [o.id for o in final.output] == [e.item.id for e in events if e.type == "response.output_item.done"]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools"),
        ({"input": [{"type": "function_call_output", "call_id": "call_1", "output": "x"}]}, "input[0].call_id"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input[0].content[0].type",
        ),
        (
            {"input": "x", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}},
            "text.format.schema",
        ),
    ],
)
def test_responses_bad_input_is_a_400_naming_the_field(server, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        _openai(server).responses.create(model=MODEL, **body)
    assert e.value.body["param"] == param, e.value.body
    assert e.value.body["type"] == "BadRequestError"


def test_an_agent_runs_its_loop_against_the_server(server):
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)
    ran: list[dict] = []

    @agents.function_tool
    def get_weather(city: Annotated[str, Field(max_length=12)], unit: Literal["c", "f"]) -> str:
        """Weather in a city."""
        ran.append({"city": city, "unit": unit})
        return "sunny"

    model = agents.OpenAIResponsesModel(
        model=MODEL, openai_client=openai.AsyncOpenAI(base_url=f"{server.base}/v1", api_key="sekret", max_retries=0)
    )
    agent = agents.Agent(
        name="weather",
        instructions="Answer with the weather tool.",
        model=model,
        tools=[get_weather],
        model_settings=agents.ModelSettings(
            tool_choice="get_weather", max_tokens=96, reasoning=Reasoning(effort="none")
        ),
        tool_use_behavior="stop_on_first_tool",
    )
    result = agents.Runner.run_sync(agent, "What is the weather in Paris?", max_turns=2)
    assert result.final_output == "sunny"
    (args,) = ran
    jsonschema.validate(args, get_weather.params_json_schema)


# ---- /v1/messages -----------------------------------------------------------------------------------------
def test_messages_text_usage_and_count_tokens(server):
    a = _anthropic(server)
    chat = [{"role": "user", "content": "Hello"}]
    m = a.messages.create(model=MODEL, max_tokens=5, system="Be brief.", messages=chat)
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_")
    (block,) = m.content
    assert block.type == "text" and m.stop_reason == "max_tokens" and m.usage.output_tokens == 5
    counted = a.messages.count_tokens(model=MODEL, system="Be brief.", messages=chat)
    assert counted.input_tokens == m.usage.input_tokens  # the prompt the engine saw
    assert metric(server.base, "a8w8:api_requests_total", 'api="messages"') >= 1


def test_messages_stream_with_the_sdk(server):
    a = _anthropic(server)
    with a.messages.stream(model=MODEL, max_tokens=6, messages=[{"role": "user", "content": "Hi"}]) as stream:
        events = list(stream)
        final = stream.get_final_message()
    types = [e.type for e in events]
    assert types[0] == "message_start" and types[-1] == "message_stop"
    assert "content_block_start" in types and "content_block_stop" in types and "message_delta" in types
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    assert final.content[0].text == text and final.stop_reason == "max_tokens" and final.usage.output_tokens == 6


def test_messages_forced_tool_call_and_tool_result_round_trip(server):
    a = _anthropic(server)
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    m = a.messages.create(
        model=MODEL,
        max_tokens=64,
        messages=ask,
        tools=[ANTHROPIC_TOOL],
        tool_choice={"type": "tool", "name": "get_weather"},
    )
    assert m.stop_reason == "tool_use"
    (use,) = [b for b in m.content if b.type == "tool_use"]
    assert use.name == "get_weather"
    jsonschema.validate(use.input, CITY_SCHEMA)
    turn = [*ask, {"role": "assistant", "content": [b.model_dump() for b in m.content]}]
    turn.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny"}]})
    after = a.messages.create(model=MODEL, max_tokens=3, messages=turn, tools=[ANTHROPIC_TOOL])
    counted = a.messages.count_tokens(model=MODEL, messages=turn, tools=[ANTHROPIC_TOOL])
    assert after.usage.input_tokens == counted.input_tokens > m.usage.input_tokens


def test_messages_thinking_text_and_tool_use_from_a_replayed_output(replay_calls):
    a = _anthropic(replay_calls)
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    args = dict(
        model=MODEL,
        max_tokens=200,
        messages=ask,
        tools=[ANTHROPIC_TOOL],
        thinking={"type": "enabled", "budget_tokens": 1024},
    )
    m = a.messages.create(**args)
    assert [b.type for b in m.content] == ["thinking", "text", "tool_use"]
    assert m.content[0].thinking.strip() == "The user wants the weather." and m.content[1].text == "Checking."
    assert m.content[2].input == {"city": "Paris", "unit": "c"} and m.stop_reason == "tool_use"
    with a.messages.stream(**args) as stream:
        events = list(stream)
        final = stream.get_final_message()
    deltas = {e.delta.type for e in events if e.type == "content_block_delta"}
    assert deltas == {"thinking_delta", "text_delta", "input_json_delta"}

    def blocks(message):  # (each call has an id of its own)
        return [b.model_dump(exclude={"id"}) for b in message.content]

    assert blocks(final) == blocks(m)
    # the thinking block replayed in the next turn reaches the template as the assistant's reasoning
    replayed = [*ask, {"role": "assistant", "content": [b.model_dump() for b in m.content]}]
    replayed.append(
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": m.content[2].id, "content": "sunny"}]}
    )
    with_thinking = a.messages.count_tokens(model=MODEL, messages=replayed, tools=[ANTHROPIC_TOOL])
    without = [*ask, {"role": "assistant", "content": [b.model_dump() for b in m.content[1:]]}, replayed[-1]]
    assert (
        with_thinking.input_tokens
        > a.messages.count_tokens(model=MODEL, messages=without, tools=[ANTHROPIC_TOOL]).input_tokens
    )


def test_messages_stop_sequences_end_the_turn(serve_model):
    s = _replay(serve_model, REPLAYED_ANSWER)
    try:
        m = _anthropic(s).messages.create(
            model=MODEL,
            max_tokens=50,
            messages=[{"role": "user", "content": "Weather?"}],
            stop_sequences=["sunny"],
            thinking={"type": "enabled", "budget_tokens": 1024},
        )
        assert m.stop_reason == "stop_sequence" and m.stop_sequence == "sunny"
        assert m.content[-1].text == "It is "
        plain = _anthropic(s).messages.create(
            model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "Hi"}], thinking={"type": "enabled"}
        )
        assert plain.stop_reason == "end_turn" and plain.stop_sequence is None
    finally:
        s.stop()


def test_messages_errors_are_in_anthropics_shape(server):
    headers = {"x-api-key": "sekret", "anthropic-version": "2023-06-01"}
    r = httpx.post(
        f"{server.base}/v1/messages",
        json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]},
        headers=headers,
    )
    assert r.status_code == 400
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]
    a = _anthropic(server)
    with pytest.raises(anthropic.BadRequestError) as e:
        image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}
        a.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "user", "content": [image]}])
    assert "image" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as e:
        a.messages.create(
            model=MODEL,
            max_tokens=4,
            messages=[{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "x", "content": "y"}]}],
        )
    assert "tool_use_id" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as e:
        a.messages.create(model="no-such-model", max_tokens=4, messages=[{"role": "user", "content": "Hi"}])
    assert e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.AuthenticationError) as e:
        _anthropic(server, key="wrong").messages.create(
            model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "Hi"}]
        )
    assert e.value.body["error"]["type"] == "authentication_error"


def test_the_new_routes_are_documented_with_their_events(server):
    doc = httpx.get(f"{server.base}/openapi.json").json()
    for path in ("/v1/responses", "/v1/messages", "/v1/messages/count_tokens", "/v1/responses/{response_id}"):
        assert path in doc["paths"], path
    for schema in (
        "ResponsesRequest",
        "MessagesRequest",
        "ResponseStreamEvent",
        "MessageStreamEvent",
        "AnthropicError",
    ):
        assert schema in doc["components"]["schemas"], schema
    events = doc["paths"]["/v1/messages"]["post"]["responses"]["200"]["content"]["text/event-stream"]
    assert "event" in events["itemSchema"]["properties"]
