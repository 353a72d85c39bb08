"""Huge pages vs ordinary pages for the two big streams of a decode step, side by side in one process:
the A8W8 GEMV over packed weights (48 [3072 x 1024] matrices, 144 MiB, so they come from DRAM) and decode
attention over a 28-layer INT8 KV cache. The same kernels run on the same data copied into buffers from
``npu.host_memory`` and into ordinary ``torch.empty`` buffers, alternating, median of the rounds.

    python benchmarks/host_memory_bench.py [--out bench-results/host_memory.json]

A benchmark, not a test: it prints numbers and writes JSON; nothing is asserted.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from attention_bench import HQ, LAYERS, D, random_cache

from loaders.quantization import quantize_linear
from npu.backends.cpu import CpuBackend
from npu.backends.cpu.vnni import VnniLinear, Workspace, load_vnni_library
from npu.host_memory import HugePageArena

N, K, MATRICES = 3072, 1024, 48
ROUNDS = 8


def _alternate(runs: dict[str, callable]) -> dict[str, float]:
    """Median seconds of each run, the order alternating every round."""
    times = {name: [] for name in runs}
    names = list(runs)
    for rnd in range(ROUNDS):
        for name in names if rnd % 2 == 0 else names[::-1]:
            t = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(v) for name, v in times.items()}


def gemv(lib, m: int) -> dict[str, float]:
    g = torch.Generator().manual_seed(0)
    ws, arena = Workspace(), HugePageArena()
    weights = [quantize_linear(torch.randn(N, K, generator=g) * K**-0.5) for _ in range(MATRICES)]
    ops = {
        "ordinary pages": [VnniLinear(w, lib, ws) for w in weights],
        "huge pages": [VnniLinear(w, lib, ws, arena) for w in weights],
    }
    x = torch.randn(m, K, generator=g)

    def run(linears):
        def go():
            for op in linears:
                op(x)

        return go

    for linears in ops.values():
        run(linears)()  # warm
    return {name: sec / MATRICES for name, sec in _alternate({n: run(o) for n, o in ops.items()}).items()}


def attention(backend: CpuBackend, batch: int, context: int) -> dict[str, float]:
    """ms per step (all layers) of decode attention over the same random cache, in the KV cache's own
    huge-page tensors and in ordinary copies of them."""
    g = torch.Generator().manual_seed(1)
    cache, group = random_cache(batch, context, g)
    ordinary = copy.copy(cache)
    ordinary.tensors = {name: t.clone() for name, t in cache.tensors.items()}  # torch's allocator: 4 KiB pages
    q = torch.randn(batch, HQ, D, generator=g)
    caches = {"ordinary pages": ordinary, "huge pages": cache}
    outs = {}

    def run(name):
        def go():
            for layer in range(LAYERS):
                outs[name] = backend.decode_attention(q, caches[name], layer, group.slots, group.lengths, D**-0.5)

        return go

    result = _alternate({name: run(name) for name in caches})
    assert torch.equal(outs["ordinary pages"], outs["huge pages"])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench-results/host_memory.json")
    args = ap.parse_args()
    lib, why = load_vnni_library()
    if lib is None:
        raise SystemExit(f"the VNNI kernels are not available here: {why}")
    backend = CpuBackend()
    report = {"torch": torch.__version__, "threads": torch.get_num_threads(), "gemv": {}, "attention": {}}
    print(
        f"ordinary vs huge pages, {torch.get_num_threads()} threads, torch {torch.__version__}; medians of {ROUNDS} "
        f"alternating rounds"
    )
    for m in (1, 16):
        r = gemv(lib, m)
        report["gemv"][str(m)] = r
        a, b = r["ordinary pages"], r["huge pages"]
        print(
            f"A8W8 GEMV M={m:2d}, [{N} x {K}] x {MATRICES}: ordinary {a * 1e6:6.1f} us ({N * K / a / 1e9:5.1f} GB/s), "
            f"huge {b * 1e6:6.1f} us ({N * K / b / 1e9:5.1f} GB/s) -> huge / ordinary time {b / a:.3f}",
            flush=True,
        )
    for batch, context in ((1, 300), (16, 300), (4, 2000)):
        r = attention(backend, batch, context)
        report["attention"][f"{batch}x{context}"] = r
        a, b = r["ordinary pages"], r["huge pages"]
        print(
            f"decode attention batch {batch:2d} context {context:4d}, {LAYERS} layers: ordinary {a * 1e3:6.2f} ms, "
            f"huge {b * 1e3:6.2f} ms -> huge / ordinary time {b / a:.3f}",
            flush=True,
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
