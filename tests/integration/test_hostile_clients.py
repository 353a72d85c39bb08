"""Hostile clients against a victim: what one client sends must not degrade service for another. Real servers
on 127.0.0.1 (uvicorn in a thread where the test inspects the engine), real HTTP clients, bounded waits."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from servers import MODEL, ThreadServer, server_settings

from engine.config import GrammarLimits
from engine.structured_output import json_schema_grammar
from server.app import create_app

CHAT = [{"role": "user", "content": "Tell me about a person."}]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


def many_properties(count: int, prefix: str = "p") -> dict:
    """An object schema with ``count`` optional properties: its grammar takes a while to compile (5000: about
    2 s of CPU here), and the grammar engine cannot follow it (refused by the probe once compiled)."""
    return {"type": "object", "properties": {f"{prefix}{i}": {"type": "string"} for i in range(count)}}


def constrained(base: str, schema: dict, timeout: float = 120) -> httpx.Response:
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 8, "guided_json": schema, **NO_THINKING}
    return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=timeout)


def plain(base: str) -> httpx.Response:
    body = {"model": MODEL, "prompt": "hello", "max_tokens": 2, "ignore_eos": True}
    return httpx.post(f"{base}/v1/completions", json=body, timeout=120)


def server_with(serve_model, limits: GrammarLimits) -> tuple[ThreadServer, object]:
    app = create_app(server_settings(serve_model, engine={"grammar_limits": limits}))
    return ThreadServer(app), app


# ---- grammars --------------------------------------------------------------------------------------------
def test_a_grammar_over_its_cpu_budget_is_a_400_and_so_is_a_repeat(serve_model):
    s, _ = server_with(serve_model, GrammarLimits(max_compile_cpu_seconds=0.01))
    try:
        schema = many_properties(300)  # about 0.1 s to compile
        r = constrained(s.base, schema)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "guided_json" and "over the server's budget" in err["message"], err
        t0 = time.monotonic()
        again = constrained(s.base, schema)
        assert again.status_code == 400 and again.json()["error"]["message"] == err["message"]
        assert time.monotonic() - t0 < 5
        assert plain(s.base).status_code == 200  # the server is fine
    finally:
        s.stop()


def wait_until(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_compiles_run_apart_from_other_requests_and_their_queue_is_bounded(serve_model):
    """One compile thread, one compile allowed to wait: while a slow grammar compiles, a plain request is
    answered (it never waits behind the compile), a second grammar waits, a third is refused with 429."""
    s, app = server_with(serve_model, GrammarLimits(max_compile_cpu_seconds=60, compile_threads=1, max_queued=1))
    compiler = app.state.engine._core.grammars
    results: dict[str, httpx.Response] = {}

    def send(name: str, schema: dict) -> threading.Thread:
        t = threading.Thread(target=lambda: results.__setitem__(name, constrained(s.base, schema)))
        t.start()
        return t

    try:
        slow = send("slow", many_properties(5000, "a"))
        wait_until(lambda: compiler.compiling == 1)
        waiting = send("waiting", many_properties(300, "b"))
        wait_until(lambda: compiler.waiting == 1)
        refused = constrained(s.base, many_properties(300, "c"))
        assert refused.status_code == 429 and refused.json()["error"]["param"] == "guided_json", refused.text
        assert "Retry-After" in refused.headers
        assert plain(s.base).status_code == 200
        assert "slow" not in results  # the plain request was answered while the slow grammar compiled
        slow.join(120)
        waiting.join(120)
        assert results["slow"].status_code == 400  # (5000 optional properties: refused once compiled)
        assert results["waiting"].status_code == 200, results["waiting"].text
    finally:
        s.stop()


def test_a_compile_whose_client_left_is_dropped(serve_model):
    s, app = server_with(serve_model, GrammarLimits(max_compile_cpu_seconds=60, compile_threads=1))
    compiler = app.state.engine._core.grammars
    left = {"type": "object", "properties": {"left_early": {"type": "string"}}}
    try:
        slow = threading.Thread(target=constrained, args=(s.base, many_properties(5000, "d")))
        slow.start()
        wait_until(lambda: compiler.compiling == 1)
        with pytest.raises(httpx.TimeoutException):
            constrained(s.base, left, timeout=0.5)  # the client gives up while its grammar waits
        wait_until(lambda: compiler.waiting == 0)  # taken out of the queue, the slow compile still running
        assert compiler.compiling == 1
        slow.join(120)
        assert json_schema_grammar(left) not in compiler._cache  # never compiled
        assert constrained(s.base, left).status_code == 200  # (and it compiles when asked again)
        assert json_schema_grammar(left) in compiler._cache
    finally:
        s.stop()


# ---- the running batch -------------------------------------------------------------------------------
def test_requests_with_large_n_cannot_hold_the_batch(serve_model):
    """Four requests of n = 16 fill the 64 sequence slots for hundreds of steps; a fifth client's request is
    admitted at once (one of their sequences is preempted for it) and answered while they still run."""
    s = ThreadServer(create_app(server_settings(serve_model)))
    done: list[str] = []

    def attack(i: int) -> None:
        body = {"model": MODEL, "prompt": f"attack {i}", "n": 16, "max_tokens": 300, "ignore_eos": True}
        assert httpx.post(f"{s.base}/v1/completions", json=body, timeout=600).status_code == 200
        done.append(f"attacker {i}")

    try:
        attackers = [threading.Thread(target=attack, args=(i,)) for i in range(4)]
        for t in attackers:
            t.start()
        engine = s.server.config.app.state.engine
        wait_until(lambda: engine.stats.num_running == 64)
        assert plain(s.base).status_code == 200
        done.append("victim")
        for t in attackers:
            t.join(600)
        assert done[0] == "victim", done
    finally:
        s.stop()


# ---- bodies ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(serve_model):
    s = ThreadServer(create_app(server_settings(serve_model)))
    yield s
    s.stop()


def error_of(r: httpx.Response, status: int = 400) -> dict:
    assert r.status_code == status, r.text[:500]
    return r.json()["error"]


def test_a_logprobs_body_too_large_to_build_at_once_is_refused_unless_streamed(server):
    # (this server's context is 1024 tokens: 16 x 1000 x 21 entries)
    body = {"model": MODEL, "messages": CHAT, "n": 16, "max_tokens": 1000, "logprobs": True, "top_logprobs": 20}
    err = error_of(httpx.post(f"{server.base}/v1/chat/completions", json=body, timeout=60))
    assert err["param"] == "logprobs" and "stream" in err["message"], err
    small = {**body, "n": 2, "max_tokens": 4, "ignore_eos": True}
    r = httpx.post(f"{server.base}/v1/chat/completions", json=small, timeout=120)
    assert r.status_code == 200 and len(r.json()["choices"][1]["logprobs"]["content"][3]["top_logprobs"]) == 20
    body = {"model": MODEL, "prompt": "hi", "n": 16, "max_tokens": 1000, "logprobs": 20}
    assert error_of(httpx.post(f"{server.base}/v1/completions", json=body, timeout=60))["param"] == "logprobs"
    with httpx.stream(
        "POST", f"{server.base}/v1/completions", json={**body, "n": 1, "max_tokens": 3, "stream": True}, timeout=120
    ) as r:
        assert r.status_code == 200  # streamed: sent as it comes, not bounded


def test_detokenize_takes_at_most_a_context_of_ids(server):
    big = {"model": MODEL, "tokens": [1] * 1_000_000}  # a 3 MB body: refused by its size, before it is read
    err = error_of(httpx.post(f"{server.base}/detokenize", json=big, timeout=60), 413)
    assert err["param"] == "tokens" and "1024 token ids" in err["message"], err
    chunked = httpx.post(f"{server.base}/detokenize", content=iter([json.dumps(big).encode()]), timeout=60)
    err = error_of(chunked)  # (no declared length: read, then refused by its count)
    assert err["param"] == "tokens" and "at most 1024" in err["message"], err
    ok = httpx.post(f"{server.base}/detokenize", json={"model": MODEL, "tokens": [9707] * 1024}, timeout=60)
    assert ok.status_code == 200


@pytest.mark.parametrize("field", ["guided_regex", "model", "stop"])
def test_a_lone_surrogate_in_any_string_field_is_a_400(server, field):
    raw = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, field: "a\ud800b"})
    assert "\\ud800" in raw  # (json.dumps writes the lone surrogate as an escape)
    r = httpx.post(f"{server.base}/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    err = error_of(r)
    assert err["param"] == "body" and "surrogate" in err["message"], err


@pytest.mark.parametrize("key", ["messages", "tools", "add_generation_prompt", "continue_final_message"])
def test_chat_template_kwargs_cannot_set_what_the_request_sets(server, key):
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 2, "chat_template_kwargs": {key: []}}
    for path in ("/v1/chat/completions", "/tokenize"):
        err = error_of(httpx.post(f"{server.base}{path}", json=body, timeout=60))
        assert err["param"] == f"chat_template_kwargs.{key}", err


# ---- tools -----------------------------------------------------------------------------------------------
def test_tool_parameters_with_defs_and_refs_are_enforced(server):
    """Parameters as pydantic (and the OpenAI SDK's pydantic_function_tool) write them: $defs and $ref."""
    from pydantic import BaseModel, ConfigDict, Field

    class Location(BaseModel):  # (short strings and no other keys: a random model's answer fits in max_tokens)
        model_config = ConfigDict(extra="forbid")
        city: str = Field(max_length=8)
        country: str = Field(max_length=8)

    class Weather(BaseModel):
        model_config = ConfigDict(extra="forbid")
        location: Location
        days: int = Field(ge=1, le=14)

    weather = {"type": "function", "function": {"name": "weather", "parameters": Weather.model_json_schema()}}
    assert "$defs" in weather["function"]["parameters"]
    other = {"type": "function", "function": {"name": "other", "parameters": Location.model_json_schema()}}
    for tools, choice in (
        ([weather], "required"),
        ([weather, other], "required"),
        ([weather], {"type": "function", "function": {"name": "weather"}}),
    ):
        body = {
            "model": MODEL,
            "messages": CHAT,
            "tools": tools,
            "tool_choice": choice,
            "max_tokens": 120,
            "parallel_tool_calls": False,
            **NO_THINKING,
        }
        r = httpx.post(f"{server.base}/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        (call,) = r.json()["choices"][0]["message"]["tool_calls"] or [None]
        args = json.loads(call["function"]["arguments"])
        model = Weather if call["function"]["name"] == "weather" else Location
        model.model_validate(args)  # the random model's arguments, valid through the $refs
    body = {
        "model": MODEL,
        "messages": CHAT,
        "tools": [weather],
        "max_tokens": 60,
        "response_format": {"type": "json_object"},
        **NO_THINKING,
    }
    assert httpx.post(f"{server.base}/v1/chat/completions", json=body, timeout=120).status_code == 200


def test_tool_parameters_that_are_not_an_object_are_refused(server):
    tool = {"type": "function", "function": {"name": "echo", "parameters": {"type": "string"}}}
    body = {"model": MODEL, "messages": CHAT, "tools": [tool], "tool_choice": "required", **NO_THINKING}
    err = error_of(httpx.post(f"{server.base}/v1/chat/completions", json=body, timeout=60))
    assert err["param"] == "tools.0.function.parameters" and 'type "object"' in err["message"], err


# ---- a worker that stops answering -----------------------------------------------------------------------
def _stream_events(base: str, body: dict, events: list) -> None:
    with httpx.stream("POST", f"{base}/v1/completions", json={**body, "stream": True}, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:] if line == "data: [DONE]" else json.loads(line[6:]))


def _health(base: str) -> tuple[int, dict]:
    r = httpx.get(f"{base}/health", timeout=5)
    return r.status_code, r.json()


@pytest.mark.parametrize("resume", [True, False], ids=["resumed", "hung"])
def test_a_stopped_worker_is_reported_stalled_then_restarted(serve_model, resume):
    """SIGSTOP of the worker mid-stream: /health answers 503 stalled past the step's stall deadline; resumed
    (SIGCONT) before the step deadline, everything goes on; left stopped, the worker is killed and restarted as
    after a crash (the stream in flight gets an error event) and the server serves again."""
    import os
    import signal

    from servers import CliServer

    s = CliServer(
        serve_model,
        "--served-model-name",
        MODEL,
        "--kv-cache-memory",
        "64MiB",
        "--step-stall-timeout",
        "1",
        "--step-timeout",
        "6",
    )
    worker = s.worker_pid()
    events: list = []
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1500, "ignore_eos": True}
    reader = threading.Thread(target=_stream_events, args=(s.base, body, events))
    try:
        reader.start()
        wait_until(lambda: len(events) > 3)
        os.kill(worker, signal.SIGSTOP)
        wait_until(lambda: _health(s.base)[0] == 503, timeout=10)
        status, health = _health(s.base)
        assert health["status"] == "stalled" and "past its deadline of 1 s" in health["error"], health
        if resume:
            os.kill(worker, signal.SIGCONT)
            wait_until(lambda: _health(s.base)[0] == 200, timeout=10)
            reader.join(120)
            assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
            assert s.worker_pid() == worker
        else:
            reader.join(60)  # the step deadline (6 s) kills it; the stream ends with an error event
            assert events[-1] == "[DONE]" and "did not finish a step within 6 s" in events[-2]["error"]["message"]
            wait_until(lambda: _health(s.base)[0] == 200, timeout=60)  # a new worker
            assert s.worker_pid() not in (None, worker)
            assert plain(s.base).status_code == 200
    finally:
        if resume is False:
            try:
                os.kill(worker, signal.SIGCONT)
            except ProcessLookupError:
                pass
        s.stop()


def test_step_deadlines_follow_what_steps_took():
    """The auto deadlines: floors for a fast model, and a prompt-sized step held to its tokens' time, not to a
    decode step's."""
    from engine.config import StepDeadlines
    from engine.step_watch import HANG_FLOOR_SECONDS, STALL_FLOOR_SECONDS, StepWatch

    watch = StepWatch()
    watch.begin(16)
    watch.end(0.02)  # a fast decode step
    watch.begin(16)
    assert (watch.stall_after(), watch.hang_after()) == (STALL_FLOOR_SECONDS, HANG_FLOOR_SECONDS)
    watch.end(0.02)
    watch.begin(4)
    watch.end(2.0)  # a slow model's decode step: 2 s
    watch.begin(2048)  # a prompt chunk, before any was measured: a token is taken as 1/8 of that step
    assert watch.stall_after() >= 20 * 2048 * 2.0 / 8
    watch.end(60.0)  # it took 60 s: 29 ms a token
    watch.begin(4)
    assert 20 * 2.0 < watch.stall_after() < 20 * 2.2  # a decode step is held to a decode step's time
    watch.end(2.0)
    watch.begin(512)
    assert 20 * 512 * 0.029 < watch.stall_after() < 20 * 512 * 0.03 + 2
    assert watch.hang_after() == 5 * watch.stall_after()
    assert watch.stalled() is None
    fixed = StepWatch(StepDeadlines(stall_seconds=3, hang_seconds=9))
    fixed.begin(100_000)
    assert (fixed.stall_after(), fixed.hang_after()) == (3, 9)
