"""Two real replicas (the CLI on the random demo model) behind HAProxy (Debian's package) on 127.0.0.1, started
by deploy/router/local_cluster.py: balancing, session affinity with the prefix cache, SSE passed through,
a replica killed with SIGKILL, a replica drained with SIGTERM. Only loopback traffic; every wait is bounded."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from servers import MODEL, free_port, worker_pid

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "deploy" / "router"))
import local_cluster  # noqa: E402  (deploy/router is a script directory, not a package)

pytestmark = pytest.mark.skipif(
    shutil.which("haproxy") is None, reason="haproxy not installed (scripts/test.sh installs Debian's package)"
)

CONCURRENT = 32
CONVERSATIONS, TURNS = 4, 3
DOWN_SECONDS = 5.0  # HAProxy checks every 500 ms: a dead or draining replica is out well within this
RECOVERY_SECONDS = 60.0


def metric(base: str, name: str, labels: str = "") -> float:
    total = 0.0
    for line in httpx.get(f"{base}/metrics", timeout=5).text.splitlines():
        head, _, value = line.rpartition(" ")
        if (head == name or head.startswith(name + "{")) and labels in head:
            total += float(value)
    return total


def successes(base: str) -> float:
    return metric(base, "vllm:request_success_total")


@pytest.fixture(scope="module")
def cluster(serve_model, tmp_path_factory):
    c = local_cluster.LocalCluster(
        ports=[free_port(), free_port()],
        router_port=free_port(),
        serve_args=[
            "--model",
            str(serve_model),
            "--served-model-name",
            MODEL,
            "--max-model-len",
            "2048",
            "--kv-cache-memory",
            "64MiB",
        ],
        log_dir=tmp_path_factory.mktemp("cluster"),
    )
    try:
        c.start(timeout=180)
        yield c
    finally:
        c.stop()


def restart_replica(c: local_cluster.LocalCluster, index: int) -> None:
    """Start replica ``index`` again on its port (after a test stopped it) and wait until HAProxy uses it."""
    old = c.procs[index]
    if old.poll() is None:
        old.kill()
        old.wait(30)
    c.procs[index] = c.spawn_replica(index)
    local_cluster.wait_healthy(c.urls[index], c.procs[index], timeout=180)
    before = successes(c.urls[index])
    deadline = time.monotonic() + RECOVERY_SECONDS
    while successes(c.urls[index]) == before:  # leastconn sends it requests once HAProxy sees it up
        assert time.monotonic() < deadline, "the restarted replica gets no requests"
        httpx.post(f"{c.url}/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1}, timeout=30)
        time.sleep(0.1)


def test_concurrent_requests_are_spread_over_both_replicas(cluster):
    before = [successes(u) for u in cluster.urls]

    async def main():
        async with httpx.AsyncClient(timeout=120) as http:
            body = {"model": MODEL, "prompt": "spread", "max_tokens": 8, "ignore_eos": True}
            return await asyncio.gather(*[http.post(f"{cluster.url}/v1/completions", json=body) for _ in range(32)])

    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * CONCURRENT
    served = [successes(u) - b for u, b in zip(cluster.urls, before)]
    assert sum(served) == CONCURRENT and min(served) > 0, served


def test_conversations_keep_their_replica_and_its_prefix_cache(cluster):
    clients = [
        openai.OpenAI(
            base_url=f"{cluster.url}/v1",
            api_key="x",
            max_retries=0,
            default_headers={"X-Session-Id": f"conversation-{i}"},
        )
        for i in range(CONVERSATIONS - 1)
    ]
    # the last conversation is keyed by the OpenAI `user` field instead of a header
    plain = openai.OpenAI(base_url=f"{cluster.url}/v1", api_key="x", max_retries=0)
    histories = [[{"role": "system", "content": f"You are assistant number {i}. " * 8}] for i in range(CONVERSATIONS)]
    cached: list[list[int]] = [[] for _ in range(CONVERSATIONS)]
    served_by: list[set[str]] = [set() for _ in range(CONVERSATIONS)]
    for turn in range(TURNS):
        # interleaved, with one request without a key per round: 5 requests a round, so a choice that
        # ignored the key (always the same replica, or alternating) would not keep every conversation on one
        for i, history in enumerate(histories):
            history.append({"role": "user", "content": f"Question {turn} of conversation {i}?"})
            kw = {"model": MODEL, "messages": history, "max_tokens": 12, "temperature": 0}
            client = clients[i] if i < len(clients) else plain
            extra = {} if i < len(clients) else {"user": "person-42"}
            raw = client.chat.completions.with_raw_response.create(**kw, **extra)
            served_by[i].add(raw.headers["x-served-by"])
            r = raw.parse()
            history.append({"role": "assistant", "content": r.choices[0].message.content})
            details = r.usage.prompt_tokens_details
            cached[i].append(details.cached_tokens if details else 0)
        plain.completions.create(model=MODEL, prompt=f"filler {turn}", max_tokens=1)
    assert all(len(s) == 1 for s in served_by), served_by  # each conversation stayed on one replica
    assert len(set().union(*served_by)) == 2, served_by  # and the keys are spread over both
    for i, per_turn in enumerate(cached):
        assert all(n > 0 for n in per_turn[1:]), f"conversation {i} lost its prefix cache: {per_turn}"


def test_sse_streams_through_the_router_unbuffered(cluster):
    body = {"model": MODEL, "prompt": "stream", "max_tokens": 64, "ignore_eos": True, "stream": True}
    arrivals: list[float] = []
    events: list[str] = []
    with httpx.stream("POST", f"{cluster.url}/v1/completions", json=body, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic())
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1] if json.loads(e)["choices"])
    assert text
    # events arrive spread over the generation, not in one piece at the end
    spread = arrivals[-1] - arrivals[0]
    early = sum(1 for t in arrivals if t < arrivals[0] + spread / 2)
    assert spread > 0.05 and early >= 5, (spread, early)


def test_dashboard_and_adapter_metrics_exist_on_a_replica(cluster):
    exported = {
        re.split(r"[{ ]", line)[0]
        for line in httpx.get(f"{cluster.urls[0]}/metrics").text.splitlines()
        if line and not line.startswith("#")
    }
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "a8w8-serve-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b((?:vllm|a8w8):[a-z0-9_]+)", e)}
    assert len(used) >= 10
    missing = used - exported
    assert not missing, f"the dashboard queries metrics the server does not export: {missing}"
    assert "vllm:num_requests_waiting" in exported  # what the custom-metrics HPA overlay scales on


def test_sigkill_of_a_replica_loses_no_request_sent_after_it(cluster):
    victim = 0
    victim_worker = worker_pid(cluster.procs[victim].pid)
    results: list[tuple[float, int | str]] = []
    stop = threading.Event()

    def client():
        with httpx.Client(timeout=60) as http:
            while not stop.is_set():
                sent = time.monotonic()
                try:
                    r = http.post(
                        f"{cluster.url}/v1/completions",
                        json={"model": MODEL, "prompt": "load", "max_tokens": 6, "ignore_eos": True},
                    )
                    complete = r.status_code == 200 and len(r.json()["choices"][0]["text"]) > 0
                    results.append((sent, 200 if complete else r.status_code))
                except httpx.HTTPError as e:
                    results.append((sent, type(e).__name__))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    cluster.procs[victim].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    time.sleep(3.0)
    stop.set()
    for t in threads:
        t.join(60)
    after = [outcome for sent, outcome in results if sent > killed]
    assert len(after) >= 8, "too few requests after the kill to say anything"
    assert after == [200] * len(after), [o for o in after if o != 200]
    assert any(sent < killed for sent, _ in results)
    # the killed API process's worker notices its pipe closed and exits (no orphan holding the model)
    deadline = time.monotonic() + 30
    while victim_worker is not None and Path(f"/proc/{victim_worker}").exists():
        status = Path(f"/proc/{victim_worker}/status").read_text() if Path(f"/proc/{victim_worker}").exists() else ""
        if "State:\tZ" in status:
            break
        assert time.monotonic() < deadline, "the worker of the killed replica is still running"
        time.sleep(0.2)
    restart_replica(cluster, victim)


def test_sigterm_drains_a_replica_behind_the_router(cluster):
    # a long stream lands on one of the replicas; that replica is then told to stop
    body = {"model": MODEL, "prompt": "drain", "max_tokens": 300, "ignore_eos": True, "stream": True}
    events: list[str] = []

    def stream():
        with httpx.stream("POST", f"{cluster.url}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])

    t = threading.Thread(target=stream)
    t.start()
    deadline = time.monotonic() + 30
    while len(events) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    running = [metric(u, "vllm:num_requests_running") for u in cluster.urls]
    assert sorted(running) == [0, 1], running
    draining = running.index(1)
    other = cluster.urls[1 - draining]
    other_before = successes(other)
    cluster.procs[draining].send_signal(signal.SIGTERM)
    # new requests during the drain all succeed, on the other replica
    sent = 0
    while t.is_alive() and sent < 20:
        r = httpx.post(
            f"{cluster.url}/v1/completions", json={"model": MODEL, "prompt": "y", "max_tokens": 2}, timeout=60
        )
        assert r.status_code == 200, r.text
        sent += 1
    t.join(120)
    assert not t.is_alive()
    assert events[-1] == "[DONE]"
    finals = [json.loads(e) for e in events[:-1]]
    assert not any("error" in e for e in finals), "the drained stream was cut"
    assert finals[-1]["choices"][0]["finish_reason"] == "length"
    assert cluster.procs[draining].wait(60) == 0
    assert successes(other) - other_before == sent
    restart_replica(cluster, draining)
