"""The endpoints' response builders, driven with engine outputs directly (no HTTP, no worker): what a streamed
answer's chunks say, and that the chunks add up to the answer collected without streaming."""

from __future__ import annotations

import json

import pytest

from engine.async_engine import RequestOutput
from engine.sequence import TokenLogprob
from engine.tokenizer import HFTokenizer
from loaders.assets import qwen3_tokenizer_dir
from server.chat import ChatResponseBuilder
from server.completions import CompletionResponseBuilder


@pytest.fixture(scope="module")
def tok():
    return HFTokenizer(qwen3_tokenizer_dir())


def outputs(tok, pieces: list[str], index: int = 0, finish_reason: str = "stop", prompt_tokens: int = 5):
    """One choice's outputs, one token each: the pieces are single tokens (or, for the chat tests, their first
    token stands for them)."""
    outs = []
    for k, piece in enumerate(pieces):
        last = k == len(pieces) - 1
        token = tok.encode(piece)[0]
        outs.append(
            RequestOutput(
                request_id="r",
                index=index,
                new_text=piece,
                new_token_ids=[token],
                new_logprobs=[TokenLogprob(token, -0.5 - k, [(token, -0.5 - k)])],
                finished=last,
                finish_reason=finish_reason if last else None,
                stop_reason=None,
                prompt_tokens=prompt_tokens,
                completion_tokens=k + 1,
                cached_tokens=2,
            )
        )
    return outs


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def test_chat_builder_splits_reasoning_content_and_tool_calls(tok):
    pieces = ["<think>", "sunny?", "</think>", "\n\n", "Let me check. ", CALL]

    def build(**kw):
        return ChatResponseBuilder(tok, "chatcmpl-x", "m", 1, 5, thinking=True, tools=True, logprobs=0, **kw)

    collected = build()
    for out in outputs(tok, pieces):
        collected.add(0, out)
    body = json.loads(collected.response().serialized())
    message = body["choices"][0]["message"]
    assert message["reasoning_content"] == "sunny?"
    assert message["content"].strip() == "Let me check."
    (call,) = message["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert body["choices"][0]["finish_reason"] == "tool_calls"  # the model stopped to have its call run
    assert body["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 6,
        "total_tokens": 11,
        "prompt_tokens_details": {"cached_tokens": 2},
    }
    assert len(body["choices"][0]["logprobs"]["content"]) == 6

    streamed = build(include_usage=True)
    (opening,) = [json.loads(c.serialized()) for c in streamed.opening()]
    assert opening["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    chunks = [c for out in outputs(tok, pieces) for c in streamed.chunk(0, out)]
    deltas = [json.loads(c.serialized())["choices"][0]["delta"] for c in chunks]
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "sunny?"
    assert "".join(d.get("content", "") for d in deltas) == message["content"]
    (call_deltas,) = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert call_deltas[0]["function"]["name"] == "get_weather"
    last = json.loads(chunks[-1].serialized())["choices"][0]
    assert last["finish_reason"] == "tool_calls"
    (usage,) = [json.loads(c.serialized()) for c in streamed.closing()]
    assert usage["choices"] == [] and usage["usage"] == body["usage"]


def test_chat_builder_without_usage_or_logprobs_closes_with_nothing(tok):
    builder = ChatResponseBuilder(tok, "chatcmpl-y", "m", 2, 3)
    for index in (1, 0):
        for out in outputs(tok, ["Hel", "lo"], index=index, finish_reason="length"):
            builder.add(0, out)
    body = json.loads(builder.response().serialized())
    assert [c["message"]["content"] for c in body["choices"]] == ["Hello", "Hello"]
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "length"]
    assert all(c["logprobs"] is None for c in body["choices"])
    assert "reasoning_content" not in body["choices"][0]["message"]
    assert body["usage"]["completion_tokens"] == 4
    assert list(builder.closing()) == []


def test_completion_builder_indexes_prompts_by_n_and_echoes(tok):
    prompts = [("Once", [1, 2]), ("Twice", [3, 4, 5])]
    collected = CompletionResponseBuilder(tok, "cmpl-z", "m", 2, prompts, echo=True, logprobs=1)
    streamed = CompletionResponseBuilder(tok, "cmpl-z", "m", 2, prompts, echo=True, logprobs=1)
    words = {0: " red", 1: " green"}, {0: " cat", 1: " dog"}  # (by prompt, by choice): one token each
    assert all(len(tok.encode(w)) == 1 for by in words for w in by.values())
    runs = [(p, i, outputs(tok, [words[0][p], words[1][i]], index=i)) for p in (1, 0) for i in (0, 1)]
    texts: dict[int, str] = {}
    for event in streamed.opening():
        (choice,) = json.loads(event.serialized())["choices"]
        texts[choice["index"]] = choice["text"]
    assert texts == {0: "Once", 1: "Once", 2: "Twice", 3: "Twice"}
    for p, _, outs in runs:
        for out in outs:
            collected.add(p, out)
            (chunk,) = streamed.chunk(p, out)
            (choice,) = json.loads(chunk.serialized())["choices"]
            texts[choice["index"]] += choice["text"]
            # a streamed token's offset counts from the start of its choice's generated text
            assert choice["logprobs"]["text_offset"] == [0 if out.completion_tokens == 1 else len(words[0][p])]
    body = json.loads(collected.response().serialized())
    assert [c["text"] for c in body["choices"]] == [
        "Once red cat",
        "Once red dog",
        "Twice green cat",
        "Twice green dog",
    ]
    assert texts == {c["index"]: c["text"] for c in body["choices"]}
    # echoed: offsets count from the start of the prompt's text
    assert body["choices"][2]["logprobs"]["text_offset"] == [len("Twice"), len("Twice green")]
    assert body["usage"]["prompt_tokens"] == 5 and body["usage"]["completion_tokens"] == 8
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 4}  # 2 cached for each prompt


def test_output_parts_follow_the_deltas_in_order():
    from server.response_builder import CALL, REASONING, TEXT, OutputParts
    from server.tool_calls import ToolCall, ToolCallDelta

    parts = OutputParts()
    call = ToolCall("call_1", "get_weather")
    events = parts.feed("Hm.", "", [])
    events += parts.feed("", "\n\n", [])  # whitespace alone opens no text part
    events += parts.feed("", "", [ToolCallDelta(0, call, started=True, arguments='{"city": ')])
    events += parts.feed("", "", [ToolCallDelta(0, call, arguments='"Paris"}')])
    events += parts.feed("", "\n", [])
    events += parts.feed("", "Done.", [])  # text after a blank keeps it
    events += parts.finish()
    assert [(p.kind, p.text) for p in parts.parts] == [
        (REASONING, "Hm."),
        (CALL, '{"city": "Paris"}'),
        (TEXT, "\nDone."),
    ]
    assert parts.parts[1].id == "call_1" and parts.parts[1].name == "get_weather"
    assert [(e.action, e.part.index) for e in events] == [
        ("open", 0),
        ("delta", 0),
        ("close", 0),
        ("open", 1),
        ("delta", 1),
        ("delta", 1),
        ("close", 1),
        ("open", 2),
        ("delta", 2),
        ("close", 2),
    ]
