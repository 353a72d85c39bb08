"""The HTTP server end to end: real uvicorn, real worker process, the official openai client and httpx."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import httpx
import openai
import pytest
from helpers import DocumentedSchemas
from servers import MODEL, CliServer, ThreadServer, data_events, metric, server_settings

from loaders.assets import qwen3_tokenizer_dir
from server.app import create_app

MAX_LEN = 2048


@pytest.fixture(scope="module")
def server(serve_model):
    s = CliServer(
        serve_model,
        "--served-model-name",
        MODEL,
        "--max-model-len",
        str(MAX_LEN),
        "--kv-cache-memory",
        "64MiB",
        "--max-num-seqs",
        "64",
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0, timeout=120)


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."}]


# ------------------------------------------------------------------------------------------------
# basics
# ------------------------------------------------------------------------------------------------
def test_models_health_version(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].model_extra["max_model_len"] == MAX_LEN
    assert httpx.get(f"{server.base}/health").status_code == 200
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", httpx.get(f"{server.base}/version").json()["version"])


def test_chat_non_streaming_usage_matches_tokenize(server, client):
    r = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion"
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.role == "assistant"
    tok = httpx.post(f"{server.base}/tokenize", json={"model": MODEL, "messages": CHAT}).json()
    assert r.usage.prompt_tokens == tok["count"] and r.usage.completion_tokens == 12
    assert r.usage.total_tokens == tok["count"] + 12


def test_chat_streaming_equals_non_streaming(client):
    kw = dict(model=MODEL, messages=CHAT, max_tokens=16, temperature=0, extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_raw_sse_format_ends_with_done(server):
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server.base}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[0])["choices"][0]["delta"] == {"role": "assistant", "content": ""}


def test_completions_text_and_token_prompt(client, server):
    r = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.id.startswith("cmpl-") and r.usage.completion_tokens == 8 and r.choices[0].finish_reason == "length"
    ids = httpx.post(f"{server.base}/tokenize", json={"prompt": "Once upon a time"}).json()["tokens"]
    r2 = client.completions.create(
        model=MODEL, prompt=ids, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r2.choices[0].text == r.choices[0].text and r2.usage.prompt_tokens == len(ids)
    stream = list(
        client.completions.create(
            model=MODEL,
            prompt="Once upon a time",
            max_tokens=8,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == r.choices[0].text
    batch = client.completions.create(
        model=MODEL, prompt=["Once upon a time", "Hello"], max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in batch.choices] == [0, 1] and batch.usage.completion_tokens == 8


def test_stop_strings(client):
    kw = dict(model=MODEL, prompt="The weather today", max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    text = client.completions.create(**kw).choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    r = client.completions.create(stop=[stop], **kw)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].text == text[: text.index(stop)]
    assert r.choices[0].model_extra["stop_reason"] == stop
    r = client.completions.create(
        stop=[stop], **{**kw, "extra_body": {"ignore_eos": True, "include_stop_str_in_output": True}}
    )
    assert r.choices[0].text == text[: text.index(stop) + len(stop)]
    s = list(client.completions.create(stop=[stop], stream=True, **kw))
    assert "".join(c.choices[0].text for c in s if c.choices) == text[: text.index(stop)]


def test_seed_reproducibility_and_n(client):
    kw = dict(
        model=MODEL,
        messages=CHAT,
        max_tokens=10,
        temperature=1.0,
        top_p=1.0,
        extra_body={"ignore_eos": True, "top_k": 0},
    )
    a = client.chat.completions.create(seed=123, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=123, **kw).choices[0].message.content
    c = client.chat.completions.create(seed=124, **kw).choices[0].message.content
    assert a == b and a != c
    r = client.chat.completions.create(n=2, seed=7, **kw)
    assert [ch.index for ch in r.choices] == [0, 1]
    assert r.choices[0].message.content != r.choices[1].message.content
    assert r.usage.completion_tokens == 20


def test_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 3 for t in content)
    # greedy: the chosen token is the most likely one
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)


def test_every_response_matches_its_documented_schema(server):
    """Real bodies of every route, streamed or not, with logprobs, n and echo, against /openapi.json."""
    base = server.base
    doc = httpx.get(f"{base}/openapi.json").json()
    paths = doc["paths"]
    chat_200 = paths["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert chat_200["application/json"]["schema"]["$ref"].endswith("/ChatCompletion")
    done, json_data = chat_200["text/event-stream"]["itemSchema"]["properties"]["data"]["anyOf"]
    assert done == {"const": "[DONE]"} and json_data["contentMediaType"] == "application/json"
    assert {"$ref": "#/components/schemas/ChatCompletionChunk"} in json_data["contentSchema"]["anyOf"]
    assert paths["/v1/models"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ModelList"
    )
    schemas = DocumentedSchemas(doc)
    chat = {"model": MODEL, "messages": CHAT, "max_tokens": 4, "logprobs": True, "top_logprobs": 2, "n": 2}
    r = httpx.post(f"{base}/v1/chat/completions", json=chat, timeout=120)
    schemas.validate("ChatCompletion", r.json())
    events = data_events(base, "/v1/chat/completions", {**chat, "stream_options": {"include_usage": True}})
    for event in events:
        schemas.validate("ChatCompletionChunk", event)
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 8
    completion = {"model": MODEL, "prompt": ["Once", "upon a"], "max_tokens": 3, "logprobs": 2, "echo": True}
    r = httpx.post(f"{base}/v1/completions", json=completion, timeout=120)
    schemas.validate("Completion", r.json())
    completion.pop("echo")  # echo with logprobs streams the prompt's text without them; both are documented
    events = data_events(base, "/v1/completions", {**completion, "stream_options": {"include_usage": True}})
    for event in events:
        schemas.validate("CompletionChunk", event)
    schemas.validate("ModelList", httpx.get(f"{base}/v1/models").json())
    schemas.validate("ModelCard", httpx.get(f"{base}/v1/models/{MODEL}").json())
    tokens = httpx.post(f"{base}/tokenize", json={"prompt": "hello world"}).json()
    schemas.validate("TokenizeResponse", tokens)
    schemas.validate("DetokenizeResponse", httpx.post(f"{base}/detokenize", json={"tokens": tokens["tokens"]}).json())
    for path in ("/health", "/live"):
        schemas.validate("HealthStatus", httpx.get(f"{base}{path}").json())
    schemas.validate("VersionInfo", httpx.get(f"{base}/version").json())
    for bad in (httpx.get(f"{base}/v1/models/nope"), httpx.post(f"{base}/v1/completions", json={"prompt": 1})):
        assert bad.status_code in (400, 404)
        schemas.validate("ErrorResponse", bad.json())


def test_tokenize_detokenize_round_trip(server):
    text = "Hello world! 日本語 😀"
    tok = httpx.post(f"{server.base}/tokenize", json={"prompt": text}).json()
    assert tok["tokens"][:3] == [9707, 1879, 0] and tok["max_model_len"] == MAX_LEN
    assert httpx.post(f"{server.base}/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"] == text


def test_metrics_change_after_requests(server, client):
    gen0 = metric(server.base, "vllm:generation_tokens_total")
    ok0 = metric(server.base, "vllm:request_success_total", 'finished_reason="length"', default=0.0)
    e2e0 = metric(server.base, "vllm:e2e_request_latency_seconds_count")
    client.completions.create(model=MODEL, prompt="count", max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    assert metric(server.base, "vllm:generation_tokens_total") == gen0 + 5
    assert metric(server.base, "vllm:request_success_total", 'finished_reason="length"') == ok0 + 1
    assert metric(server.base, "vllm:e2e_request_latency_seconds_count") == e2e0 + 1
    assert metric(server.base, "vllm:time_to_first_token_seconds_count") >= 1
    assert metric(server.base, "vllm:num_requests_running") == 0
    assert 0 <= metric(server.base, "vllm:kv_cache_usage_perc") <= 1
    for name in (
        "vllm:prompt_tokens_total",
        "vllm:num_preemptions_total",
        "vllm:prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total",
        "vllm:inter_token_latency_seconds_count",
        "vllm:request_queue_time_seconds_count",
        "vllm:num_requests_waiting",
    ):
        metric(server.base, name)
    # where the model runs, as /version says it (the CPU kernel family's backend name, or cuda-triton)
    version = httpx.get(f"{server.base}/version").json()
    labels = f'backend="{version["backend"]}",device="{version["device"]}"'  # (exposed in name order)
    assert metric(server.base, "a8w8:backend_info", labels) == 1


def test_cached_tokens_reported(client):
    long_system = [
        {"role": "system", "content": "You answer questions about the weather. " * 12},
        {"role": "user", "content": "Is it raining?"},
    ]
    client.chat.completions.create(model=MODEL, messages=long_system, max_tokens=2)
    r = client.chat.completions.create(model=MODEL, messages=long_system, max_tokens=2)
    assert r.usage.prompt_tokens_details.cached_tokens >= 96


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------
def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    return err


def test_error_shapes(server):
    url = f"{server.base}/v1/chat/completions"
    msgs = [{"role": "user", "content": "hi"}]
    err = _error(httpx.post(url, json={"model": MODEL, "messages": msgs, "temperature": "hot"}), 400)
    assert err["param"] == "temperature" and err["type"] == "BadRequestError"
    _error(httpx.post(url, json={"model": MODEL}), 400)
    _error(httpx.post(url, content=b"{not json", headers={"content-type": "application/json"}), 400)
    err = _error(httpx.post(url, json={"model": "nope", "messages": msgs}), 404)
    assert err["message"] == "The model `nope` does not exist."
    err = _error(httpx.post(url, json={"model": MODEL, "messages": msgs, "temperature": 5}), 400)
    assert "temperature" in err["message"]
    err = _error(httpx.post(url, json={"model": MODEL, "messages": msgs, "tool_choice": "required"}), 400)
    assert "tool" in err["message"] and err["param"] == "tool_choice"
    err = _error(httpx.post(url, json={"model": MODEL, "messages": msgs, "response_format": {"type": "yaml"}}), 400)
    assert err["param"] == "response_format.type"
    _error(httpx.post(url, json={"model": MODEL, "messages": msgs, "logit_bias": {"abc": 1}}), 400)
    _error(
        httpx.post(url, json={"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}), 400
    )
    _error(httpx.post(f"{server.base}/detokenize", json={"tokens": [10**9]}), 400)
    # unknown fields are accepted and ignored
    r = httpx.post(url, json={"model": MODEL, "messages": msgs, "max_tokens": 1, "vendor_field": {"x": 1}})
    assert r.status_code == 200


def test_too_long_context_uses_vllm_sentence(server):
    prompt = "word " * (MAX_LEN + 10)
    n = len(httpx.post(f"{server.base}/tokenize", json={"prompt": prompt}).json()["tokens"])
    err = _error(httpx.post(f"{server.base}/v1/completions", json={"model": MODEL, "prompt": prompt}), 400)
    assert err["message"] == (
        f"This model's maximum context length is {MAX_LEN} tokens. However, your request has "
        f"{n} input tokens. Please reduce the length of the input prompt."
    )
    assert err["param"] == "prompt"


def test_openai_client_sees_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=CHAT)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=CHAT, n=100)


# ------------------------------------------------------------------------------------------------
# concurrency and disconnects
# ------------------------------------------------------------------------------------------------
def test_fifty_concurrent_streams_with_correct_usage(server):
    async def one(http: httpx.AsyncClient, i: int):
        body = {
            "model": MODEL,
            "prompt": f"Client {i} says",
            "max_tokens": 6 + i % 5,
            "temperature": 0.7,
            "seed": i,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
        text, usage, chunks = "", None, 0
        async with http.stream("POST", f"{server.base}/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                if ev["choices"]:
                    text += ev["choices"][0]["text"]
                    chunks += 1
                else:
                    usage = ev["usage"]
        return i, usage, chunks

    async def main():
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(*(one(http, i) for i in range(50)))

    for i, usage, chunks in asyncio.run(main()):
        assert usage["completion_tokens"] == 6 + i % 5
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert 1 <= chunks <= usage["completion_tokens"]


def _wait_idle(base: str, timeout: float = 20.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metric(base, "vllm:num_requests_running") == 0 and metric(base, "vllm:num_requests_waiting") == 0:
            return
        time.sleep(0.1)
    raise AssertionError("requests still running after the clients left")


def test_disconnecting_streams_free_their_blocks(server):
    _wait_idle(server.base)
    usage0 = metric(server.base, "vllm:kv_cache_usage_perc")
    aborted0 = metric(server.base, "vllm:request_success_total", 'finished_reason="abort"', default=0.0)

    async def leaver(http: httpx.AsyncClient, i: int):
        body = {"model": MODEL, "prompt": f"Leaver {i}", "max_tokens": 1500, "stream": True, "ignore_eos": True}
        async with http.stream("POST", f"{server.base}/v1/completions", json=body) as r:
            n = 0
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    n += 1
                    if n >= 3:
                        return  # leave mid-stream: the connection is closed

    async def main():
        async with httpx.AsyncClient(timeout=60) as http:
            await asyncio.gather(*(leaver(http, i) for i in range(20)))

    asyncio.run(main())
    _wait_idle(server.base)
    assert metric(server.base, "vllm:kv_cache_usage_perc") == usage0
    assert metric(server.base, "vllm:request_success_total", 'finished_reason="abort"') == aborted0 + 20


def test_non_streaming_client_cancel_aborts(server):
    _wait_idle(server.base)
    gen0 = metric(server.base, "vllm:generation_tokens_total")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{server.base}/v1/completions",
            json={"model": MODEL, "prompt": "long", "max_tokens": 1900, "ignore_eos": True},
            timeout=1.0,
        )
    _wait_idle(server.base, timeout=10)
    generated = metric(server.base, "vllm:generation_tokens_total") - gen0
    assert 0 < generated < 1900  # it started, and stopped when the client left
    assert metric(server.base, "vllm:request_success_total", 'finished_reason="abort"') >= 1


# ------------------------------------------------------------------------------------------------
# servers with special settings (uvicorn in a thread)
# ------------------------------------------------------------------------------------------------
def test_api_key_and_body_limit(serve_model):
    s = ThreadServer(create_app(server_settings(serve_model, api_key="sekret", max_body_bytes=2000)))
    try:
        url = f"{s.base}/v1/models"
        _error(httpx.get(url), 401)
        _error(httpx.get(url, headers={"Authorization": "Bearer wrong"}), 401)
        assert httpx.get(url, headers={"Authorization": "Bearer sekret"}).status_code == 200
        assert httpx.get(f"{s.base}/health").status_code == 200  # not under /v1
        big = {"model": MODEL, "prompt": "x" * 5000}
        _error(httpx.post(f"{s.base}/v1/completions", json=big, headers={"Authorization": "Bearer sekret"}), 413)
        c = openai.OpenAI(base_url=f"{s.base}/v1", api_key="sekret", max_retries=0)
        assert c.models.list().data[0].id == MODEL
    finally:
        s.stop()


def test_overload_429_with_retry_after(serve_model):
    s = ThreadServer(create_app(server_settings(serve_model, max_queued_requests=2, scheduler={"max_num_seqs": 1})))
    try:

        async def main():
            async with httpx.AsyncClient(timeout=120) as http:
                body = {"model": MODEL, "prompt": "busy", "max_tokens": 300, "ignore_eos": True}
                return await asyncio.gather(*(http.post(f"{s.base}/v1/completions", json=body) for _ in range(12)))

        codes = [r.status_code for r in asyncio.run(main())]
        assert 200 in codes and 429 in codes and set(codes) <= {200, 429}
        rejected = next(r for r in asyncio.run(main()) if r.status_code == 429)
        assert rejected.headers["retry-after"] == "1"
        _error(rejected, 429)
    finally:
        s.stop()


# ------------------------------------------------------------------------------------------------
# Qwen3 reasoning split, through a server started with --replay-token-ids (the debugging runner that
# replays given token ids instead of running the model)
# ------------------------------------------------------------------------------------------------
THINKING_OUTPUT = "<think>\nThe user wants a number.\n</think>\n\nThe answer is 42."


@pytest.fixture(scope="module")
def replay_server(serve_model, tmp_path_factory):
    from engine.tokenizer import HFTokenizer

    ids = HFTokenizer(qwen3_tokenizer_dir()).encode(THINKING_OUTPUT) + [151645]  # then <|im_end|>
    script = tmp_path_factory.mktemp("replay") / "tokens.json"
    script.write_text(json.dumps(ids))
    s = CliServer(serve_model, "--served-model-name", MODEL, "--replay-token-ids", str(script))
    yield s
    s.stop()


def test_replay_server_says_it_does_not_run_the_model(replay_server):
    replay_server.log.flush()
    log = Path(replay_server.log.name).read_text()
    assert re.search(r"WARNING .*replaying \d+ token ids instead of running the model", log), log[-2000:]
    assert httpx.get(f"{replay_server.base}/version").json()["backend"] == "replay"


def test_reasoning_split_non_streaming_and_streaming(replay_server):
    c = openai.OpenAI(base_url=f"{replay_server.base}/v1", api_key="x", max_retries=0)
    r = c.chat.completions.create(model=MODEL, messages=CHAT)
    msg = r.choices[0].message
    raw = httpx.post(f"{replay_server.base}/v1/chat/completions", json={"model": MODEL, "messages": CHAT}).json()
    DocumentedSchemas(httpx.get(f"{replay_server.base}/openapi.json").json()).validate("ChatCompletion", raw)
    assert msg.content == "The answer is 42."
    assert msg.model_extra["reasoning_content"] == "\nThe user wants a number.\n"
    assert msg.model_extra["reasoning"] == msg.model_extra["reasoning_content"]
    assert r.choices[0].finish_reason == "stop"
    chunks = list(c.chat.completions.create(model=MODEL, messages=CHAT, stream=True))
    reasoning = "".join(
        (ch.choices[0].delta.model_extra or {}).get("reasoning_content") or "" for ch in chunks if ch.choices
    )
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert reasoning == msg.model_extra["reasoning_content"] and content == msg.content


def test_reasoning_off_when_thinking_disabled(replay_server):
    c = openai.OpenAI(base_url=f"{replay_server.base}/v1", api_key="x", max_retries=0)
    r = c.chat.completions.create(
        model=MODEL, messages=CHAT, extra_body={"chat_template_kwargs": {"enable_thinking": False}}
    )
    assert r.choices[0].message.content == THINKING_OUTPUT
    assert "reasoning_content" not in (r.choices[0].message.model_extra or {})
