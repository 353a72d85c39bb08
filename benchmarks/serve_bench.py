"""Serving benchmark: start servers (ours; vLLM when its venv is given; llama.cpp's llama-server when its binary
and a GGUF are given), drive each with the same
open-loop client, report TTFT / TPOT / ITL / E2E (mean, p50, p90, p99), output tokens/s and requests/s,
side by side and as ratios; write JSON and (with matplotlib) a PNG.

    python benchmarks/serve_bench.py --model DIR [--vllm-venv PATH] [--llama-server BIN --llama-model GGUF]
        [--concurrency 1 16]
        [--input-len 256 --output-len 128 --num-prompts 32] [--rate R] [--rounds 3]

The servers run interleaved: every round measures every level on every server back to back, so the
ratio of one round compares runs minutes apart (this class of VM drifts by tens of percent over an
hour); the report gives the median over rounds, and each round's ratio.

Prompts are random token ids (fixed seed, same for every server), sent to /v1/completions with
``ignore_eos`` so every request generates exactly ``--output-len`` tokens; a fresh ``--seed`` per run
keeps prefix caches from flattering TTFT. Everything runs on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from servers import free_port, wait_healthy  # noqa: E402
from worker_bench import measure_bandwidth  # noqa: E402

STARTUP_TIMEOUT = 900.0


@dataclass
class RequestRecord:
    start: float
    first: float | None = None
    chunks: list[float] = field(default_factory=list)
    end: float | None = None
    output_tokens: int = 0
    error: str | None = None


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    v = sorted(values)

    def pct(p: float) -> float:
        return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]

    return {"mean": statistics.fmean(v), "p50": pct(50), "p90": pct(90), "p99": pct(99)}


async def one_request(
    http: httpx.AsyncClient, base: str, model: str, prompt: list[int], out_len: int, sampling: dict | None = None
) -> RequestRecord:
    rec = RequestRecord(start=time.perf_counter())
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": out_len,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **(sampling or {}),
    }
    try:
        async with http.stream("POST", f"{base}/v1/completions", json=body) as r:
            if r.status_code != 200:
                rec.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                now = time.perf_counter()
                if ev.get("choices") and ev["choices"][0].get("text"):
                    rec.first = rec.first or now
                    rec.chunks.append(now)
                if ev.get("usage"):
                    rec.output_tokens = ev["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        rec.error = repr(e)
    rec.end = time.perf_counter()
    return rec


async def run_load(
    base: str,
    model: str,
    prompts: list[list[int]],
    out_len: int,
    concurrency: int,
    rate: float | None,
    seed: int,
    sampling: dict | None = None,
) -> tuple[list[RequestRecord], float]:
    """Fixed concurrency (rate None) or Poisson arrivals at ``rate`` req/s capped at ``concurrency``."""
    rng = random.Random(seed)
    sem = asyncio.Semaphore(concurrency)
    # A connection per request, for every server alike: llama-server closes idle keep-alive connections on its own
    # schedule, and a request on one it has just closed fails.
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as http:

        async def guarded(p):
            async with sem:
                return await one_request(http, base, model, p, out_len, sampling)

        t0 = time.perf_counter()
        tasks = []
        for p in prompts:
            tasks.append(asyncio.create_task(guarded(p)))
            if rate:
                await asyncio.sleep(rng.expovariate(rate))
        records = await asyncio.gather(*tasks)
        return records, time.perf_counter() - t0


def summarize(records: list[RequestRecord], wall: float) -> dict:
    ok = [r for r in records if r.error is None and r.first is not None]
    ttft = [r.first - r.start for r in ok]
    e2e = [r.end - r.start for r in ok]
    tpot = [(r.end - r.first) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [b - a for r in ok for a, b in zip(r.chunks, r.chunks[1:])]
    out_tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": len(records),
        "failed": len(records) - len(ok),
        "errors": sorted({r.error for r in records if r.error})[:3],
        "ttft_s": percentiles(ttft),
        "tpot_s": percentiles(tpot),
        "itl_s": percentiles(itl),
        "e2e_s": percentiles(e2e),
        "output_tokens_per_s": out_tokens / wall,
        "requests_per_s": len(ok) / wall,
        "wall_s": wall,
    }


def engine_overhead(base: str) -> dict[str, float]:
    """From our /metrics: share of engine-step time not spent computing in the worker (scheduler + IPC)."""
    vals: dict[str, float] = {}
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        for name in ("a8w8:engine_step_seconds_total", "a8w8:worker_compute_seconds_total", "a8w8:engine_steps_total"):
            if line.startswith(name + "{"):
                vals[name] = float(line.rsplit(" ", 1)[1])
    return vals


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process (Linux /proc), 0 where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def llama_cpp_slots(kind: str) -> int:
    """The number of slots a 'llama.cpp -np N' kind runs with."""
    return int(kind.rsplit(" ", 1)[1])


def start_server(kind: str, extra: str, model: str, port: int, args: argparse.Namespace) -> subprocess.Popen:
    log = open(Path(args.out).with_suffix(f".{kind.split()[0].replace('.', '')}{kind.rsplit(' ', 1)[-1]}.log"), "w")
    if kind.startswith("llama.cpp"):
        # llama-server as the issue that asked for the comparison runs it: its prompt cache off (it would
        # flatter TTFT), one slot for c=1; for more, a slot per client with a KV cache per slot.
        slots = llama_cpp_slots(kind)
        cmd = [
            args.llama_server,
            "-m",
            args.llama_model,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "-a",
            "bench",
            "-t",
            str(os.cpu_count()),
            "-np",
            str(slots),
            "-c",
            str(slots * args.max_model_len),
            "--no-cache-prompt",
            "--cache-ram",
            "0",
            *(["--no-kv-unified"] if slots > 1 else []),
            *args.llama_args.split(),
        ]
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    if kind.startswith("ours"):
        cmd = [
            sys.executable,
            "-m",
            "a8w8_serve",
            "serve",
            "--model",
            model,
            "--port",
            str(port),
            "--served-model-name",
            "bench",
            "--max-model-len",
            str(args.max_model_len),
            *extra.split(),
        ]
        env = os.environ
    else:
        venv = Path(args.vllm_venv)
        cmd = [
            str(venv / "bin" / "python"),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            model,
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
            "--served-model-name",
            "bench",
            "--max-model-len",
            str(args.max_model_len),
            "--seed",
            str(args.seed),
            *args.vllm_args.split(),
        ]
        env = {
            **os.environ,
            "VLLM_TARGET_DEVICE": "cpu",
            "VLLM_CPU_KVCACHE_SPACE": "4",
            "VLLM_CPU_OMP_THREADS_BIND": f"0-{os.cpu_count() - 1}",
        }
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def plot(report: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG (pip install matplotlib)")
        return
    servers = list(report["servers"])
    levels = sorted({lvl for s in servers for lvl in report["servers"][s]}, key=int)
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, (metric, label) in zip(
        axes, [("tpot_s", "TPOT mean (ms)"), ("ttft_s", "TTFT mean (ms)"), ("output_tokens_per_s", "output tokens/s")]
    ):
        width = 0.8 / len(servers)
        for i, s in enumerate(servers):
            ys = []
            for lvl in levels:
                r = report["servers"][s].get(lvl, {})
                v = r.get(metric)
                ys.append((v["mean"] * 1000 if isinstance(v, dict) and v else v) or 0)
            ax.bar([j + i * width for j in range(len(levels))], ys, width, label=s)
        ax.set_xticks([j + width * (len(servers) - 1) / 2 for j in range(len(levels))], [f"c={lvl}" for lvl in levels])
        ax.set_title(label)
        ax.legend()
    fig.suptitle(
        f"{report['model_name']}: in {report['input_len']}, out {report['output_len']}, "
        f"medians of {report.get('rounds', 1)} interleaved rounds"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of a process and all its descendants (Linux /proc; children via /proc/PID/task/*/children)."""
    total, stack, seen = 0.0, [pid], set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        total += process_cpu_seconds(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                stack.extend(int(c) for c in (task / "children").read_text().split())
            except OSError:
                pass
    return total


def measure_level(
    kind: str, proc: subprocess.Popen, base: str, prompts: list[list[int]], c: int, args: argparse.Namespace
) -> dict:
    """One load level against one server: the client-side summary, plus our engine's own accounting."""
    ours = kind.startswith("ours")
    before = engine_overhead(base) if ours else {}
    api_cpu_before = process_cpu_seconds(proc.pid)
    records, wall = asyncio.run(
        run_load(base, "bench", prompts, args.output_len, c, args.rate, args.seed, args.sampling)
    )
    summary = summarize(records, wall)
    if ours:
        after = engine_overhead(base)
        d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        steps = d.get("a8w8:engine_steps_total", 0)
        if steps:
            step = d["a8w8:engine_step_seconds_total"] / steps
            compute = d["a8w8:worker_compute_seconds_total"] / steps
            summary["engine_step_ms"] = step * 1000
            summary["worker_compute_ms"] = compute * 1000
            summary["scheduler_ipc_overhead_share"] = (step - compute) / step
            # Everything the API process did (HTTP, SSE, detokenizing, scheduling, IPC) in CPU seconds per
            # second of engine steps: the overhead if none of it overlapped compute.
            api_cpu = process_cpu_seconds(proc.pid) - api_cpu_before
            summary["api_process_cpu_s"] = api_cpu
            summary["api_cpu_per_step_time_share"] = api_cpu / d["a8w8:engine_step_seconds_total"]
    return summary


# per-level figures whose median over rounds the report and the plot use
HEADLINE = ("tpot_s", "ttft_s", "itl_s", "e2e_s")
HEADLINE_SCALARS = (
    "output_tokens_per_s",
    "requests_per_s",
    "scheduler_ipc_overhead_share",
    "api_cpu_per_step_time_share",
    "tpot_over_floor",
)


def median_of_rounds(rounds: list[dict]) -> dict:
    """Median over rounds of each headline figure (the mean of each latency, throughputs, overhead shares)."""
    out: dict = {"rounds": rounds}
    for key in HEADLINE:
        vals = [r[key]["mean"] for r in rounds if r.get(key)]
        out[key] = {"mean": statistics.median(vals)} if vals else {}
    for key in HEADLINE_SCALARS:
        vals = [r[key] for r in rounds if key in r]
        if vals:
            out[key] = statistics.median(vals)
    out["failed"] = sum(r["failed"] for r in rounds)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model", required=True, help="checkpoint directory both servers load (e.g. compressed-tensors W8A8)"
    )
    ap.add_argument("--vllm-venv", default=None, help="virtual environment with vllm-cpu installed")
    ap.add_argument(
        "--ours-args",
        action="append",
        default=None,
        help="extra flags for a8w8-serve serve; repeat to benchmark several configurations side by side",
    )
    ap.add_argument("--vllm-args", default="", help="extra flags for vLLM's server")
    ap.add_argument("--llama-server", default=None, help="llama.cpp's llama-server binary (built once, see the README)")
    ap.add_argument("--llama-model", default=None, help="the GGUF llama-server serves (e.g. Q8_0 of the same weights)")
    ap.add_argument("--llama-args", default="", help="extra flags for llama-server")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--rate", type=float, default=None, help="Poisson arrivals (req/s) instead of closed-loop")
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument(
        "--sampling",
        type=json.loads,
        default={},
        metavar="JSON",
        help='sampling fields of every request, e.g. \'{"temperature": 1, "top_k": -1}\' (default: greedy)',
    )
    ap.add_argument("--num-prompts", type=int, default=None, help="per level (default: 2 x concurrency, at least 4)")
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="interleaved rounds: each round runs every level on every server back to back (rotating "
        "the server order), so a ratio compares runs minutes apart; medians over rounds are reported",
    )
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument(
        "--floor",
        action="store_true",
        help="also measure the read bandwidth right before each of our c=1 runs and report TPOT over the "
        "batch-1 floor (bytes of weights read per decode step / that bandwidth)",
    )
    ap.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    ap.add_argument("--out", default="bench-results/serve.json")
    args = ap.parse_args()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    # ids from the ordinary BPE range of a byte-level vocabulary (avoid special tokens at the top)
    id_range = (1000, min(vocab, 150000) - 1)
    ours_configs = args.ours_args or [""]
    weight_bytes = 0
    if args.floor:
        from loaders.weights import load_model_weights

        weight_bytes = load_model_weights(args.model, "auto").linear_bytes()  # what one decode step reads
    kinds = [(f"ours {extra}".strip(), extra) for extra in ours_configs] + ([("vllm", "")] if args.vllm_venv else [])
    if args.llama_server:
        # one llama-server per concurrency level: its slot count is fixed at start (1 slot at c=1, c slots above)
        kinds += [(f"llama.cpp -np {c}", "") for c in args.concurrency]
    report = {
        "model": args.model,
        "model_name": Path(args.model).name,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "sampling": args.sampling,
        "seed": args.seed,
        "rate": args.rate,
        "rounds": args.rounds,
        "servers": {},
        "date": time.strftime("%Y-%m-%d"),
        "cpu_count": os.cpu_count(),
    }
    # All servers stay up for the whole run (idle ones wait on sockets; their CPU use while another server
    # is measured is recorded as idle_servers_cpu_s) so that rounds can interleave them.
    procs: dict[str, tuple[subprocess.Popen, str]] = {}
    rounds: dict[str, dict[str, list[dict]]] = {kind: {str(c): [] for c in args.concurrency} for kind, _ in kinds}
    try:
        for kind, extra in kinds:
            port = free_port()
            procs[kind] = (start_server(kind, extra, args.model, port, args), f"http://127.0.0.1:{port}")
        for proc, base in procs.values():
            wait_healthy(base, STARTUP_TIMEOUT, proc)
            # warm-up request (first-use costs do not belong in the numbers)
            asyncio.run(run_load(base, "bench", [[rng.randint(*id_range) for _ in range(16)]], 4, 1, None, 0))
        for rnd in range(args.rounds):
            order = [kind for kind, _ in kinds]
            order = order[rnd % len(order) :] + order[: rnd % len(order)]
            for c in args.concurrency:
                n = args.num_prompts or max(4, 2 * c)
                # fresh prompts per round and level (no prefix-cache hits), the same for every server
                prompts = [[rng.randint(*id_range) for _ in range(args.input_len)] for _ in range(n)]
                for kind in order:
                    if kind.startswith("llama.cpp") and llama_cpp_slots(kind) != c:
                        continue  # that llama-server is for another level
                    proc, base = procs[kind]
                    others_before = sum(tree_cpu_seconds(p.pid) for k, (p, _) in procs.items() if k != kind)
                    bandwidth = (
                        measure_bandwidth(copy=False)["read_GBps"]
                        if args.floor and c == 1 and kind.startswith("ours")
                        else None
                    )
                    summary = measure_level(kind, proc, base, prompts, c, args)
                    if bandwidth:
                        floor = weight_bytes / (bandwidth * 1e9)
                        summary.update(
                            read_GBps=bandwidth,
                            floor_ms=floor * 1000,
                            tpot_over_floor=summary["tpot_s"]["mean"] / floor,
                        )
                        print(
                            f"  read bandwidth {bandwidth:.1f} GB/s -> floor {floor * 1000:.2f} ms for "
                            f"{weight_bytes / 1e6:.0f} MB; TPOT / floor = {summary['tpot_over_floor']:.2f}",
                            flush=True,
                        )
                    summary["idle_servers_cpu_s"] = (
                        sum(tree_cpu_seconds(p.pid) for k, (p, _) in procs.items() if k != kind) - others_before
                    )
                    rounds[kind][str(c)].append(summary)
                    t, e = summary["tpot_s"], summary["ttft_s"]
                    print(
                        f"round {rnd + 1} {kind:28s} c={c:3d}: TPOT {t.get('mean', 0) * 1000:7.1f} ms  "
                        f"TTFT {e.get('mean', 0) * 1000:8.1f} ms  {summary['output_tokens_per_s']:7.1f} out tok/s  "
                        f"{summary['requests_per_s']:.2f} req/s  (idle servers used {summary['idle_servers_cpu_s']:.1f} CPU s)"
                        + (f"  failed {summary['failed']}" if summary["failed"] else "")
                        + (
                            f"  [engine: scheduler+IPC {100 * summary['scheduler_ipc_overhead_share']:.1f} % of step; "
                            f"API process CPU {100 * summary['api_cpu_per_step_time_share']:.1f} % of step time]"
                            if "api_cpu_per_step_time_share" in summary
                            else ""
                        ),
                        flush=True,
                    )
    finally:
        for proc, _ in procs.values():
            proc.terminate()
        for proc, _ in procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(f"medians over {args.rounds} rounds:")
    for kind, _ in kinds:
        report["servers"][kind] = {}
        for c in map(str, args.concurrency):
            if not rounds[kind][c]:
                continue  # a llama-server of another level
            m = report["servers"][kind][c] = median_of_rounds(rounds[kind][c])
            overhead = (
                f"  [engine: scheduler+IPC {100 * m['scheduler_ipc_overhead_share']:.1f} % of step; "
                f"API process CPU {100 * m['api_cpu_per_step_time_share']:.1f} % of step time]"
                if "api_cpu_per_step_time_share" in m
                else ""
            )
            print(
                f"{kind:30s} c={int(c):3d}: TPOT {m['tpot_s'].get('mean', 0) * 1000:7.1f} ms  "
                f"TTFT {m['ttft_s'].get('mean', 0) * 1000:8.1f} ms  {m['output_tokens_per_s']:7.1f} out tok/s"
                + (f"  TPOT/floor {m['tpot_over_floor']:.2f}" if "tpot_over_floor" in m else "")
                + (f"  failed {m['failed']}" if m["failed"] else "")
                + overhead
            )
    # Each of our configurations against each peer, round by round (paired in time), then the median.
    ratios: dict[str, dict] = {}
    peers = [kind for kind, _ in kinds if not kind.startswith("ours")]
    for ours in (kind for kind, _ in kinds if kind.startswith("ours")):
        for peer in peers:
            label = peer.split()[0]  # "vllm", "llama.cpp" (its -np N server for that level)
            for c in map(str, args.concurrency):
                per_round = [
                    {
                        "tpot_ours_over_peer": o["tpot_s"]["mean"] / v["tpot_s"]["mean"],
                        "throughput_ours_over_peer": o["output_tokens_per_s"] / v["output_tokens_per_s"],
                    }
                    for o, v in zip(rounds[ours][c], rounds[peer][c])
                    if o["tpot_s"] and v["tpot_s"]
                ]
                if not per_round:
                    continue
                tp = [r["tpot_ours_over_peer"] for r in per_round]
                th = [r["throughput_ours_over_peer"] for r in per_round]
                ratios.setdefault(ours, {}).setdefault(label, {})[c] = {
                    "per_round": per_round,
                    "tpot_ours_over_peer": statistics.median(tp),
                    "throughput_ours_over_peer": statistics.median(th),
                }
                print(
                    f"{ours} vs {peer}, c={c}: TPOT ratio {statistics.median(tp):.2f} (rounds "
                    f"{', '.join(f'{x:.2f}' for x in tp)}), output tok/s ratio {statistics.median(th):.2f} "
                    f"(rounds {', '.join(f'{x:.2f}' for x in th)})"
                )
    report["ratios"] = ratios
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"JSON: {args.out}")
    plot(report, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
