"""Chat template rendering, incremental detokenization, stop strings."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.chat_template import ChatTemplate, ChatTemplateError
from engine.detokenizer import IncrementalDetokenizer
from engine.stop import StopStringMatcher
from engine.tokenizer import HFTokenizer
from loaders.assets import qwen3_tokenizer_dir


@pytest.fixture(scope="module")
def template():
    return ChatTemplate.from_model_dir(qwen3_tokenizer_dir())


@pytest.fixture(scope="module")
def tok():
    return HFTokenizer(qwen3_tokenizer_dir())


def test_system_user_generation_prompt(template):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}]
    assert template.render(msgs) == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_enable_thinking_false_adds_empty_think(template):
    out = template.render([{"role": "user", "content": "Hi"}], enable_thinking=False)
    assert out == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_no_generation_prompt(template):
    out = template.render([{"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert out == "<|im_start|>user\nHi<|im_end|>\n"


def test_multi_turn_drops_old_reasoning_keeps_last(template):
    msgs = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "<think>\nr1\n</think>\n\nA1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": "A2", "reasoning_content": "r2"},
    ]
    out = template.render(msgs, add_generation_prompt=False)
    assert out == (
        "<|im_start|>user\nQ1<|im_end|>\n"
        "<|im_start|>assistant\nA1<|im_end|>\n"  # reasoning before the last user turn is dropped
        "<|im_start|>user\nQ2<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nr2\n</think>\n\nA2<|im_end|>\n"
    )


def test_tools_tool_calls_and_tool_responses(template):
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Météo",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": "20C"},
    ]
    out = template.render(msgs, tools=tools)
    tool_json = (
        '{"type": "function", "function": {"name": "get_weather", "description": "Météo", '
        '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}'
    )
    assert out == (
        "<|im_start|>system\nS\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + tool_json
        + "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
        '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\n20C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_raise_exception_is_a_client_error():
    t = ChatTemplate("{{ raise_exception('bad roles') }}")
    with pytest.raises(ChatTemplateError, match="bad roles"):
        t.render([{"role": "user", "content": "x"}])


def test_strftime_and_loopcontrols():
    t = ChatTemplate(
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}"
        "{{ strftime_now('%Y') | length }}"
    )
    assert t.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "a4"


TEXTS = [
    "Hello, world!",
    "日本語とEnglish混在 😀👨‍👩‍👧",
    "e\u0301 café\n\n\tcode()",
    "<think>x</think>\nDone.",
    "Ünïcödé " * 5,
]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenizer_token_by_token(tok, text):
    ids = tok.encode(text)
    det = IncrementalDetokenizer(tok, skip_special_tokens=True)
    pieces = [det.add([i]) for i in ids]
    pieces.append(det.flush())
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in pieces)


def test_detokenizer_never_emits_partial_utf8(tok):
    # byte-level tokens of one emoji, fed one at a time: nothing until the character is complete
    ids = tok.encode("𓀀")  # three byte-level tokens for one 4-byte character
    assert len(ids) == 3
    det = IncrementalDetokenizer(tok)
    assert [det.add([i]) for i in ids] == ["", "", "𓀀"]


def test_detokenizer_flushes_invalid_bytes(tok):
    ids = tok.encode("𓀀")[:1]  # dangling partial bytes
    det = IncrementalDetokenizer(tok)
    assert det.add(ids) == ""
    assert det.flush() == "\ufffd"


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet=st.sampled_from(list("ab \nxy")), max_size=40),
    stops=st.lists(st.text(alphabet=st.sampled_from(list("ab \nxy")), min_size=1, max_size=4), max_size=3),
    include=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_stop_strings_property(text, stops, include, seed):
    """Streaming in random pieces emits exactly the text before the first stop string (plus it if included)."""
    rng = random.Random(seed)
    matcher = StopStringMatcher(stops, include)
    out, stopped, pos = "", False, 0
    while pos < len(text) and not stopped:
        step = rng.randint(1, 5)
        piece, stopped = matcher.feed(text[pos : pos + step])
        out += piece
        pos += step
    if not stopped:
        out += matcher.flush()
    # reference: reveal the text one character at a time; the first stop string to complete wins
    # (the longer one when two complete on the same character)
    expected, expected_stop = text, None
    for i in range(1, len(text) + 1):
        done = [s for s in stops if text[:i].endswith(s)]
        if done:
            expected_stop = max(done, key=len)
            expected = text[: i - len(expected_stop)] + (expected_stop if include else "")
            break
    assert out == expected
    assert stopped == (expected_stop is not None)
    if stopped:
        assert matcher.matched == expected_stop


def test_stop_string_never_partially_emitted():
    m = StopStringMatcher(["STOP"])
    assert m.feed("abc ST") == ("abc ", False)
    assert m.feed("O") == ("", False)
    assert m.feed("P and more") == ("", True)
    m = StopStringMatcher(["STOP"])
    assert m.feed("ST") == ("", False)
    assert m.feed("ART") == ("START", False)
