"""Soak / fault run against a local server: many streaming clients, random disconnects, one worker kill,
then schemathesis over the server's own OpenAPI schema. Everything stays on 127.0.0.1 and is bounded in
count and time.

    python benchmarks/soak.py [--model DIR] [--clients 128] [--duration 60] [--schemathesis-examples 30]
        [--out bench-results/soak.json]

Without ``--model`` it serves the random-weight Qwen3 demo model. Each client loops until the duration is
over: a random short chat or completion request (``ignore_eos``, 4-48 tokens, ``stream_options.include_usage``),
read to its end, or left after a few events (``--disconnect-prob``). Halfway through, the worker process
is killed with SIGKILL; the kill window runs from the kill until ``/health`` answers 200 again (plus
``KILL_WINDOW_GRACE_SECONDS``). Printed and written as JSON: requests sent / completed / disconnected /
failed by cause, 5xx outside the kill window, lost or truncated streams (ended without ``[DONE]``),
usage mismatches (completion_tokens != max_tokens, or total != prompt + completion), the KV usage and
running/waiting requests before and after, the worker restarts, the recovery time, and schemathesis's
summary. ``--check`` exits 1 unless the run is clean.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from servers import CliServer  # noqa: E402

# A 5xx observed this long after /health is 200 again still counts as part of the kill.
KILL_WINDOW_GRACE_SECONDS = 1.0
# How long the server may take to be serving again after the kill before the run reports a failure.
RECOVERY_TIMEOUT_SECONDS = 60.0
# After the load stops: how long running requests and KV usage may take to return to zero.
IDLE_TIMEOUT_SECONDS = 30.0
REQUEST_TIMEOUT_SECONDS = 120.0
# Clients wait as long as a 429/503's Retry-After says (as the openai SDK does), capped so that the run
# keeps probing the server while its worker restarts.
RETRY_AFTER_CAP_SECONDS = 1.0
WORDS = (
    "the quick brown fox jumps over a lazy dog while seven wizards quietly box jumping frogs in "
    "bright summer light near old stone walls and rivers"
).split()


@dataclass
class Outcome:
    kind: str  # completed | disconnected | error_event | http_error | truncated | exception
    start: float
    end: float
    cause: str = ""
    status: int | None = None
    usage_ok: bool = True


@dataclass
class SoakReport:
    clients: int
    duration_s: float
    requests_sent: int = 0
    completed: int = 0
    disconnected: int = 0
    failed_by_cause: dict[str, int] = field(default_factory=dict)
    server_errors_outside_kill_window: int = 0
    truncated_streams: int = 0
    usage_mismatches: int = 0
    kill_at_s: float | None = None
    recovered_after_s: float | None = None
    worker_restarts: float = 0.0
    same_api_process: bool = True
    before: dict[str, float] = field(default_factory=dict)
    after: dict[str, float] = field(default_factory=dict)
    schemathesis: dict[str, object] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        s = self.schemathesis
        return (
            self.truncated_streams == 0
            and self.usage_mismatches == 0
            and self.server_errors_outside_kill_window == 0
            and self.recovered_after_s is not None
            and self.worker_restarts >= 1
            and self.same_api_process
            and self.after.get("kv_cache_usage_perc") == 0.0
            and self.after.get("num_requests_running") == 0.0
            and (not s or s.get("exit_code") == 0)
        )


def scrape(base: str) -> dict[str, float]:
    """The unlabelled-by-reason engine gauges and counters of /metrics, by short name."""
    wanted = {
        "vllm:kv_cache_usage_perc": "kv_cache_usage_perc",
        "vllm:num_requests_running": "num_requests_running",
        "vllm:num_requests_waiting": "num_requests_waiting",
        "a8w8:worker_restarts_total": "worker_restarts",
        "vllm:generation_tokens_total": "generation_tokens",
    }
    out = {}
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        name = line.split("{", 1)[0]
        if name in wanted:
            out[wanted[name]] = float(line.rsplit(" ", 1)[1])
    return out


def wait_idle(base: str) -> dict[str, float]:
    deadline = time.monotonic() + IDLE_TIMEOUT_SECONDS
    while True:
        m = scrape(base)
        if (
            m["num_requests_running"] == 0 and m["num_requests_waiting"] == 0 and m["kv_cache_usage_perc"] == 0
        ) or time.monotonic() > deadline:
            return m
        time.sleep(0.2)


async def one_request(http: httpx.AsyncClient, base: str, rng: random.Random, disconnect_prob: float) -> Outcome:
    max_tokens = rng.randint(4, 48)
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40)))
    common = {
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        "temperature": rng.choice([0.0, 0.7]),
        "seed": rng.randint(0, 2**31),
    }
    if rng.random() < 0.5:
        url, body = f"{base}/v1/chat/completions", {"messages": [{"role": "user", "content": text}], **common}
    else:
        url, body = f"{base}/v1/completions", {"prompt": text, **common}
    leave_after = rng.randint(1, 5) if rng.random() < disconnect_prob else None
    start = time.monotonic()
    events = 0
    usage = None
    error = None
    try:
        async with http.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                await r.aread()
                end = time.monotonic()
                retry_after = r.headers.get("retry-after")
                if retry_after is not None and retry_after.isdigit():
                    await asyncio.sleep(min(int(retry_after), RETRY_AFTER_CAP_SECONDS))
                return Outcome("http_error", start, end, f"HTTP {r.status_code}", r.status_code)
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    end = time.monotonic()
                    if error is not None:
                        return Outcome("error_event", start, end, f"error event {error['code']}", error["code"])
                    ok = (
                        usage is not None
                        and usage["completion_tokens"] == max_tokens
                        and usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
                    )
                    return Outcome("completed", start, end, usage_ok=ok)
                event = json.loads(data)
                if "error" in event:
                    error = event["error"]
                elif event.get("usage"):
                    usage = event["usage"]
                events += 1
                if leave_after is not None and events >= leave_after:
                    return Outcome("disconnected", start, time.monotonic())
        return Outcome("truncated", start, time.monotonic(), "stream ended without [DONE]")
    except httpx.HTTPError as e:
        return Outcome("exception", start, time.monotonic(), type(e).__name__)


async def load(
    base: str, clients: int, duration: float, disconnect_prob: float, seed: int, on_half: asyncio.Future | None = None
) -> list[Outcome]:
    deadline = time.monotonic() + duration
    outcomes: list[Outcome] = []

    async def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        while time.monotonic() < deadline:
            outcomes.append(await one_request(http, base, rng, disconnect_prob))

    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT_SECONDS, limits=limits) as http:
        await asyncio.gather(*(client(i) for i in range(clients)))
    return outcomes


def kill_worker_and_watch(server: CliServer, t0: float, delay: float) -> tuple[float, float | None]:
    """After ``delay`` s: SIGKILL the worker, then poll /health until 200. (kill time, recovery time) from t0."""
    time.sleep(delay)
    pid = server.worker_pid()
    if pid is None:
        raise RuntimeError("the server has no worker process to kill")
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    while time.monotonic() - killed < RECOVERY_TIMEOUT_SECONDS:
        time.sleep(0.05)
        try:
            if httpx.get(f"{server.base}/health", timeout=5).status_code == 200:
                return killed - t0, time.monotonic() - t0
        except httpx.HTTPError:
            pass
    return killed - t0, None


def run_schemathesis(base: str, examples: int, max_time: float) -> dict[str, object]:
    cmd = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        f"{base}/openapi.json",
        "--checks",
        "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
        "--max-examples",
        str(examples),
        "--max-time",
        str(int(max_time)),
        "--generation-database",
        "none",
        "--request-timeout",
        "60",
        "--no-color",
        "--seed",
        "1",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max_time + 300)
    # Its closing lines: "  1538 generated, 1 found 1 unique failure" and "=== 1 failure, 1 warning in 127.49s ===".
    summary = [
        line.strip(" =")
        for line in proc.stdout.splitlines()
        if re.search(r"\d+ generated", line) or re.match(r"=+ .* in [\d.]+s =+$", line)
    ]
    failures = re.findall(r"^\s*❌ (.+)$", proc.stdout, re.M)
    return {
        "exit_code": proc.returncode,
        "summary": summary,
        "failures": failures,
        "output_tail": proc.stdout[-3000:] if proc.returncode else "",
    }


def summarize(outcomes: list[Outcome], report: SoakReport, t0: float) -> None:
    window = (t0 + (report.kill_at_s or 0), t0 + (report.recovered_after_s or float("inf")) + KILL_WINDOW_GRACE_SECONDS)
    report.requests_sent = len(outcomes)
    causes: Counter[str] = Counter()
    for o in outcomes:
        if o.kind == "completed":
            report.completed += 1
            report.usage_mismatches += not o.usage_ok
        elif o.kind == "disconnected":
            report.disconnected += 1
        else:
            causes[o.cause] += 1
            if o.kind == "truncated":
                report.truncated_streams += 1
            in_window = report.kill_at_s is not None and window[0] <= o.end <= window[1]
            if (o.status or 0) >= 500 and not in_window:
                report.server_errors_outside_kill_window += 1
            if o.kind == "exception" and not in_window:
                report.truncated_streams += 1  # a connection lost outside the kill is a lost stream
    report.failed_by_cause = dict(causes)


def soak(
    model: str | None,
    clients: int,
    duration: float,
    disconnect_prob: float,
    kill: bool,
    schemathesis_examples: int,
    schemathesis_time: float,
    server_args: list[str],
    seed: int = 0,
) -> SoakReport:
    if model is None:
        from offline.default_model import ensure_random_model

        model = str(ensure_random_model())
    server = CliServer(Path(model), "--max-model-len", "1024", "--log-level", "warning", *server_args)
    try:
        report = SoakReport(clients=clients, duration_s=duration)
        base = server.base
        report.before = scrape(base)
        api_pid = server.proc.pid
        t0 = time.monotonic()

        async def main() -> list[Outcome]:
            killer = asyncio.to_thread(kill_worker_and_watch, server, t0, duration / 2) if kill else asyncio.sleep(0)
            outcomes, times = await asyncio.gather(load(base, clients, duration, disconnect_prob, seed), killer)
            if kill:
                report.kill_at_s, report.recovered_after_s = times
            return outcomes

        outcomes = asyncio.run(main())
        summarize(outcomes, report, t0)
        if schemathesis_examples > 0:
            report.schemathesis = run_schemathesis(base, schemathesis_examples, schemathesis_time)
        report.after = wait_idle(base)
        report.worker_restarts = report.after.get("worker_restarts", 0.0)
        report.same_api_process = server.proc.poll() is None and server.proc.pid == api_pid
        return report
    finally:
        server.stop()


def print_report(r: SoakReport) -> None:
    print(
        f"soak: {r.clients} streaming clients for {r.duration_s:g} s, random disconnects, "
        f"{'one worker SIGKILL' if r.kill_at_s is not None else 'no kill'}"
    )
    print(
        f"requests sent {r.requests_sent}: completed {r.completed}, disconnected by the client {r.disconnected}, "
        f"failed {sum(r.failed_by_cause.values())} {r.failed_by_cause}"
    )
    if r.kill_at_s is not None:
        rec = f"{r.recovered_after_s - r.kill_at_s:.1f} s later" if r.recovered_after_s else "NOT recovered"
        print(
            f"worker killed at {r.kill_at_s:.1f} s; /health 200 again {rec}; worker restarts {r.worker_restarts:g}; "
            f"same API process: {r.same_api_process}"
        )
    print(
        f"5xx outside the kill window {r.server_errors_outside_kill_window}; lost or truncated streams "
        f"{r.truncated_streams}; usage mismatches {r.usage_mismatches}"
    )

    def fmt(m: dict) -> str:
        return (
            f"kv usage {m.get('kv_cache_usage_perc', float('nan')):.3f}, running {m.get('num_requests_running', 0):g}, "
            f"waiting {m.get('num_requests_waiting', 0):g}"
        )

    print(f"before: {fmt(r.before)}; after: {fmt(r.after)}")
    if r.schemathesis:
        s = r.schemathesis
        print(f"schemathesis: exit code {s['exit_code']}; {' | '.join(s['summary'])}")
        for f in s["failures"]:
            print(f"  failure: {f}")
    print("clean" if r.clean else "NOT clean")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint directory (default: the random Qwen3 demo model)")
    p.add_argument("--clients", type=int, default=128)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--disconnect-prob", type=float, default=0.1, help="share of requests the client leaves early")
    p.add_argument("--no-kill", dest="kill", action="store_false", help="do not kill the worker")
    p.add_argument("--schemathesis-examples", type=int, default=30, help="per operation; 0 skips schemathesis")
    p.add_argument("--schemathesis-time", type=float, default=300.0, help="seconds for schemathesis at most")
    p.add_argument("--server-arg", action="append", default=[], help="extra argument for a8w8-serve serve (repeatable)")
    p.add_argument("--out", default="bench-results/soak.json")
    p.add_argument("--check", action="store_true", help="exit 1 unless the run is clean")
    args = p.parse_args()
    report = soak(
        args.model,
        args.clients,
        args.duration,
        args.disconnect_prob,
        args.kill,
        args.schemathesis_examples,
        args.schemathesis_time,
        args.server_arg,
    )
    print_report(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**asdict(report), "clean": report.clean}, indent=2))
    print(f"JSON: {out}")
    if args.check and not report.clean:
        sys.exit(1)


if __name__ == "__main__":
    main()
