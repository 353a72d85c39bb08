"""Time to first token of the first requests after a server says it is ready: a plain chat request, then a
second one, then the first and a second constrained (JSON schema) request. Each request is streamed; TTFT is
measured from sending it to its first content chunk.

    python benchmarks/first_request_bench.py [--rounds 3] [--out bench-results/first_request.json] [-- serve flags]

Every round starts a fresh ``a8w8-serve serve`` (default model unless ``--model`` is among the serve flags) on
127.0.0.1 and stops it after the four requests. A benchmark, not a test: it prints the numbers and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "country": {"type": "string", "maxLength": 20}},
    "required": ["city", "country"],
}
READY_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ttft(base: str, body: dict) -> float:
    """Seconds from sending ``body`` (streamed) to its first chunk with content."""
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{base}/v1/chat/completions", json={**body, "stream": True}, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    return time.perf_counter() - t0
    raise RuntimeError(f"no content in the answer to {body}")


def one_round(serve_args: list[str]) -> dict[str, float]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "a8w8_serve", "serve", "--port", str(port), *serve_args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        started = time.perf_counter()
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.perf_counter() - started > READY_TIMEOUT_S:
                raise RuntimeError(f"the server did not become ready: {' '.join(cmd)}")
            time.sleep(0.1)
        ready_s = time.perf_counter() - started
        model = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
        plain = {
            "model": model,
            "messages": QUESTION,
            "max_tokens": 8,
            "temperature": 0,
            "chat_template_kwargs": {"enable_thinking": False},  # (Qwen3: content at once; others ignore it)
        }
        constrained = {
            **plain,
            "max_tokens": 24,
            "response_format": {"type": "json_schema", "json_schema": {"name": "place", "schema": SCHEMA}},
        }
        return {
            "ready_s": ready_s,
            "first_ttft_s": ttft(base, plain),
            "second_ttft_s": ttft(base, plain),
            "first_constrained_ttft_s": ttft(base, constrained),
            "second_constrained_ttft_s": ttft(base, constrained),
        }
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="bench-results/first_request.json")
    ap.add_argument("serve_args", nargs=argparse.REMAINDER, help="after --: flags for a8w8-serve serve")
    args = ap.parse_args()
    serve_args = [a for a in args.serve_args if a != "--"]
    rounds = [one_round(serve_args) for _ in range(args.rounds)]
    medians = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    report = {"serve_args": serve_args, "cpus": os.cpu_count(), "rounds": rounds, "median": medians}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    for k, v in medians.items():
        print(f"{k:26s} {v * 1000:8.0f} ms   (rounds: {', '.join(f'{r[k] * 1000:.0f}' for r in rounds)})")
    print(f"JSON in {args.out}")


if __name__ == "__main__":
    main()
