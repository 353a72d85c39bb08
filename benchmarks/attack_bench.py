"""Hostile clients against a victim (the robustness issue's attacks, each in turn), on a local server.

    python benchmarks/attack_bench.py [--model DIR] [--seconds 20] [--out bench-results/attacks.json]

Without ``--model`` it serves the random-weight Qwen3 demo model with ``--max-model-len 8192``. Throughout, a
victim sends a 4-token completion every ``--victim-interval`` seconds and ``/health`` is polled every second. Each
attack runs for ``--seconds`` (its clients loop, each request bounded by a timeout); then the next. Per attack it
prints and writes the victim's latency (p50 / p99 / max, and failures), the ``/health`` probes that failed (not
200 within 2 s), and what the attacker's requests got (status codes). A last scenario stops the worker (SIGSTOP)
for 15 s and reports when ``/health`` said ``stalled`` (the victim waits there, by design: nothing can compute).
A benchmark, not a test: the goal it reports against is the issue's (victim p99 under 2 s, no /health failure).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from servers import CliServer  # noqa: E402

MODEL = "attacked"
HEALTH_TIMEOUT_SECONDS = 2.0
ATTACK_REQUEST_TIMEOUT_SECONDS = 30.0
VICTIM_GOAL_P99_SECONDS = 2.0


def many_properties(count: int, tag: int) -> dict:
    return {"type": "object", "properties": {f"p{tag}_{i}": {"type": "string"} for i in range(count)}}


def chat(extra: dict) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Tell me about a person."}], **extra}


# name -> (concurrent clients, (path, body) of client i's k-th request)
ATTACKS: dict[str, tuple[int, Callable[[int, int], tuple[str, dict]]]] = {
    "guided_choice of 100k options": (
        8,
        lambda i, k: ("/v1/chat/completions", chat({"guided_choice": [f"o{i}_{k}_{j}" for j in range(100_000)]})),
    ),
    "schemas of 5000 optional properties": (
        16,
        lambda i, k: ("/v1/chat/completions", chat({"guided_json": many_properties(5000, 1000 * i + k)})),
    ),
    "grammars past the engine's limits": (
        4,
        lambda i, k: (
            "/v1/chat/completions",
            chat({"guided_choice": [f"x{k}_{j}" for j in range(2000)]})
            if k % 2
            else chat({"guided_json": {"anyOf": [{"type": "object", "required": [f"k{j}"]} for j in range(2001 + k)]}}),
        ),
    ),
    "n=16 x 3000 tokens with top_logprobs 20, not streamed": (
        2,
        lambda i, k: (
            "/v1/completions",
            {"model": MODEL, "prompt": "x", "n": 16, "max_tokens": 3000, "ignore_eos": True, "logprobs": 20},
        ),
    ),
    "4 x n=16 x 2500 tokens": (
        4,
        lambda i, k: (
            "/v1/completions",
            {"model": MODEL, "prompt": f"a{i}", "n": 16, "max_tokens": 2500, "ignore_eos": True},
        ),
    ),
    "/detokenize of 1M ids": (40, lambda i, k: ("/detokenize", {"model": MODEL, "tokens": [9707] * 1_000_000})),
    "reserved chat_template_kwargs, lone surrogates": (
        4,
        lambda i, k: (
            "/v1/chat/completions",
            chat({"chat_template_kwargs": {"messages": []}}) if k % 2 else chat({"guided_regex": "a\ud800"}),
        ),
    ),
}


def probe_loop(base: str, interval: float, victim: bool, out: str) -> None:
    """The victim's completions, or /health probes, until killed: a JSON line (monotonic time, seconds, ok)
    each. Run as a process of its own (``--probe``), so that the attackers' threads do not starve it."""
    with httpx.Client(timeout=120) as http, open(out, "a", buffering=1) as log:
        while True:
            t0 = time.monotonic()
            try:
                if victim:
                    body = {"model": MODEL, "prompt": "hello", "max_tokens": 4, "ignore_eos": True}
                    ok = http.post(f"{base}/v1/completions", json=body).status_code == 200
                else:
                    ok = http.get(f"{base}/health", timeout=HEALTH_TIMEOUT_SECONDS).status_code == 200
            except httpx.HTTPError:
                ok = False
            log.write(json.dumps([t0, time.monotonic() - t0, ok]) + "\n")
            time.sleep(max(0.0, interval - (time.monotonic() - t0)))


class Probe:
    """:func:`probe_loop` in a process of its own (CLOCK_MONOTONIC is the same for every process)."""

    def __init__(self, base: str, interval: float, victim: bool, out: Path):
        self.out = out
        out.unlink(missing_ok=True)
        args = ["--probe", base, "--probe-interval", str(interval), "--probe-out", str(out)]
        self.proc = subprocess.Popen([sys.executable, __file__, *args, *(["--probe-victim"] if victim else [])])

    def window(self, start: float, end: float) -> list[tuple[float, float, bool]]:
        records = [json.loads(line) for line in self.out.read_text().splitlines() if line.strip()]
        return [tuple(r) for r in records if start <= r[0] < end]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def run_attack(base: str, clients: int, request: Callable[[int, int], tuple[str, dict]], seconds: float) -> Counter:
    statuses: Counter = Counter()
    deadline = time.monotonic() + seconds

    def client(i: int) -> None:
        k = 0
        sent: dict[str, bytes] = {}  # (a body repeated is serialized once: the load generator shares the CPUs)
        with httpx.Client(timeout=ATTACK_REQUEST_TIMEOUT_SECONDS) as http:
            while time.monotonic() < deadline:
                path, body = request(i, k)
                k += 1
                if path == "/detokenize":
                    content = sent.setdefault(path, json.dumps(body).encode())
                else:
                    content = json.dumps(body).encode()
                try:
                    statuses[http.post(f"{base}{path}", content=content).status_code] += 1
                except httpx.TimeoutException:
                    statuses["client timeout"] += 1
                except httpx.HTTPError as e:
                    statuses[type(e).__name__] += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + ATTACK_REQUEST_TIMEOUT_SECONDS + 5)
    return statuses


def summary(victim: list, health: list) -> dict:
    latencies = sorted(s for _, s, _ in victim)
    p99 = latencies[min(len(latencies) - 1, int(round(0.99 * (len(latencies) - 1))))] if latencies else None
    return {
        "victim_requests": len(victim),
        "victim_failures": sum(not ok for *_, ok in victim),
        "victim_p50_s": statistics.median(latencies) if latencies else None,
        "victim_p99_s": p99,
        "victim_max_s": latencies[-1] if latencies else None,
        "health_probes": len(health),
        "health_failures": sum(not ok for *_, ok in health),
    }


def stop_worker(server: CliServer, seconds: float) -> dict:
    worker = server.worker_pid()
    body = {"model": MODEL, "prompt": "x", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    streamer = threading.Thread(
        target=lambda: httpx.post(f"{server.base}/v1/completions", json=body, timeout=120), daemon=True
    )
    streamer.start()
    time.sleep(1.0)  # a step in flight
    t0 = time.monotonic()
    os.kill(worker, signal.SIGSTOP)
    stalled_at = None
    while time.monotonic() - t0 < seconds:
        try:
            r = httpx.get(f"{server.base}/health", timeout=HEALTH_TIMEOUT_SECONDS)
            if stalled_at is None and r.status_code == 503 and r.json().get("status") == "stalled":
                stalled_at = time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    os.kill(worker, signal.SIGCONT)
    back = None
    while back is None and time.monotonic() - t0 < seconds + 60:
        try:
            if httpx.get(f"{server.base}/health", timeout=HEALTH_TIMEOUT_SECONDS).status_code == 200:
                back = time.monotonic() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return {"stopped_for_s": seconds, "health_said_stalled_after_s": stalled_at, "health_ok_again_after_s": back}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="default: the random-weight Qwen3 demo model")
    ap.add_argument("--seconds", type=float, default=20.0, help="length of each attack")
    ap.add_argument("--victim-interval", type=float, default=0.5)
    ap.add_argument("--attacks", nargs="*", default=None, help="names (default: all)")
    ap.add_argument("--out", default="bench-results/attacks.json")
    ap.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # (the probe process)
    ap.add_argument("--probe-interval", type=float, default=1.0, help=argparse.SUPPRESS)
    ap.add_argument("--probe-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--probe-victim", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.probe:
        probe_loop(args.probe, args.probe_interval, args.probe_victim, args.probe_out)
        return
    model = args.model
    if model is None:
        from offline.default_model import ensure_random_model

        model = str(ensure_random_model())
    server = CliServer(Path(model), "--served-model-name", MODEL, "--max-model-len", "8192")
    report: dict = {"model": model, "seconds_per_attack": args.seconds, "cpus": os.cpu_count(), "attacks": {}}
    try:
        scratch = Path(tempfile.mkdtemp(prefix="attack-bench-"))
        victim = Probe(server.base, args.victim_interval, True, scratch / "victim.jsonl")
        health = Probe(server.base, 1.0, False, scratch / "health.jsonl")
        time.sleep(3)
        t0 = time.monotonic()
        report["attacks"]["(none: baseline)"] = summary(victim.window(0, t0), health.window(0, t0))
        for name, (clients, request) in ATTACKS.items():
            if args.attacks and name not in args.attacks:
                continue
            start = time.monotonic()
            statuses = run_attack(server.base, clients, request, args.seconds)
            end = time.monotonic()
            row = summary(victim.window(start, end), health.window(start, end))
            row["attacker_statuses"] = {str(k): v for k, v in statuses.items()}
            report["attacks"][name] = row
            print(
                f"{name:55s} victim p50 {row['victim_p50_s'] or 0:6.3f} s  p99 {row['victim_p99_s'] or 0:6.3f} s  "
                f"max {row['victim_max_s'] or 0:6.3f} s  failures {row['victim_failures']}/{row['victim_requests']}  "
                f"/health failures {row['health_failures']}/{row['health_probes']}  attacker: {row['attacker_statuses']}",
                flush=True,
            )
            time.sleep(2)  # (what the attack left running drains)
        victim.stop()
        health.stop()
        report["worker_stopped"] = stop_worker(server, 15.0)
        print(f"worker SIGSTOPped for 15 s: {report['worker_stopped']}")
    finally:
        server.stop()
    held = [
        r
        for r in report["attacks"].values()
        if (r["victim_p99_s"] or 0) < VICTIM_GOAL_P99_SECONDS
        and r["victim_failures"] == 0
        and r["health_failures"] == 0
    ]
    print(
        f"goal (victim p99 < {VICTIM_GOAL_P99_SECONDS} s, no failures, no /health failure) held in "
        f"{len(held)} of {len(report['attacks'])} periods"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"JSON in {args.out}")


if __name__ == "__main__":
    main()
