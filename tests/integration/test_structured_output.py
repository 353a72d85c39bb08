"""Structured output and tool calls: grammars enforced by the worker's sampler, Hermes tool calls parsed from
the output, through the real server with the official openai client (random demo model: whatever it says,
the grammar must make it valid)."""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
import openai
import pytest
import torch
from helpers import DocumentedSchemas
from pydantic import BaseModel
from servers import CliServer, ThreadServer, data_events, server_settings

from engine.structured_output import (
    MAX_NUMBER_PART_DIGITS,
    GrammarCompiler,
    GrammarError,
    ThinkTokens,
    json_schema_grammar,
)
from engine.tokenizer import HFTokenizer
from loaders.assets import qwen3_tokenizer_dir
from npu.messages import SamplingOptions
from npu.sampler import Sampler, SequenceSamplingState, allowed_tokens
from server.tool_calls import ToolCallParser

MODEL = "test-model"
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
CHAT = [{"role": "user", "content": "Tell me about a person."}]
# A random model writes long random strings: bounded lengths keep each answer inside max_tokens.
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "role": {"type": "string", "enum": ["admin", "editor", "viewer"]},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 16},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address", "tags", "active"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER_TOOL, TIME_TOOL]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def server(serve_model):
    s = CliServer(serve_model, "--served-model-name", MODEL, "--max-model-len", "2048", "--kv-cache-memory", "64MiB")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0, timeout=120)


# ------------------------------------------------------------------------------------------------
# pieces
# ------------------------------------------------------------------------------------------------
def test_masks_touch_only_their_rows():
    vocab = 1000
    logits = torch.randn(3, vocab)
    allowed = {5, 77, 999}
    words = [0] * (vocab // 32 + 1)
    for t in allowed:
        words[t // 32] |= 1 << (t % 32)
    mask = torch.tensor(words, dtype=torch.int64).to(torch.int32).numpy().tobytes()
    assert set(allowed_tokens([mask], vocab)[0].nonzero().flatten().tolist()) == allowed
    greedy, hot = SamplingOptions(temperature=0.0), SamplingOptions(temperature=1.0, seed=7)
    sampler = Sampler(vocab)

    def run(masks):
        states = [SequenceSamplingState(o, [1]) for o in (greedy, greedy, hot)]
        return [t.token_id for t in sampler.sample(logits.clone(), [0, 1, 2], states, None, masks)[0]]

    free = run(None)
    constrained = run([None, mask, mask])
    assert constrained[0] == free[0]  # a row without a mask is sampled exactly as before
    assert constrained[1] in allowed and constrained[2] in allowed
    assert constrained[1] == max(allowed, key=lambda t: logits[1, t])


@pytest.fixture(scope="module")
def qwen3_grammars():
    """(tokenizer, GrammarCompiler, ThinkTokens) for the real Qwen3 vocabulary."""
    tok = HFTokenizer(qwen3_tokenizer_dir())
    think = ThinkTokens(tok.token_to_id("<think>"), tok.token_to_id("</think>"))
    return tok, GrammarCompiler(tok.to_json, 151936, (151645,)), think


def _walk(matcher, tok, text: str) -> None:
    """Feed ``text``'s tokens, each of which the matcher's mask must allow."""
    for t in tok.encode(text):
        assert allowed_tokens([matcher.bitmask()], 151936)[0, t], (text, tok.decode([t]))
        matcher.accept(t)


def test_thinking_is_optional_and_free_until_it_closes(qwen3_grammars):
    """A thinking model's constrained answer: the grammar applies from the first token, which may open a think
    block (free text until it closes) or be the answer itself; a model that never thinks is constrained too."""
    from server.constraints import answer_constraint
    from server.schemas import ChatCompletionRequest

    tok, compiler, think = qwen3_grammars
    req = ChatCompletionRequest(messages=CHAT, response_format={"type": "json_object"})
    compiled = compiler.compile(answer_constraint(req, think).grammar)
    assert compiler.compile(answer_constraint(req, think).grammar) is compiled  # cached
    first = allowed_tokens([compiled.matcher().bitmask()], 151936)[0]
    assert first[think.open_id] and first[tok.token_to_id("{")]
    assert not first[think.close_id] and not first[tok.token_to_id("hello")]  # no stray </think>, no free text
    direct = compiled.matcher()
    _walk(direct, tok, '{"a": 1}')
    assert direct.finished and direct.error is None
    thought = compiled.matcher()
    _walk(thought, tok, "<think>\nhmm, {not json} 12345678901234567890123</think>\n\n")
    assert not allowed_tokens([thought.bitmask()], 151936)[0, tok.token_to_id("hello")]
    _walk(thought, tok, '{"a": 1}')
    assert thought.finished and thought.error is None


def test_json_numbers_are_bounded_but_strings_and_thoughts_are_not(qwen3_grammars):
    from server.constraints import answer_constraint
    from server.schemas import ChatCompletionRequest

    tok, compiler, think = qwen3_grammars
    schema = {
        "type": "object",
        "properties": {"v": {"type": "number"}, "s": {"type": "string"}, "big": {"type": "integer", "minimum": 10**17}},
    }
    req = ChatCompletionRequest(
        messages=CHAT, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    )
    digit, close = tok.token_to_id("7"), tok.token_to_id("}")
    for constraint in (answer_constraint(req), answer_constraint(req, think)):
        compiled = compiler.compile(constraint.grammar)
        for prefix in ('{"v": ', '{"v": -', '{"v": 1.', '{"v": 1.5e', '{"v": 2E+'):
            m = compiled.matcher()
            _walk(m, tok, prefix + "7" * MAX_NUMBER_PART_DIGITS)
            allowed = allowed_tokens([m.bitmask()], 151936)[0]
            assert not allowed[digit] and allowed[close], prefix  # the number may end, not grow
        m = compiled.matcher()
        _walk(m, tok, '{"v": ' + "7" * MAX_NUMBER_PART_DIGITS + ".")
        assert allowed_tokens([m.bitmask()], 151936)[0, digit]  # each part has its own bound: the fraction
        _walk(m, tok, '5, "s": "' + "7" * 40)
        assert allowed_tokens([m.bitmask()], 151936)[0, digit]  # a string is not a number
        # a schema that needs more digits than the bound gets them (the grammar's mask, never a dead end), and
        # not one more: 10**17 has 18 digits
        m = compiled.matcher()
        _walk(m, tok, '{"big": ' + "1" * 18)
        allowed = allowed_tokens([m.bitmask()], 151936)[0]
        assert not allowed[digit] and allowed[close]
    m = compiler.compile(answer_constraint(req, think).grammar).matcher()
    _walk(m, tok, "<think>" + "9" * 40 + "</think>" + '{"v": 1}')  # digits in a thought are free
    assert m.finished


def test_bad_schemas_are_refused(qwen3_grammars):
    _, compiler, _ = qwen3_grammars
    for bad in ({"type": "frobnicate"}, {"type": "string", "pattern": "("}, {"$ref": "#/nowhere"}):
        with pytest.raises(GrammarError):
            compiler.compile(json_schema_grammar(bad))


@pytest.mark.parametrize("step", [1, 2, 7, 10_000])
def test_tool_call_parser_is_the_same_however_the_text_arrives(step):
    text = (
        "Let me check both.\n\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Pa\\"ris {x}", "days": [1, {"a": 2}]}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    )
    parser, content, streamed = ToolCallParser(), "", {}
    for i in range(0, len(text), step):
        c, deltas = parser.feed(text[i : i + step])
        content += c
        for d in deltas:
            if d.started:
                assert d.index == len(streamed)
                streamed[d.index] = [d.call.name, ""]
            streamed[d.index][1] += d.arguments
    c, _ = parser.finish()
    content += c
    assert content == "Let me check both."  # no tag text leaks; text before the calls stays
    assert streamed == {
        0: ["get_weather", '{"city": "Pa\\"ris {x}", "days": [1, {"a": 2}]}'],
        1: ["get_time", "{}"],
    }
    assert json.loads(streamed[0][1]) == {"city": 'Pa"ris {x}', "days": [1, {"a": 2}]}
    assert [(c.name, c.arguments) for c in parser.calls] == [tuple(v) for v in streamed.values()]


def test_tool_call_parser_gives_back_what_is_not_a_call():
    for text in ("<tool_call>\nnot json at all\n</tool_call>", '<tool_call>\n{"name": "f", "argu'):
        parser = ToolCallParser()
        c1, d1 = parser.feed(text)
        c2, d2 = parser.finish()
        assert c1 + c2 == text and not d1 + d2 and not parser.calls


# ------------------------------------------------------------------------------------------------
# the server
# ------------------------------------------------------------------------------------------------
PERSON_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


def person_answers(client, **kw) -> list:
    """The choices of a PERSON-constrained chat request, each finished and valid against the schema."""
    r = client.chat.completions.create(
        model=MODEL, messages=CHAT, temperature=1.0, max_tokens=400, response_format=PERSON_FORMAT, **kw
    )
    for ch in r.choices:
        assert ch.finish_reason == "stop", ch.message.content
        jsonschema.validate(json.loads(ch.message.content), PERSON)
    return r.choices


def test_json_schema_answers_validate(client):
    assert len(person_answers(client, n=4, extra_body=NO_THINKING)) == 4


def test_json_schema_binds_a_thinking_model_that_does_not_think(client):
    """Thinking on (the template's default), a model that never opens <think>: the answer is constrained from its
    first token, not left free while the grammar waits for a </think> that never comes."""
    never_think = {"151667": -100}  # <think>
    for ch in person_answers(client, n=3, seed=3, logit_bias=never_think):
        assert ch.message.model_extra.get("reasoning_content") is None


RUNAWAY_NUMBER = '{"city": "Paris", "population_millions": 1.52' + "8" * 60 + "}"


@pytest.fixture(scope="module")
def runaway_number_server(serve_model):
    """A replayed model that keeps writing digits (the grammar's mask decides what it can write)."""
    yield from replayed(serve_model, RUNAWAY_NUMBER)


@pytest.mark.parametrize("thinking", [False, True])
def test_a_runaway_number_is_cut_and_the_json_completes(runaway_number_server, thinking):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "population_millions": {"type": "number"}},
        "required": ["city", "population_millions"],
    }
    c = openai.OpenAI(base_url=f"{runaway_number_server.base}/v1", api_key="x", max_retries=0)
    r = c.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=200,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}},
        extra_body={"chat_template_kwargs": {"enable_thinking": thinking}},
    )
    content = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop", content
    value = json.loads(content)
    assert value["city"] == "Paris"
    assert content == '{"city": "Paris", "population_millions": 1.52' + "8" * (MAX_NUMBER_PART_DIGITS - 2) + "}"
    # free text is not bounded: the same script without a grammar writes every digit
    r = c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=200, extra_body=NO_THINKING)
    assert r.choices[0].message.content == RUNAWAY_NUMBER


def test_a_grammar_that_ends_before_min_tokens_ends_the_output(server):
    """min_tokens past the end of a grammar: the grammar wins, the answer is whole and valid, finish_reason
    "stop" (it was a 500, "probability tensor contains inf", as the grammar allowed only the EOS min_tokens
    suppressed)."""
    boolean = {"type": "json_schema", "json_schema": {"name": "flag", "schema": {"type": "boolean"}}}
    chat = {"model": MODEL, "messages": CHAT, "response_format": boolean, "min_tokens": 60, "max_tokens": 100}
    r = httpx.post(f"{server.base}/v1/chat/completions", json={**chat, **NO_THINKING}, timeout=120)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop" and json.loads(choice["message"]["content"]) in (True, False)
    assert r.json()["usage"]["completion_tokens"] < 60
    prompt = {"model": MODEL, "prompt": "Answer:", "response_format": boolean, "min_tokens": 30, "max_tokens": 40}
    events = data_events(server.base, "/v1/completions", prompt)
    assert json.loads("".join(e["choices"][0]["text"] for e in events)) in (True, False)
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_a_model_whose_vocabulary_the_tokenizer_outgrows_refuses_grammars_clearly():
    """A checkpoint whose vocab_size is smaller than its tokenizer's vocabulary has no grammar view: a
    GrammarError (a 400 naming the field) every time, not a ValueError (a 500), and not rebuilt each time."""
    tok = HFTokenizer(qwen3_tokenizer_dir())
    builds = []
    compiler = GrammarCompiler(lambda: builds.append(1) or tok.to_json(), 1000, (151645,))
    for _ in range(2):
        with pytest.raises(GrammarError, match="not available for this model.*vocabulary of 1000 ids"):
            compiler.compile(json_schema_grammar({"type": "boolean"}))
    assert builds == [1]


def test_json_object_answers_parse(client):
    # Random strings only end when a quote is drawn: a bias toward closing tokens keeps answers short;
    # whatever is drawn, the grammar must keep the text a JSON object.
    closers = {'"': 4, '"}': 6, "}": 4, '",': 2}
    tok = HFTokenizer(qwen3_tokenizer_dir())
    bias = {str(tok.token_to_id(t)): b for t, b in closers.items()}
    r = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        n=4,
        temperature=1.0,
        max_tokens=400,
        logit_bias=bias,
        response_format={"type": "json_object"},
        extra_body=NO_THINKING,
    )
    for ch in r.choices:
        assert ch.finish_reason == "stop", ch.message.content
        assert isinstance(json.loads(ch.message.content), dict)


def test_parse_with_a_pydantic_model(client):
    class Address(BaseModel):
        city: str
        zip: str

    class Person(BaseModel):
        name: str
        age: int
        address: Address

    bias = {str(HFTokenizer(qwen3_tokenizer_dir()).token_to_id('"')): 5}  # (random strings end sooner)
    r = client.beta.chat.completions.parse(
        model=MODEL,
        messages=CHAT,
        response_format=Person,
        max_tokens=600,
        seed=3,
        logit_bias=bias,
        extra_body=NO_THINKING,
    )
    person = r.choices[0].message.parsed
    assert isinstance(person, Person) and isinstance(person.address, Address)


def _check_calls(choice, allowed_names: set[str]) -> None:
    calls = choice.message.tool_calls
    assert calls, choice.message
    for c in calls:
        assert c.type == "function" and c.id.startswith("call_") and c.function.name in allowed_names
        jsonschema.validate(json.loads(c.function.arguments), SCHEMAS[c.function.name])


def test_tool_choice_required_and_named(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        n=4,
        temperature=1.0,
        max_tokens=300,
        extra_body=NO_THINKING,
    )
    for ch in r.choices:
        assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1
        assert ch.message.content is None
        _check_calls(ch, {"get_weather", "get_time"})
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What time is it?"}],
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        n=2,
        temperature=1.0,
        max_tokens=300,
        extra_body=NO_THINKING,
    )
    for ch in r.choices:
        assert ch.finish_reason == "tool_calls"
        _check_calls(ch, {"get_time"})


def test_streamed_tool_calls_equal_the_non_streamed_ones(client):
    kw = dict(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather in Paris and the time?"}],
        tools=TOOLS,
        tool_choice="required",
        temperature=1.0,
        seed=11,
        max_tokens=300,
        extra_body=NO_THINKING,
    )
    whole = client.chat.completions.create(**kw)
    calls: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kw):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        assert not delta.content  # no <tool_call> text leaks into content
        for d in delta.tool_calls or []:
            if d.id is not None:  # a call's first delta: index, id, type and name
                assert d.index == len(calls) and d.type == "function" and d.function.name
                calls[d.index] = {"name": d.function.name, "arguments": d.function.arguments or ""}
            else:
                assert d.function.name is None
                calls[d.index]["arguments"] += d.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    expected = [
        {"name": c.function.name, "arguments": c.function.arguments} for c in whole.choices[0].message.tool_calls
    ]
    assert list(calls.values()) == expected
    assert finish == whole.choices[0].finish_reason


def test_tool_call_bodies_match_their_documented_schemas(server):
    """Tool calls (whole and as streamed deltas) as the wire carries them, against /openapi.json."""
    base = server.base
    schemas = DocumentedSchemas(httpx.get(f"{base}/openapi.json").json())
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Weather in Paris and the time?"}],
        "tools": TOOLS,
        "tool_choice": "required",
        "temperature": 1.0,
        "seed": 11,
        "max_tokens": 300,
        **NO_THINKING,
    }
    whole = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120).json()
    schemas.validate("ChatCompletion", whole)
    assert whole["choices"][0]["message"]["tool_calls"]
    deltas = []
    for event in data_events(base, "/v1/chat/completions", body):
        schemas.validate("ChatCompletionChunk", event)
        deltas += [d for ch in event["choices"] for d in ch["delta"].get("tool_calls", [])]
    assert deltas and "id" in deltas[0] and "name" in deltas[0]["function"]


def test_constraint_errors_name_the_field(server):
    url = f"{server.base}/v1/chat/completions"

    def error(**body) -> dict:
        r = httpx.post(url, json={"model": MODEL, "messages": CHAT, **body}, timeout=60)
        assert r.status_code == 400, r.text
        return r.json()["error"]

    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}
    assert error(response_format=bad_schema)["param"] == "response_format.json_schema.schema"
    assert error(response_format={"type": "yaml"})["param"] == "response_format.type"
    err = error(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert err["param"] == "tool_choice" and "nope" in err["message"]
    assert error(tool_choice="required")["param"] == "tool_choice"
    assert error(tools=[{"type": "function", "function": {"name": "bad name!"}}])["param"].startswith("tools")
    assert error(response_format={"type": "json_object"}, guided_regex="a+")["param"] == "guided_regex"
    # tool_choice "none" with tools is not an error: tools are ignored
    r = httpx.post(url, json={"model": MODEL, "messages": CHAT, "tools": TOOLS, "tool_choice": "none", "max_tokens": 2})
    assert r.status_code == 200 and not r.json()["choices"][0]["message"].get("tool_calls")


def _objects_with_one_key(count: int) -> list[dict]:
    return [
        {"type": "object", "properties": {f"k{i}": {"type": "integer"}}, "required": [f"k{i}"]} for i in range(count)
    ]


# Grammars the grammar engine cannot follow to the end (its limits, met as it runs) or would not enforce
# exactly: each a 400 naming the field, at once, never a 200 whose answer goes on unconstrained.
UNFOLLOWABLE = {
    "choice of 2000": ({"guided_choice": [f"option{i}" for i in range(2000)]}, "guided_choice", "at most 1999"),
    "550 optional properties": (
        {
            "guided_json": {
                "type": "object",
                "properties": {f"p{i}": {"type": "string"} for i in range(550)},
                "additionalProperties": False,
            }
        },
        "guided_json",
        "row has",
    ),
    "anyOf of 2001 objects": ({"guided_json": {"anyOf": _objects_with_one_key(2001)}}, "guided_json", "row has"),
    "enum of 60k": ({"guided_json": {"type": "string", "enum": [f"v{i}" for i in range(60_000)]}}, "guided_json", ""),
    "700 KB literal regex": ({"guided_regex": "ab" * 350_000}, "guided_regex", "over the server's limit"),
    "exclusive bounds it would not enforce": (
        {
            "guided_json": {
                "type": "object",
                "properties": {"v": {"type": "number", "exclusiveMinimum": 0, "maximum": 0.001}},
            }
        },
        "guided_json",
        "exclusiveMinimum 0 with maximum 0.001",
    ),
    "a $ref to itself": (
        {"guided_json": {"$defs": {"n": {"$ref": "#/$defs/n"}}, "$ref": "#/$defs/n"}},
        "guided_json",
        "refers to itself",
    ),
}


@pytest.mark.parametrize("case", list(UNFOLLOWABLE))
def test_a_grammar_the_engine_cannot_follow_is_a_400(server, case):
    fields, param, fragment = UNFOLLOWABLE[case]
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 8, **fields, **NO_THINKING}
    r = httpx.post(f"{server.base}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 400, r.text[:500]
    err = r.json()["error"]
    assert err["param"] == param and fragment in err["message"], err


# A grammar that passes the compile-time probe and meets the engine's limit mid-answer: at the value of "b"
LATE_LIMIT_SCHEMA = {
    "type": "object",
    "properties": {"a": {"type": "string"}, "b": {"anyOf": _objects_with_one_key(2001)}},
    "required": ["a", "b"],
}


@pytest.fixture(scope="module")
def late_limit_server(serve_model):
    """A replayed model that writes a valid answer to LATE_LIMIT_SCHEMA (the grammar fails under it)."""
    yield from replayed(serve_model, '{"a": "x", "b": {"k5": 1}}')


def test_a_grammar_that_fails_mid_answer_ends_the_request_with_an_error(late_limit_server):
    base = late_limit_server.base
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 40, "guided_json": LATE_LIMIT_SCHEMA, **NO_THINKING}
    r = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 500, r.text[:500]
    assert "grammar could not be enforced" in r.json()["error"]["message"] and "row has" in r.json()["error"]["message"]
    events = data_events(base, "/v1/chat/completions", body)  # (up to [DONE])
    assert "grammar could not be enforced" in events[-1]["error"]["message"], events[-3:]
    assert not any(c.get("finish_reason") for e in events[:-1] for c in e.get("choices") or [])
    (line,) = [
        x for x in httpx.get(f"{base}/metrics").text.splitlines() if x.startswith("a8w8:constraint_failures_total")
    ]
    assert float(line.split()[-1]) == 2.0, line


def test_grammar_cut_by_max_tokens_ends_with_length(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=5,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
        extra_body=NO_THINKING,
    )
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content.startswith("{")


def test_completions_guided_fields(client):
    r = client.completions.create(
        model=MODEL, prompt="Pick one:", max_tokens=20, extra_body={"guided_choice": ["yes", "no", "maybe"]}
    )
    assert r.choices[0].text in ("yes", "no", "maybe")
    r = client.completions.create(
        model=MODEL, prompt="A zip code:", max_tokens=20, extra_body={"guided_regex": "[0-9]{5}"}, temperature=1.0
    )
    assert len(r.choices[0].text) == 5 and r.choices[0].text.isdigit()
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    r = client.completions.create(
        model=MODEL,
        prompt="JSON:",
        max_tokens=20,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}},
    )
    jsonschema.validate(json.loads(r.choices[0].text), schema)


def test_constrained_and_free_requests_share_a_batch(server):
    """8 at once: 4 constrained by different schemas, 4 free; the free ones equal their solo outputs."""
    url = f"{server.base}/v1/chat/completions"
    schemas = [
        PERSON,
        {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 4},
        {
            "type": "object",
            "properties": {"ok": {"type": "boolean"}},
            "required": ["ok"],
            "additionalProperties": False,
        },
        {"type": "string", "enum": ["red", "green", "blue"]},
    ]

    def body(i: int, schema: dict | None) -> dict:
        b = {"model": MODEL, "messages": [{"role": "user", "content": f"Item {i}"}], "max_tokens": 48, "seed": i,
             "temperature": 1.0, **NO_THINKING}  # fmt: skip
        if schema is not None:
            b["max_tokens"] = 400
            b["response_format"] = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}}
        return b

    solo = [
        httpx.post(url, json=body(i, None), timeout=120).json()["choices"][0]["message"]["content"] for i in range(4)
    ]

    async def main():
        async with httpx.AsyncClient(timeout=300) as http:
            reqs = [http.post(url, json=body(i, None)) for i in range(4)]
            reqs += [http.post(url, json=body(10 + i, s)) for i, s in enumerate(schemas)]
            return await asyncio.gather(*reqs)

    replies = [r.json()["choices"][0] for r in asyncio.run(main())]
    assert [c["message"]["content"] for c in replies[:4]] == solo
    for choice, schema in zip(replies[4:], schemas):
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)


def test_tool_conversation_renders_as_transformers_does(server):
    from transformers import AutoTokenizer

    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
        {"role": "user", "content": "And the time?"},
    ]
    r = httpx.post(f"{server.base}/tokenize", json={"model": MODEL, "messages": messages, "tools": TOOLS})
    assert r.status_code == 200, r.text
    hf = AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir()))
    expected = hf.apply_chat_template(messages, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert hf.decode(r.json()["tokens"]) == expected


# ------------------------------------------------------------------------------------------------
# a replayed model output: tool calls after reasoning (Qwen3 thinking on), tool_choice "auto"
# ------------------------------------------------------------------------------------------------
REPLAYED = (
    "<think>\nThe user wants weather and time.\n</think>\n\nChecking.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
)


@pytest.fixture(scope="module")
def replay_server(serve_model):
    yield from replayed(serve_model, REPLAYED)


def replayed(serve_model, text: str):
    """A server whose worker replays ``text``'s tokens, then <|im_end|> (for a fixture to yield from)."""
    s = ThreadServer(create_app_for_replay(serve_model, HFTokenizer(qwen3_tokenizer_dir()).encode(text) + [151645]))
    yield s
    s.stop()


def create_app_for_replay(serve_model, ids):
    from server.app import create_app

    return create_app(server_settings(serve_model, worker={"replay_token_ids": ids}))


def test_auto_tool_calls_after_reasoning(replay_server):
    c = openai.OpenAI(base_url=f"{replay_server.base}/v1", api_key="x", max_retries=0)
    r = c.chat.completions.create(model=MODEL, messages=CHAT, tools=TOOLS)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert msg.model_extra["reasoning_content"] == "\nThe user wants weather and time.\n"
    assert msg.content == "Checking."
    assert [(t.function.name, json.loads(t.function.arguments)) for t in msg.tool_calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"}),
        ("get_time", {"zone": "CET"}),
    ]
    content, indices = "", []
    for chunk in c.chat.completions.create(model=MODEL, messages=CHAT, tools=TOOLS, stream=True):
        if chunk.choices:
            content += chunk.choices[0].delta.content or ""
            indices += [d.index for d in chunk.choices[0].delta.tool_calls or [] if d.id]
    assert content == "Checking." and indices == [0, 1]
    # without tools, the same output is plain text
    r = c.chat.completions.create(model=MODEL, messages=CHAT)
    assert "<tool_call>" in r.choices[0].message.content and not r.choices[0].message.tool_calls


@pytest.mark.parametrize(
    "field, answer",
    [
        ({"guided_regex": "a/b[0-9]{2}"}, "a/b12"),
        ({"guided_regex": "a\\/b"}, "a/b"),  # a slash the pattern escapes itself
        ({"guided_choice": ["yes", "no"]}, "no"),
        ({"response_format": {"type": "json_object"}}, '{"a": 1}'),
    ],
)
def test_answer_grammars_allow_the_blank_line_after_thinking(field, answer, qwen3_grammars):
    from server.constraints import answer_constraint
    from server.schemas import ChatCompletionRequest

    tok, compiler, think = qwen3_grammars
    req = ChatCompletionRequest(messages=CHAT, **field)
    for with_think, text in ((None, answer), (think, "<think>x</think>\n\n" + answer), (think, answer)):
        m = compiler.compile(answer_constraint(req, with_think).grammar).matcher()
        _walk(m, tok, text)
        assert m.error is None and m.finished
    m = compiler.compile(answer_constraint(req).grammar).matcher()
    assert not allowed_tokens([m.bitmask()], 151936)[0, tok.encode("\n\n")[0]]  # no blank line without thinking


def test_a_short_or_odd_mask_allows_only_what_it_covers():
    vocab = 100
    short = bytes([0b00000101])  # tokens 0 and 2, nothing past the first 8 ids
    assert allowed_tokens([short], vocab)[0].nonzero().flatten().tolist() == [0, 2]
    assert allowed_tokens([b"\xff" * 64], vocab)[0].all()  # a longer mask is cut at the vocabulary


@pytest.fixture(scope="module")
def stray_close_server(serve_model):
    """A replayed model that writes </think> first, never having opened a think block, then an answer."""
    yield from replayed(serve_model, '</think>\n\n{"a": 1}')


def test_the_grammar_and_the_reasoning_split_agree_on_where_the_answer_starts(stray_close_server):
    """Thinking on, a JSON answer: a </think> the model writes without a <think> is not allowed by the grammar
    (so it never reaches the content, which parses)."""
    c = openai.OpenAI(base_url=f"{stray_close_server.base}/v1", api_key="x", max_retries=0)
    r = c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=20, response_format={"type": "json_object"})
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "stop" and json.loads(msg.content) == {"a": 1}, msg
    assert "</think>" not in msg.content and msg.model_extra.get("reasoning_content") is None
