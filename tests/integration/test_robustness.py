"""Robustness of the real server (CLI process, real worker): hostile requests, big and slow inputs, worker
death and restart, graceful shutdown, and a small soak run with schemathesis."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from conftest import SERVE_SPEC
from servers import CliServer, rss_mib


def _load_soak():
    """benchmarks/soak.py as a module, loaded from its file: putting benchmarks/ on sys.path would let its
    kernels.py shadow the `kernels` package that transformers imports (an ImportError in later tests)."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "soak.py"
    spec = importlib.util.spec_from_file_location("soak", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


_soak = _load_soak()
print_report, soak = _soak.print_report, _soak.soak

MODEL = "robust-model"
# A Qwen3-sized context (40960 positions) so that a multi-megabyte prompt is tokenized (not refused by its
# byte count alone) and the API must stay responsive while that happens.
BIG_CONTEXT_SPEC = dataclasses.replace(SERVE_SPEC, max_position_embeddings=40960)
HEALTH_LATENCY_LIMIT = 1.0  # seconds /health may take while another request is processed
RECOVERY_LIMIT = 30.0  # seconds from a worker SIGKILL to serving again


@pytest.fixture(scope="module")
def big_model(model_factory) -> Path:
    return model_factory(BIG_CONTEXT_SPEC, quantized=True)


@pytest.fixture(scope="module")
def server(big_model):
    s = CliServer(
        big_model,
        "--served-model-name",
        MODEL,
        "--kv-cache-memory",
        "64MiB",
        "--header-timeout",
        "1",
        "--body-timeout",
        "2",
    )
    yield s
    s.stop()


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status
    return err


def _metric(base: str, name: str) -> float:
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def _sse(base: str, path: str, body: dict, events: list, timeout: float = 120) -> None:
    """Stream ``body`` and append every data event (parsed JSON, or the string "[DONE]") to ``events``."""
    with httpx.stream("POST", f"{base}{path}", json=body, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[6:]
                events.append(data if data == "[DONE]" else json.loads(data))


class HealthPoller:
    """Polls /health from a thread; records the slowest answer."""

    def __init__(self, base: str):
        self.base, self.worst, self._stop = base, 0.0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as http:
            while not self._stop.is_set():
                t0 = time.monotonic()
                http.get(f"{self.base}/health")
                self.worst = max(self.worst, time.monotonic() - t0)
                time.sleep(0.05)

    def __enter__(self) -> HealthPoller:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.thread.join(30)


# ------------------------------------------------------------------------------------------------
# requests that used to stop the engine for everyone
# ------------------------------------------------------------------------------------------------
CHAT_KILLERS = [
    ({"min_tokens": 2, "stop_token_ids": [1_000_000_000]}, "stop_token_ids"),
    ({"seed": 18446744073709551616}, "seed"),
    ({"seed": -(2**64)}, "seed"),
    ({"top_k": 18446744073709551616}, "top_k"),
    ({"top_k": -5}, "top_k"),
    ({"stop_token_ids": [18446744073709551616]}, "stop_token_ids"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"logit_bias": {"100000000000000000000": 1}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"),
    ({"logit_bias": {"5": float("inf")}}, "logit_bias"),
    ({"n": 2**70}, "n"),
    ({"priority": 2**70}, "priority"),
    ({"max_tokens": 2**70}, "max_tokens"),
    ({"max_completion_tokens": 2**70}, "max_completion_tokens"),
    ({"min_tokens": 2**40}, "min_tokens"),
    ({"logprobs": True, "top_logprobs": 2**70}, "top_logprobs"),
    ({"stop": ["x"] * 17}, "stop"),
    ({"stop": ["x" * 2000]}, "stop"),
    ({"messages": [{"role": "hacker", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "system"}, {"role": "user", "content": "hi"}]}, "messages"),  # content is required
]
COMPLETION_KILLERS = [
    ({"prompt": [2**70]}, "prompt"),
    ({"prompt": [1_000_000_000]}, "prompt"),
    ({"prompt": [[5, 6], [-3]]}, "prompt"),
    ({"prompt": "hi", "best_of": 3}, "best_of"),
    ({"prompt": "hi", "logprobs": 2**70}, "logprobs"),
]


def test_hostile_values_get_400_and_serving_goes_on(server):
    base = server.base
    running: list = []
    long = threading.Thread(
        target=_sse,
        args=(
            base,
            "/v1/completions",
            {
                "model": MODEL,
                "prompt": "in flight",
                "max_tokens": 400,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
            running,
        ),
    )
    long.start()
    while not running:
        time.sleep(0.01)
    for extra, param in CHAT_KILLERS:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}
        err = _error(
            httpx.post(
                f"{base}/v1/chat/completions", content=json.dumps(body), headers={"content-type": "application/json"}
            ),
            400,
        )
        assert err["param"] is not None and err["param"].startswith(param), (extra, err)
    for extra, param in COMPLETION_KILLERS:
        err = _error(httpx.post(f"{base}/v1/completions", json={"model": MODEL, "max_tokens": 4, **extra}), 400)
        assert err["param"] is not None and err["param"].startswith(param), (extra, err)
    _error(httpx.post(f"{base}/detokenize", json={"tokens": [2**70]}), 400)
    _error(
        httpx.post(
            f"{base}/v1/chat/completions",
            content=b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
            headers={"content-type": "application/json"},
        ),
        400,
    )
    long.join(120)
    # the stream that was running through all of it finished normally, with exact usage
    assert running[-1] == "[DONE]" and running[-2]["usage"]["completion_tokens"] == 400
    assert [e["choices"][0]["finish_reason"] for e in running[:-2]][-1] == "length"
    r = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "after", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert httpx.get(f"{base}/health").status_code == 200
    assert _metric(base, "a8w8:worker_restarts_total") == 0


def test_developer_role_is_a_system_message(server):
    msgs = lambda role: [{"role": role, "content": "Answer in one word."}, {"role": "user", "content": "hi"}]  # noqa: E731
    ids = [
        httpx.post(f"{server.base}/tokenize", json={"messages": msgs(role)}).json()["tokens"]
        for role in ("developer", "system")
    ]
    assert ids[0] == ids[1]


def test_openapi_documents_400_not_422(server):
    schema = httpx.get(f"{server.base}/openapi.json").json()
    for path, operations in schema["paths"].items():
        for method, op in operations.items():
            assert "422" not in op["responses"], (path, method)
    chat = schema["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert chat["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert "text/event-stream" in chat["200"]["content"]


# ------------------------------------------------------------------------------------------------
# big, chunked and slow inputs
# ------------------------------------------------------------------------------------------------
RETAINED_MIB_LIMIT = 150  # what the API process may keep after the big bodies below (measured: it shrank)


def test_big_prompts_keep_the_api_responsive(server):
    base = server.base
    rss0 = rss_mib(server.proc.pid)
    with HealthPoller(base) as poller:
        # 4 MB of text under the byte bound: tokenized (in a thread, without the GIL), then refused with
        # the exact count
        r = httpx.post(
            f"{base}/v1/completions", json={"model": MODEL, "prompt": "hello " * 700_000, "max_tokens": 1}, timeout=120
        )
        err = _error(r, 400)
        assert "However, your request has 700001 input tokens" in err["message"]  # the final " " is one more
        # 20 MB and 30 MB (under the 32 MiB body limit, over 40960 tokens x 387 bytes): refused by their byte
        # count before tokenizing
        for size in (20_000_000, 30_000_000):
            body = {"model": MODEL, "messages": [{"role": "user", "content": "x" * size}], "max_tokens": 1}
            err = _error(httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120), 400)
            assert "maximum context length is 40960 tokens. However, your request has at least" in err["message"]
        err = _error(httpx.post(f"{base}/tokenize", json={"prompt": "hello " * 5_000_000}, timeout=120), 400)
        assert "at least" in err["message"]
    assert poller.worst < HEALTH_LATENCY_LIMIT, poller.worst
    # and the memory they took goes back to the system (server/guard.py trims the C heap after a large body;
    # without that the process kept about 350 MiB here): within a few seconds of the last answer
    deadline = time.monotonic() + 10
    while (grown := rss_mib(server.proc.pid) - rss0) >= RETAINED_MIB_LIMIT and time.monotonic() < deadline:
        time.sleep(0.2)
    assert grown < RETAINED_MIB_LIMIT, f"API process kept {grown:.0f} MiB"


def test_every_body_is_capped(server):
    base = server.base
    rss0 = rss_mib(server.proc.pid)

    def chunks(total: int):
        block = b"x" * 65536
        for _ in range(total // len(block)):
            yield block

    # no Content-Length (chunked transfer encoding): reading stops at the limit
    r = httpx.post(
        f"{base}/v1/completions", content=chunks(100 << 20), headers={"content-type": "application/json"}, timeout=60
    )
    assert "exceeds the limit of 33554432 bytes" in _error(r, 413)["message"]
    assert rss_mib(server.proc.pid) - rss0 < 100
    # a declared length past the limit is refused on its header
    r = httpx.post(f"{base}/tokenize", content=b"x" * (40 << 20), headers={"content-type": "application/json"})
    assert "request body of 41943040 bytes" in _error(r, 413)["message"]
    assert httpx.get(f"{base}/health").status_code == 200


def test_slow_request_heads_are_cut_off(server):
    """--header-timeout 1: a connection that sends its request head a byte at a time is closed."""
    conns = []
    for _ in range(5):
        s = socket.create_connection(("127.0.0.1", server.port))
        s.sendall(b"POST /v1/com")
        conns.append(s)
    t0 = time.monotonic()
    for s in conns:
        s.settimeout(10)
        try:
            for _ in range(20):  # keeps trickling for up to 6 s; must not keep the connection alive
                time.sleep(0.3)
                s.sendall(b"p")
        except OSError:
            pass
        s.close()
    assert time.monotonic() - t0 < 5
    assert httpx.get(f"{server.base}/health").status_code == 200


def test_stalled_body_gets_408(server):
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 100\r\n\r\n{"prompt":'
    )
    s.settimeout(10)
    answer = b""
    while chunk := s.recv(4096):  # until the server closes the connection
        answer += chunk
    s.close()
    assert answer.startswith(b"HTTP/1.1 408") and b"no request body data for 2 s" in answer


# ------------------------------------------------------------------------------------------------
# worker death
# ------------------------------------------------------------------------------------------------
def test_killed_worker_is_restarted_without_restarting_the_api(serve_model):
    s = CliServer(serve_model, "--served-model-name", MODEL, "--max-model-len", "2048", "--kv-cache-memory", "64MiB")
    try:
        base, api_pid, old_worker = s.base, s.proc.pid, s.worker_pid()
        streams = [[], []]
        threads = [
            threading.Thread(
                target=_sse,
                args=(
                    base,
                    path,
                    {"model": MODEL, "max_tokens": 1900, "ignore_eos": True, "stream": True, **body},
                    events,
                ),
            )
            for events, (path, body) in zip(
                streams,
                [
                    ("/v1/completions", {"prompt": "a"}),
                    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "b"}]}),
                ],
            )
        ]
        for t in threads:
            t.start()
        while not all(len(e) > 3 for e in streams):
            time.sleep(0.01)
        os.kill(old_worker, signal.SIGKILL)
        killed = time.monotonic()
        while (health := httpx.get(f"{base}/health")).status_code == 200:  # 200 only until the kernel has
            assert time.monotonic() - killed < 1.0  # torn the process down
        assert health.status_code == 503 and health.json()["status"] == "restarting"
        live = httpx.get(f"{base}/live")  # liveness holds while the worker restarts (deploy/kubernetes probes it)
        assert live.status_code == 200 and live.json()["status"] == "alive"
        assert live.json()["engine"] in ("restarting", "ready")  # ready: the new worker was that quick
        for t in threads:
            t.join(30)
        for events in streams:  # each in-flight stream: an error event, then [DONE]; never a silent cut
            assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == 503, events[-2:]
            assert "was killed by signal SIGKILL" in events[-2]["error"]["message"]
        r = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        if r.status_code == 503:  # still restarting: told when to come back
            assert r.headers["retry-after"].isdigit()
        while httpx.get(f"{base}/health").status_code != 200:
            assert time.monotonic() - killed < RECOVERY_LIMIT, "not serving again in time"
            time.sleep(0.1)
        r = httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2})
        assert r.status_code == 200
        assert s.proc.poll() is None and s.proc.pid == api_pid
        assert not Path(f"/proc/{old_worker}").exists()  # reaped, not a zombie
        assert s.worker_pid() not in (None, old_worker)
        assert _metric(base, "a8w8:worker_restarts_total") == 1
        assert _metric(base, "vllm:num_requests_running") == 0
        assert _metric(base, "vllm:kv_cache_usage_perc") == 0
    finally:
        s.stop()


def test_a_worker_that_keeps_dying_makes_the_server_exit_nonzero(serve_model):
    s = CliServer(serve_model, "--max-model-len", "512", "--kv-cache-memory", "16MiB", "--max-worker-restarts", "1")
    try:
        first = s.worker_pid()
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + RECOVERY_LIMIT
        # until the replacement serves (a /health right after the kill may still answer before the death is seen)
        while s.worker_pid() in (None, first) or httpx.get(f"{s.base}/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        os.kill(s.worker_pid(), signal.SIGKILL)  # the second death is past the budget of one restart
        assert s.proc.wait(30) == 1
    finally:
        s.stop()


# ------------------------------------------------------------------------------------------------
# graceful shutdown
# ------------------------------------------------------------------------------------------------
def test_sigterm_drains_and_never_cuts_a_stream_silently(serve_model):
    s = CliServer(
        serve_model,
        "--served-model-name",
        MODEL,
        "--max-model-len",
        "2048",
        "--kv-cache-memory",
        "64MiB",
        "--shutdown-timeout",
        "3",
    )
    base, worker = s.base, s.worker_pid()
    lengths = [20, 40, 1900, 1900]  # two finish within the drain, two are cut at its end
    streams = [[] for _ in lengths]
    threads = [
        threading.Thread(
            target=_sse,
            args=(
                base,
                "/v1/completions",
                {"model": MODEL, "prompt": f"p{i}", "max_tokens": n, "ignore_eos": True, "stream": True},
                events,
            ),
        )
        for i, (n, events) in enumerate(zip(lengths, streams))
    ]
    cut_by_openai: list[BaseException] = []

    def openai_stream() -> None:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        try:
            for _ in client.completions.create(
                model=MODEL, prompt="o", max_tokens=1900, stream=True, extra_body={"ignore_eos": True}
            ):
                pass
        except openai.APIError as e:
            cut_by_openai.append(e)

    threads.append(threading.Thread(target=openai_stream))
    for t in threads:
        t.start()
    while not all(len(e) > 1 for e in streams):
        time.sleep(0.01)
    try:
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        health = httpx.get(f"{base}/health")
        assert health.status_code == 503 and health.json()["status"] == "draining"
        err = _error(
            httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "late", "max_tokens": 2}), 503
        )
        assert "shutting down" in err["message"]
        for t in threads:
            t.join(60)
        for n, events in zip(lengths, streams):
            assert events[-1] == "[DONE]"
            if n <= 40:  # finished within the drain
                assert events[-2]["choices"][0]["finish_reason"] == "length"
            else:
                assert events[-2]["error"]["code"] == 503 and "shutting down" in events[-2]["error"]["message"]
        assert len(cut_by_openai) == 1  # the official client raises; it does not return a truncated answer
        assert s.proc.wait(30) == 0
        assert worker is not None and not Path(f"/proc/{worker}").exists()
    finally:
        s.stop()


def test_ctrl_c_in_a_terminal_drains_like_sigterm(serve_model):
    """A terminal's Ctrl-C is SIGINT to the whole process group, the worker included: the worker ignores it,
    the API process drains (the running stream completes) and stops the worker, exit 0, no traceback."""
    s = CliServer(serve_model, "--max-model-len", "2048", "--kv-cache-memory", "64MiB", own_group=True)
    worker = s.worker_pid()
    events: list = []
    body = {"prompt": "x", "max_tokens": 60, "ignore_eos": True, "stream": True}
    reader = threading.Thread(target=_sse, args=(s.base, "/v1/completions", body, events))
    reader.start()
    while len(events) < 2:
        time.sleep(0.01)
    try:
        os.killpg(s.proc.pid, signal.SIGINT)
        reader.join(60)
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length", events[-2:]
        assert s.proc.wait(30) == 0
        assert worker is not None and not Path(f"/proc/{worker}").exists()
        s.log.seek(0)
        log = s.log.read()
        assert "SIGINT: draining" in log, log[-3000:]
        # (nanobind's "leaked" lines: Triton's bindings at exit, once imported through torch._dynamo)
        for bad in ("Traceback", "KeyboardInterrupt", "worker lost", "exited with code", "leaked"):
            assert bad not in log, log[-3000:]
    finally:
        s.stop()


def test_second_signal_exits_at_once(serve_model):
    s = CliServer(serve_model, "--max-model-len", "2048", "--kv-cache-memory", "64MiB", "--shutdown-timeout", "60")
    worker = s.worker_pid()
    events: list = []

    def stream() -> None:
        try:
            _sse(
                s.base,
                "/v1/completions",
                {"prompt": "x", "max_tokens": 1900, "ignore_eos": True, "stream": True},
                events,
            )
        except httpx.HTTPError:
            pass  # the connection is cut: that is what a second signal does

    threading.Thread(target=stream, daemon=True).start()
    while len(events) < 2:
        time.sleep(0.01)
    try:
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        s.proc.wait(10)
        assert time.monotonic() - t0 < 5
        deadline = time.monotonic() + 5
        while Path(f"/proc/{worker}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not Path(f"/proc/{worker}").exists()
    finally:
        s.stop()


# ------------------------------------------------------------------------------------------------
# soak: concurrent streams, disconnects, a worker kill, then schemathesis
# ------------------------------------------------------------------------------------------------
def test_small_soak_run_is_clean(serve_model):
    report = soak(
        str(serve_model),
        clients=16,
        duration=20,
        disconnect_prob=0.15,
        kill=True,
        schemathesis_examples=3,
        schemathesis_time=60,
        server_args=[],
    )
    print_report(report)
    assert report.completed > 50 and report.disconnected > 0
    assert report.truncated_streams == 0 and report.usage_mismatches == 0
    assert report.server_errors_outside_kill_window == 0
    assert report.recovered_after_s is not None and report.recovered_after_s - report.kill_at_s < RECOVERY_LIMIT
    assert report.worker_restarts == 1 and report.same_api_process
    assert report.after["kv_cache_usage_perc"] == 0 and report.after["num_requests_running"] == 0
    assert report.schemathesis["exit_code"] == 0, report.schemathesis
    assert report.clean


def serve_once(model: Path) -> subprocess.CompletedProcess:
    """``serve`` on ``model``, expected to end by itself."""
    cmd = [sys.executable, "-m", "a8w8_serve", "serve", "--model", str(model), "--port", "0"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_a_checkpoint_that_cannot_load_makes_serve_exit_nonzero(serve_model, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in serve_model.iterdir():
        if not f.name.endswith(".safetensors"):
            (broken / f.name).write_bytes(f.read_bytes())
    proc = serve_once(broken)
    assert proc.returncode == 1
    assert proc.stderr.startswith("error: ") and "safetensors" in proc.stderr  # found before loading
    # files that are all there and readable, but a tensor of the wrong shape: the worker fails to load it
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(serve_model / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight"
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, str(broken / "model.safetensors"))
    proc = serve_once(broken)
    assert proc.returncode == 1
    assert "the engine failed to start" in proc.stderr and name in proc.stderr
