"""The HTTP process's ceiling: streamed chunks per second and API-process CPU per chunk, the model out of the way.

    python benchmarks/api_bench.py [--streams 32] [--tokens 256] [--rounds 3] [--out bench-results/api_bench.json]

Starts ``a8w8-serve serve --replay-token-ids`` on a tiny random Qwen3 checkpoint: the worker replays a script
instead of computing, so what is measured is the API process (request parsing and the chat template, the engine
thread's scheduling and detokenization, building and serializing each chunk, uvicorn and sse-starlette).
Side by side, in the same run and on the same uvicorn: a bare Starlette + sse-starlette app that streams the
same number of pre-built chunks of the same size, the floor the framework sets. ``--streams`` clients stream
``--tokens`` chunks each, at once; reported per side: chunks/s, and CPU ms of the server process per 1000
chunks (from /proc, user + system), the medians of ``--rounds``; then ours / bare. The clients run on the same
machine, so both sides share the cores with them alike. Prints and writes JSON; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from servers import free_port, wait_healthy  # noqa: E402

from engine.tokenizer import HFTokenizer  # noqa: E402
from loaders.assets import qwen3_tokenizer_dir  # noqa: E402
from loaders.writer import RandomModelSpec, write_random_qwen3  # noqa: E402

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SCRIPT_TEXT = "The quick brown fox jumps over the lazy dog. "  # replayed, token by token, then its last id
MESSAGES = [{"role": "user", "content": "Say something."}]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14 and 15 of stat)


async def stream_all(url: str, body: dict, streams: int) -> tuple[int, float]:
    """``streams`` concurrent POSTs of ``body`` to ``url``; returns (data events received, wall seconds)."""

    async def one(client: httpx.AsyncClient) -> int:
        n = 0
        async with client.stream("POST", url, json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    n += 1
        return n

    limits = httpx.Limits(max_connections=streams, max_keepalive_connections=streams)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(client) for _ in range(streams)))
        return sum(counts), time.perf_counter() - t0


def measure(pid: int, url: str, body: dict, streams: int, rounds: int) -> dict:
    """Medians over ``rounds`` (after one warm-up round) of chunks/s and server CPU ms per 1000 chunks."""
    asyncio.run(stream_all(url, body, streams))
    rates, cpu_per_k = [], []
    for _ in range(rounds):
        cpu0 = cpu_seconds(pid)
        chunks, wall = asyncio.run(stream_all(url, body, streams))
        cpu = cpu_seconds(pid) - cpu0
        rates.append(chunks / wall)
        cpu_per_k.append(1000 * 1000 * cpu / chunks)
    return {
        "chunks_per_round": chunks,
        "chunks_per_s": statistics.median(rates),
        "server_cpu_ms_per_1000_chunks": statistics.median(cpu_per_k),
    }


def bare_app(chunk: str, count: int):
    """Starlette + sse-starlette streaming ``count`` copies of ``chunk``, then [DONE]: no engine, no models."""
    from sse_starlette.sse import EventSourceResponse
    from starlette.applications import Starlette
    from starlette.routing import Route

    async def completions(request):
        await request.body()

        async def events():
            for _ in range(count):
                yield chunk
            yield "[DONE]"

        return EventSourceResponse(events(), ping=15)

    async def health(request):
        from starlette.responses import JSONResponse

        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route("/v1/chat/completions", completions, methods=["POST"]), Route("/health", health)])


def run_bare(port: int, chunk_file: str, count: int) -> None:
    """The bare server's process (this script run with --bare-server)."""
    import uvicorn

    uvicorn.run(bare_app(Path(chunk_file).read_text(), count), host="127.0.0.1", port=port, log_level="warning")


def start(cmd: list[str], base: str) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_healthy(base, timeout=300, proc=proc)
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=256, help="chunks per stream")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench-results/api_bench.json"))
    ap.add_argument("--bare-server", nargs=3, metavar=("PORT", "CHUNK_FILE", "COUNT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.bare_server:
        port, chunk_file, count = args.bare_server
        run_bare(int(port), chunk_file, int(count))
        return

    work = Path(tempfile.mkdtemp(prefix="a8w8-api-bench-"))
    model = write_random_qwen3(work / "model", RandomModelSpec(), tokenizer_dir=qwen3_tokenizer_dir())
    script = work / "tokens.json"
    script.write_text(json.dumps(HFTokenizer(qwen3_tokenizer_dir()).encode(SCRIPT_TEXT)))
    body = {"model": "bench", "messages": MESSAGES, "max_tokens": args.tokens, "ignore_eos": True, "stream": True}
    body["chat_template_kwargs"] = {"enable_thinking": False}  # no reasoning split: every token is content

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    ours_cmd = [sys.executable, "-m", "a8w8_serve", "serve", "--model", str(model), "--port", str(port)]
    ours_cmd += ["--served-model-name", "bench", "--replay-token-ids", str(script), "--max-num-seqs", "256"]
    proc = start(ours_cmd, base)
    try:
        with httpx.stream("POST", f"{base}/v1/chat/completions", json={**body, "max_tokens": 4}, timeout=60) as r:
            # a content chunk as ours sends it: the bare server streams copies of it
            chunk = [line[6:] for line in r.iter_lines() if line.startswith("data: ")][1]
        ours = measure(proc.pid, f"{base}/v1/chat/completions", body, args.streams, args.rounds)
    finally:
        stop(proc)

    chunk_file = work / "chunk.json"
    chunk_file.write_text(chunk)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    count = args.tokens + 1  # ours sends the role chunk first, then one per token
    proc = start([sys.executable, __file__, "--bare-server", str(port), str(chunk_file), str(count)], base)
    try:
        bare = measure(proc.pid, f"{base}/v1/chat/completions", body, args.streams, args.rounds)
    finally:
        stop(proc)

    result = {
        "streams": args.streams,
        "tokens_per_stream": args.tokens,
        "chunk_bytes": len(chunk),
        "cpus": os.cpu_count(),
        "ours": ours,
        "bare_starlette": bare,
        "throughput_ratio": ours["chunks_per_s"] / bare["chunks_per_s"],
        "cpu_per_chunk_ratio": ours["server_cpu_ms_per_1000_chunks"] / bare["server_cpu_ms_per_1000_chunks"],
    }
    print(
        f"{args.streams} streams x {args.tokens} chunks ({len(chunk)} bytes each), {os.cpu_count()} CPUs, medians of "
        f"{args.rounds} rounds"
    )
    for name in ("ours", "bare_starlette"):
        r = result[name]
        print(
            f"  {name:15s} {r['chunks_per_s']:8.0f} chunks/s  {r['server_cpu_ms_per_1000_chunks']:6.1f} ms server CPU per "
            "1000 chunks"
        )
    print(
        f"  ours / bare: {result['throughput_ratio']:.2f}x the throughput, {result['cpu_per_chunk_ratio']:.2f}x the "
        "CPU per chunk"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
