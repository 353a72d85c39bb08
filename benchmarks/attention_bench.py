"""Decode attention over the paged INT8 KV cache: our C kernel vs. the path every other backend takes
(gather + dequantize the context, one padded SDPA call), side by side, at several batch sizes and context
lengths. K/V of all 28 layers of a Qwen3-0.6B-shaped model are cycled so that they come from DRAM, as
in a real decode step; the GB/s column is the INT8 K/V (and scales) read per call over its time.

    python benchmarks/attention_bench.py [--batch 1 4 16] [--context 300 2000] [--out bench-results/attention.json]

A benchmark, not a test: it prints numbers and writes JSON; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from npu.backends.base import TorchOps
from npu.backends.cpu import CpuBackend
from npu.kv_cache import PagedKVCache
from npu.model import DecodeGroup

# Qwen3-0.6B attention shape (FACTS.md section 2)
LAYERS, HQ, HKV, D, BLOCK = 28, 16, 8, 128, 16
ROUNDS = 7


def random_cache(batch: int, context: int, g: torch.Generator) -> tuple[PagedKVCache, DecodeGroup]:
    """A random INT8 cache of ``LAYERS`` layers holding ``batch`` sequences of ``context`` tokens each, whose
    blocks are scattered over the pool as after a while of serving, and the decode group reading it."""
    blocks_per_seq = -(-context // BLOCK)
    cache = PagedKVCache("int8", LAYERS, HKV, D, batch * blocks_per_seq, BLOCK)
    t = cache.tensors
    t["k"].random_(-127, 128, generator=g)
    t["v"].random_(-127, 128, generator=g)
    t["k_scale"].uniform_(1e-3, 1e-2, generator=g)
    t["v_scale"].uniform_(1e-3, 1e-2, generator=g)
    perm = torch.randperm(batch * blocks_per_seq, generator=g).view(batch, blocks_per_seq)
    slots = (perm[:, :, None] * BLOCK + torch.arange(BLOCK)).reshape(batch, -1)[:, :context].contiguous()
    group = DecodeGroup(
        rows=torch.arange(batch),
        slots=slots,
        lengths=torch.full((batch,), context, dtype=torch.int32),
        covers_all_rows=True,
    )
    return cache, group


def measure(batch: int, context: int, backend: CpuBackend) -> dict:
    """Both paths on the same random cache (``batch`` sequences of ``context`` tokens), median ms and GB/s."""
    g = torch.Generator().manual_seed(0)
    cache, group = random_cache(batch, context, g)
    q = torch.randn(batch, HQ, D, generator=g)
    reference = TorchOps()  # the eager path every backend falls back to: gather, dequantize, one SDPA call
    paths = {
        "ours": lambda layer: backend.decode_attention(q, cache, layer, group.slots, group.lengths, D**-0.5),
        "sdpa": lambda layer: reference.decode_attention(q, cache, layer, group.slots, group.lengths, D**-0.5),
    }
    max_diff = (paths["ours"](3).view(batch, -1) - paths["sdpa"](3)).abs().max().item()
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(ROUNDS):  # interleaved, so both paths see the same machine state
        for name, fn in paths.items():
            start = time.perf_counter()
            for layer in range(LAYERS):
                fn(layer)
            times[name].append((time.perf_counter() - start) / LAYERS)
    kv_bytes = batch * context * HKV * (D + 4) * 2
    res = {"batch": batch, "context": context, "max_abs_diff_vs_sdpa": max_diff}
    for name, ts in times.items():
        sec = statistics.median(ts)
        res[name] = {"ms_per_layer": sec * 1000, "ms_per_step": sec * LAYERS * 1000, "GBps": kv_bytes / sec / 1e9}
    res["speedup"] = res["sdpa"]["ms_per_layer"] / res["ours"]["ms_per_layer"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--context", type=int, nargs="+", default=[300, 2000])
    ap.add_argument("--out", default="bench-results/attention.json")
    args = ap.parse_args()
    backend = CpuBackend()
    print(
        f"decode attention, Qwen3-0.6B shape ({LAYERS} layers, {HQ} q / {HKV} kv heads, head_dim {D}), INT8 "
        f"KV, {torch.get_num_threads()} threads, torch {torch.__version__}; median of {ROUNDS} interleaved rounds"
    )
    results = []
    for context in args.context:
        for batch in args.batch:
            r = measure(batch, context, backend)
            results.append(r)
            print(
                f"batch {batch:3d} context {context:5d}: ours {r['ours']['ms_per_step']:7.2f} ms/step "
                f"({r['ours']['GBps']:5.1f} GB/s), SDPA path {r['sdpa']['ms_per_step']:7.2f} ms/step "
                f"({r['sdpa']['GBps']:5.1f} GB/s) -> {r['speedup']:.1f}x; max |diff| {r['max_abs_diff_vs_sdpa']:.1e}"
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "results": results}, indent=2)
    )
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
