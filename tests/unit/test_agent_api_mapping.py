"""The Responses and Messages APIs' requests mapped to chat messages, and the bounded store of responses."""

from __future__ import annotations

import json

import pytest

from server.errors import APIError
from server.messages_api import chat_messages
from server.messages_schemas import MessagesRequest
from server.response_store import ResponseStore, StoredResponse
from server.responses_api import input_messages


def test_input_items_become_chat_messages():
    items = [
        {"role": "developer", "content": "Be brief."},
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "Weather "}, {"type": "input_text", "text": "in Paris?"}],
        },
        {"type": "reasoning", "content": [{"type": "reasoning_text", "text": "Use the tool."}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "c2", "name": "get_time", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "noon"}]},
    ]
    assert input_messages(items) == [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "reasoning_content": "Use the tool.",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
                {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c2", "content": "noon"},
    ]
    assert input_messages("Hi") == [{"role": "user", "content": "Hi"}]


def test_a_call_output_needs_its_call_here_or_in_the_history():
    output = [{"type": "function_call_output", "call_id": "c9", "output": "x"}]
    with pytest.raises(APIError) as e:
        input_messages(output)
    assert e.value.status == 400 and e.value.param == "input[0].call_id"
    history = [{"role": "assistant", "content": None, "tool_calls": [{"id": "c9", "type": "function", "function": {}}]}]
    assert input_messages(output, history) == [{"role": "tool", "tool_call_id": "c9", "content": "x"}]


def test_anthropic_blocks_become_chat_messages():
    req = MessagesRequest.model_validate(
        {
            "model": "m",
            "max_tokens": 4,
            "system": [{"type": "text", "text": "Be brief."}],
            "messages": [
                {"role": "user", "content": "Weather?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "Use the tool.", "signature": ""},
                        {"type": "text", "text": "Checking."},
                        {"type": "tool_use", "id": "t1", "name": "get_weather", "input": {"city": "Paris"}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "sunny"}]},
                        {"type": "text", "text": "Thanks."},
                    ],
                },
            ],
        }
    )
    messages = chat_messages(req)
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assistant = messages[2]
    assert assistant["content"] == "Checking." and assistant["reasoning_content"] == "Use the tool."
    assert json.loads(assistant["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    assert messages[3:] == [
        {"role": "tool", "tool_call_id": "t1", "content": "sunny"},
        {"role": "user", "content": "Thanks."},
    ]


def test_the_store_is_bounded_in_count_and_bytes():
    def item(n: int) -> StoredResponse:
        return StoredResponse("x" * n, [{"role": "user", "content": "y" * n}])

    store = ResponseStore(max_responses=3, max_bytes=1000)
    for i in range(4):  # 200 bytes each: the count evicts the oldest
        store.put(f"r{i}", item(100))
    assert [store.get(f"r{i}") is not None for i in range(4)] == [False, True, True, True]
    store.put("big", item(300))  # 600 bytes: r1 goes for the count, 1000 bytes fit
    assert store.get("r1") is None and len(store) == 3 and store.bytes == 1000
    store.put("mid", item(250))  # 500 bytes: the oldest go until the rest fit
    assert [k for k in ("r2", "r3", "big", "mid") if store.get(k) is not None] == ["mid"] and store.bytes == 500
    store.put("huge", item(600))  # larger than the whole budget: not kept, nothing evicted
    assert store.get("huge") is None and store.get("mid") is not None
    assert store.delete("mid") and not store.delete("mid") and store.bytes == 0 and len(store) == 0


def test_chat_errors_are_renamed_to_the_clients_fields_without_rewriting_prose():
    from server.messages_api import CHAT_TO_MESSAGES_PARAMS
    from server.request_mapping import renamed_chat_errors

    with pytest.raises(APIError) as e, renamed_chat_errors(CHAT_TO_MESSAGES_PARAMS):
        raise APIError(
            400, "stop strings must be shorter; max_completion_tokens_x and max_completion_tokens too", "stop"
        )
    assert e.value.param == "stop_sequences"
    assert e.value.message == "stop strings must be shorter; max_completion_tokens_x and max_tokens too"
