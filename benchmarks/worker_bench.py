"""Micro-benchmark of the worker (no server): decode ms/step at batch 1 and 16, prefill tokens/s, and the
achieved weight bandwidth next to this machine's measured memory bandwidth (the batch-1 floor ratio from
pairs of a bandwidth reading and decode steps right after it, median of the pairs); for the prefill, the speed of
its decoder linears (timed inside the real prefill, fused prologue/epilogue included) next to the INT8
GEMM roof measured here (``torch._int_mm`` at M = the prefill length, on the same shapes).

    python benchmarks/worker_bench.py [--shape 0.6b] [--device cpu|cuda] [--out bench-results/worker.json]

With ``--device cuda`` the bandwidth is the GPU's (HBM), the roof is ``torch._int_mm`` on the GPU, decode
also runs at batch 64, and the per-kernel breakdown is left out (GPU kernels run asynchronously: timing each
call would need a synchronization that changes what is timed).

A benchmark, not a test: it prints numbers and writes JSON; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loaders.writer import RandomModelSpec, write_random_qwen3
from npu.config import CPU_KERNELS, WorkerConfig
from npu.kv_cache import HOST
from npu.messages import NewSequence, SamplingOptions, ScheduledChunk, StepRequest
from npu.runner import ModelRunner

SHAPES = {
    # Qwen3-0.6B and 1.7B linear shapes (FACTS.md section 2), random weights
    "0.6b": RandomModelSpec(
        hidden_size=1024,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=3072,
        max_position_embeddings=4096,
    ),
    "1.7b": RandomModelSpec(
        hidden_size=2048,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=6144,
        max_position_embeddings=4096,
    ),
    # The mission's model (Qwen3-14B) and the 8B, untied lm_head as in the real ones (FACTS.md section 2)
    "8b": RandomModelSpec(
        hidden_size=4096,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=12288,
        max_position_embeddings=40960,
        tie_word_embeddings=False,
    ),
    "14b": RandomModelSpec(
        hidden_size=5120,
        num_layers=40,
        num_heads=40,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=17408,
        max_position_embeddings=40960,
        tie_word_embeddings=False,
    ),
    "tiny": RandomModelSpec(
        hidden_size=256,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        intermediate_size=768,
        max_position_embeddings=4096,
    ),
}
BANDWIDTH_BUFFER_BYTES = 512 * 1024**2  # far larger than L3 (and a GPU's L2), so this measures DRAM / HBM
KV_BUDGET_BYTES = 2 * 1024**3
# Chunk of the sequential read that measures the disk (as the loader reads: into memory of its own).
DISK_READ_CHUNK = 256 * 1024**2
# The goal for a load: peak resident memory within the checkpoint + the KV budget + this much.
LOAD_HEADROOM_BYTES = 2 * 1024**3


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _drop_page_cache(paths: list[Path]) -> None:
    """Ask the kernel to forget these files' cached pages (clean pages of files we only read), so that the
    next read comes from the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@dataclass
class LoadReport:
    """Loading a checkpoint into the worker: how long, against a cold sequential read of the same files right
    before (this VM's disk reads fast for a few GB, then throttles, so one figure of "disk speed" would not
    do), and the peak resident memory (VmHWM) against checkpoint + KV budget + headroom."""

    checkpoint_bytes: int
    disk_read_GBps: float
    load_seconds: float
    peak_rss_bytes: int
    rss_before_bytes: int
    runner: Any = field(repr=False, default=None)

    @classmethod
    def measure(cls, model_dir: str, make_runner) -> LoadReport:
        shards = sorted(Path(model_dir).glob("*.safetensors"))
        total = sum(p.stat().st_size for p in shards)
        _drop_page_cache(shards)
        buf = memoryview(bytearray(DISK_READ_CHUNK))
        t = time.perf_counter()
        for path in shards:
            fd = os.open(path, os.O_RDONLY)
            try:
                offset = 0
                while (n := os.preadv(fd, [buf], offset)) > 0:
                    offset += n
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        disk = total / (time.perf_counter() - t) / 1e9
        del buf
        rss_before = _status_kib("VmRSS") * 1024
        t = time.perf_counter()
        runner = make_runner()
        seconds = time.perf_counter() - t
        return cls(total, disk, seconds, _status_kib("VmHWM") * 1024, rss_before, runner)

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in self.__dict__.items() if k != "runner"} | {
            "bound_bytes": self.checkpoint_bytes + KV_BUDGET_BYTES + LOAD_HEADROOM_BYTES
        }

    def describe(self) -> str:
        bound = self.checkpoint_bytes + KV_BUDGET_BYTES + LOAD_HEADROOM_BYTES
        return (
            f"load: {self.checkpoint_bytes / 1e9:.2f} GB checkpoint in {self.load_seconds:.1f} s = "
            f"{self.checkpoint_bytes / self.load_seconds / 1e9:.2f} GB/s (a cold sequential read of the files "
            f"before it: {self.disk_read_GBps:.2f} GB/s); peak resident {self.peak_rss_bytes / 1e9:.2f} GB (before loading {self.rss_before_bytes / 1e9:.2f}) "
            f"vs checkpoint + {KV_BUDGET_BYTES / 1e9:.1f} GB KV + {LOAD_HEADROOM_BYTES / 1e9:.1f} GB = {bound / 1e9:.2f} GB"
        )


BLOCK = 16


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work (GPU kernels run asynchronously; CPU ones have returned)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bandwidth(repeats: int = 9, copy: bool = True, device: torch.device = HOST) -> dict[str, float]:
    """Streaming read (sum) and copy bandwidth of the device's memory (DRAM, or a GPU's HBM), median of
    ``repeats``, in GB/s."""
    n = BANDWIDTH_BUFFER_BYTES // 4
    a = torch.ones(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a) if copy else None
    reads, copies = [], []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        a.sum()
        _sync(device)
        reads.append(BANDWIDTH_BUFFER_BYTES / (time.perf_counter() - t) / 1e9)
        if b is not None:
            t = time.perf_counter()
            b.copy_(a)
            _sync(device)
            copies.append(2 * BANDWIDTH_BUFFER_BYTES / (time.perf_counter() - t) / 1e9)  # read + write
    return {"read_GBps": statistics.median(reads), **({"copy_GBps": statistics.median(copies)} if copies else {})}


# Pairs of (bandwidth reading, batch-1 decode steps) for the floor ratio: this VM's bandwidth drifts by
# 2x over minutes, so each decode measurement is set against a reading taken right before it.
FLOOR_PAIRS = 7
FLOOR_PAIR_STEPS = 8
FLOOR_PAIR_BW_REPEATS = 3


def floor_ratio_pairs(runner: ModelRunner, weight_bytes: int, seq_base: int) -> list[dict[str, float]]:
    """Per pair: the read bandwidth, the batch-1 decode ms/step right after it, and their ratio to the floor."""
    pairs = []
    for i in range(FLOOR_PAIRS):
        bw = measure_bandwidth(FLOOR_PAIR_BW_REPEATS, copy=False, device=runner.backend.device)["read_GBps"]
        ms = decode_ms(runner, 1, 128, FLOOR_PAIR_STEPS, seq_base + i)
        floor_ms = weight_bytes / (bw * 1e9) * 1000
        pairs.append({"read_GBps": bw, "decode_ms": ms, "floor_ms": floor_ms, "ratio": ms / floor_ms})
    return pairs


ROOF_REPEATS = 3


def int8_gemm_roof(runner: ModelRunner, m: int) -> float:
    """GOP/s of ``torch._int_mm`` (oneDNN VNNI; cuBLAS INT8 on a GPU) at M=m on the model's decoder linear shapes,
    the weight column-major as the fast path wants it, best of repeats."""
    device = runner.backend.device
    layer = runner.model.layers[0]
    shapes = [(op.out_features, op.in_features) for op in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    g = torch.Generator().manual_seed(0)
    mats = [
        (
            torch.randint(-127, 128, (m, k), dtype=torch.int8, generator=g).to(device),
            torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g).to(device),
        )
        for n, k in shapes
    ]
    best = float("inf")
    for _ in range(ROOF_REPEATS):
        _sync(device)
        t = time.perf_counter()
        for x, w in mats:
            torch._int_mm(x, w.t())
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return sum(2 * m * n * k for n, k in shapes) / best / 1e9


BREAKDOWN_PARTS = ("decoder linears", "lm_head", "attention", "qk norm + rope", "kv write", "argmax")
LAYER_LINEARS = ("qkv", "o", "gate_up", "down")


class _Clock:
    """Wall time per part, counted only while ``on``."""

    def __init__(self, device: torch.device = HOST):
        self.on, self.seconds = False, {part: 0.0 for part in BREAKDOWN_PARTS}
        self.device = device

    def wrap(self, fn, part: str):
        clock = self

        class Timed:  # keeps a linear op's out_features / in_features visible to the model
            def __getattr__(self, name):
                return getattr(fn, name)

            def __call__(self, *args, **kwargs):
                if clock.on:
                    _sync(clock.device)
                t = time.perf_counter()
                out = fn(*args, **kwargs)
                if clock.on:
                    _sync(clock.device)
                    clock.seconds[part] += time.perf_counter() - t
                return out

        return Timed()


def decode_breakdown(runner: ModelRunner, batch: int, context: int, steps: int, seq_base: int) -> dict[str, float]:
    """ms per decode step (mean of ``steps``) in each kind of kernel call and in total, through the model's
    Python layer loop (where each kernel call can be timed); the remainder is Python, step bookkeeping, and
    sampling other than the argmax. Steps alternate with steps through the backend's one-call layer stack
    (where it has one), whose mean is ``stacked_total``. Timed wrappers are installed for the measurement and
    removed after."""
    clock = _Clock()
    model, backend, sampler = runner.model, runner.backend, runner.sampler
    stack = model.decode_stack
    saved = (
        [{n: getattr(layer, n) for n in LAYER_LINEARS} for layer in model.layers],
        model.lm_head,
        sampler._argmax_rows,
    )
    for layer in model.layers:
        for name in LAYER_LINEARS:
            setattr(layer, name, clock.wrap(getattr(layer, name), "decoder linears"))
    model.lm_head = clock.wrap(model.lm_head, "lm_head")
    sampler._argmax_rows = clock.wrap(sampler._argmax_rows, "argmax")
    # instance attributes shadow the backend's methods for this measurement only
    for attr, part in (("decode_attention", "attention"), ("qk_norm_rope", "qk norm + rope"), ("write_kv", "kv write")):
        setattr(backend, attr, clock.wrap(getattr(backend, attr), part))
    try:
        b = Bench(runner)
        greedy = SamplingOptions(temperature=0)
        seqs = list(range(seq_base, seq_base + batch))
        tables = {sq: b.blocks(context + 2 * steps + 4) for sq in seqs}
        b.step(
            new=[NewSequence(sq, [100 + i for i in range(context)], context, 0, greedy) for sq in seqs],
            chunks=[ScheduledChunk(sq, context, tables[sq], True) for sq in seqs],
        )
        total = stacked = 0.0
        for i in range(2 * steps if stack is not None else steps):
            looped = i % 2 == 0 or stack is None
            model.decode_stack = None if looped else stack
            clock.on = looped
            t = time.perf_counter()
            b.step(chunks=[ScheduledChunk(sq, 1, [], True) for sq in seqs])
            if looped:
                total += time.perf_counter() - t
            else:
                stacked += time.perf_counter() - t
        clock.on = False
        b.step()
        runner.seqs.clear()
    finally:
        model.decode_stack = stack
        for layer, ops in zip(model.layers, saved[0]):
            for name, op in ops.items():
                setattr(layer, name, op)
        model.lm_head, sampler._argmax_rows = saved[1], saved[2]
        for attr in ("decode_attention", "qk_norm_rope", "write_kv"):
            delattr(backend, attr)
    return {
        "total": total / steps * 1000,
        **{part: sec / steps * 1000 for part, sec in clock.seconds.items()},
        **({"stacked_total": stacked / steps * 1000} if stack is not None else {}),
    }


def prefill_linear_gops(runner: ModelRunner, n: int, seq: int) -> float:
    """GOP/s of the decoder linears inside one n-token prefill (timed wrappers, removed after)."""
    clock = _Clock(runner.backend.device)
    originals = [{name: getattr(layer, name) for name in LAYER_LINEARS} for layer in runner.model.layers]
    for layer in runner.model.layers:
        for name in LAYER_LINEARS:
            setattr(layer, name, clock.wrap(getattr(layer, name), "decoder linears"))
    clock.on = True
    try:
        prefill_tokens_per_s(runner, n, seq)
    finally:
        for layer, ops in zip(runner.model.layers, originals):
            for name, op in ops.items():
                setattr(layer, name, op)
    ops_total = sum(2 * n * op.out_features * op.in_features for layer in originals for op in layer.values())
    return ops_total / clock.seconds["decoder linears"] / 1e9


class Bench:
    def __init__(self, runner: ModelRunner):
        self.r, self.step_id, self.next_block = runner, 0, 0

    def step(self, new=(), chunks=()):
        self.step_id += 1
        return self.r.execute(StepRequest(self.step_id, [], list(new), list(chunks)))

    def blocks(self, n_tokens: int) -> list[int]:
        n = -(-n_tokens // BLOCK)
        ids = list(range(self.next_block, self.next_block + n))
        self.next_block += n
        return ids


def decode_ms(runner: ModelRunner, batch: int, prompt_len: int, steps: int, seq_base: int) -> float:
    b = Bench(runner)
    b.next_block = 0
    greedy = SamplingOptions(temperature=0)
    seqs = list(range(seq_base, seq_base + batch))
    max_len = prompt_len + steps + 4
    tables = {s: b.blocks(max_len) for s in seqs}
    b.step(
        new=[NewSequence(s, [100 + i for i in range(prompt_len)], prompt_len, 0, greedy) for s in seqs],
        chunks=[ScheduledChunk(s, prompt_len, tables[s], True) for s in seqs],
    )
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        b.step(chunks=[ScheduledChunk(s, 1, [], True) for s in seqs])
        times.append(time.perf_counter() - t)
    b.step()  # nothing
    runner.seqs.clear()
    return statistics.median(times) * 1000


def prefill_tokens_per_s(runner: ModelRunner, n: int, seq: int) -> float:
    b = Bench(runner)
    greedy = SamplingOptions(temperature=0)
    t = time.perf_counter()
    b.step(
        new=[NewSequence(seq, [100 + i % 5000 for i in range(n)], n, 0, greedy)],
        chunks=[ScheduledChunk(seq, n, b.blocks(n), True)],
    )
    dt = time.perf_counter() - t
    runner.seqs.clear()
    return n / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="0.6b")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--kv-cache-dtype", default="int8")
    ap.add_argument("--quantize-lm-head", action="store_true", help="run the lm_head in A8W8 too")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--prefill-tokens", type=int, default=2048)
    ap.add_argument(
        "--breakdown-context",
        type=int,
        default=300,
        help="context length of the per-kernel breakdown of decode steps (prompt 256 + output)",
    )
    ap.add_argument(
        "--model",
        default=None,
        help="an existing checkpoint to load instead of writing a random one of --shape (for 8b / 14b: "
        "benchmarks/make_bench_models.py writes them); the load is reported: time, cold disk read "
        "speed, peak resident memory",
    )
    ap.add_argument(
        "--num-threads",
        type=int,
        default=None,
        help="compute threads of the worker (CPU), as serve's --num-threads; default all cores",
    )
    ap.add_argument(
        "--cpu-kernels",
        choices=CPU_KERNELS,
        default="auto",
        help="CPU kernel family, as serve's --cpu-kernels (hold ATen to the same instruction set with "
        "ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA for a fair reading)",
    )
    ap.add_argument("--out", default="bench-results/worker.json")
    args = ap.parse_args()
    if args.num_threads:
        torch.set_num_threads(args.num_threads)  # before the bandwidth reading, so it uses the same threads

    device = torch.device(args.device)
    bw = measure_bandwidth(device=device)
    with tempfile.TemporaryDirectory() as d:
        model_dir = args.model or d
        if args.model is None:
            write_random_qwen3(d, SHAPES[args.shape])
        load = LoadReport.measure(
            model_dir,
            lambda: ModelRunner(
                WorkerConfig(
                    model_dir=model_dir,
                    kv_cache_dtype=args.kv_cache_dtype,
                    quantize_lm_head=args.quantize_lm_head,
                    kv_cache_memory_bytes=KV_BUDGET_BYTES,
                    max_model_len=4096,
                    device=args.device,
                    num_threads=args.num_threads,
                    cpu_kernels=args.cpu_kernels,
                )
            ),
        )
        runner = load.runner
        runner.warmup()
        weight_bytes = runner.weight_bytes
        decode_ms(runner, 1, 32, 4, 0)  # warm up the kernels at these shapes
        results = {}
        batches = (1, 16, 64) if device.type == "cuda" else (1, 16)
        for batch in batches:
            ms = decode_ms(runner, batch, 128, args.steps, 1000 * batch)
            results[f"decode_batch{batch}_ms_per_step"] = ms
            results[f"decode_batch{batch}_tokens_per_s"] = batch * 1000 / ms
            results[f"decode_batch{batch}_weight_GBps"] = weight_bytes / (ms / 1000) / 1e9
        results["prefill_tokens_per_s"] = prefill_tokens_per_s(runner, args.prefill_tokens, 99999)
        results["prefill_linear_GOPs"] = prefill_linear_gops(runner, args.prefill_tokens, 99998)
        results["int8_gemm_roof_GOPs"] = int8_gemm_roof(runner, args.prefill_tokens)
        results["decode_breakdown_ms"] = (
            {}
            if device.type == "cuda"
            else {
                str(batch): decode_breakdown(runner, batch, args.breakdown_context, args.steps, 2000 + 100 * batch)
                for batch in (1, 16)
            }
        )
        results["prefill_linear_share_of_roof"] = results["prefill_linear_GOPs"] / results["int8_gemm_roof_GOPs"]
        results["floor_pairs"] = floor_ratio_pairs(runner, weight_bytes, 5000)
        runner_device, runner_backend = runner.backend.device_name, runner.backend.name
    floor_ms = weight_bytes / (bw["read_GBps"] * 1e9) * 1000
    report = {
        "shape": args.shape,
        "model": args.model,
        "load": load.as_dict(),
        "kv_cache_dtype": args.kv_cache_dtype,
        "quantize_lm_head": args.quantize_lm_head,
        "torch": torch.__version__,
        "device": runner_device,
        "backend": runner_backend,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "weight_bytes_per_step": weight_bytes,
        **bw,
        "decode_floor_ms": floor_ms,
        **results,
        "decode_batch1_ratio_to_floor": statistics.median(p["ratio"] for p in results["floor_pairs"]),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(
        f"machine bandwidth: read {bw['read_GBps']:.1f} GB/s, copy {bw['copy_GBps']:.1f} GB/s at the start "
        f"({torch.get_num_threads()} threads, torch {torch.__version__})"
    )
    print(load.describe())
    print(
        f"{args.shape}: {weight_bytes / 1e6:.0f} MB of linear weights (incl. lm_head) read per decode step; "
        f"floor at read bandwidth {floor_ms:.1f} ms/step"
    )
    print(f"device {runner_device}, kernels {runner_backend}")
    for batch in batches:
        print(
            f"decode batch {batch:2d}: {results[f'decode_batch{batch}_ms_per_step']:.1f} ms/step, "
            f"{results[f'decode_batch{batch}_tokens_per_s']:.1f} tok/s, "
            f"weights at {results[f'decode_batch{batch}_weight_GBps']:.1f} GB/s"
        )
    print(
        f"prefill {args.prefill_tokens} tokens: {results['prefill_tokens_per_s']:.0f} tok/s; its decoder linears "
        f"at {results['prefill_linear_GOPs']:.0f} GOP/s = {100 * results['prefill_linear_share_of_roof']:.0f} % of the "
        f"INT8 GEMM roof ({results['int8_gemm_roof_GOPs']:.0f} GOP/s, torch._int_mm at M={args.prefill_tokens})"
    )
    for batch, parts in results["decode_breakdown_ms"].items():
        rest = parts["total"] - sum(parts[p] for p in BREAKDOWN_PARTS)
        print(
            f"decode batch {batch:>2s} at context {args.breakdown_context}, ms/step: {parts['total']:.1f} = "
            + ", ".join(f"{p} {parts[p]:.1f}" for p in BREAKDOWN_PARTS)
            + f", other {rest:.1f} (Python layer loop)"
            + (
                f"; alternate steps through the C layer stack: {parts['stacked_total']:.1f}"
                if "stacked_total" in parts
                else ""
            )
        )
    pairs = results["floor_pairs"]
    print(
        f"decode batch 1 / floor, {len(pairs)} pairs of (read bandwidth, then {FLOOR_PAIR_STEPS} decode steps): "
        + ", ".join(
            f"{p['decode_ms']:.1f} ms / {p['floor_ms']:.1f} ms at {p['read_GBps']:.1f} GB/s = {p['ratio']:.2f}x"
            for p in pairs
        )
    )
    print(
        f"decode batch 1 / floor = {report['decode_batch1_ratio_to_floor']:.2f}x (median of the pairs); JSON in {args.out}"
    )


if __name__ == "__main__":
    main()
