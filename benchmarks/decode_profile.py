"""Where a decode step's time goes, by kernel: ``torch.profiler`` over decode steps of a random model of a
worker_bench shape (on a GPU, the graph-replayed steps' kernels are listed one by one).

    python benchmarks/decode_profile.py [--device cuda] [--shape 0.6b] [--batch 1] [--steps 8]

A benchmark, not a test: it prints the profiler's tables (by self CPU time, then by self device time).
"""

from __future__ import annotations

import argparse
import tempfile

from torch.profiler import ProfilerActivity, profile
from worker_bench import KV_BUDGET_BYTES, SHAPES, decode_ms

from loaders.writer import write_random_qwen3
from npu.config import WorkerConfig
from npu.runner import ModelRunner

PROMPT_TOKENS = 128


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="0.6b")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        write_random_qwen3(d, SHAPES[args.shape])
        runner = ModelRunner(
            WorkerConfig(model_dir=d, kv_cache_memory_bytes=KV_BUDGET_BYTES, max_model_len=4096, device=args.device)
        )
        runner.warmup()
        ms = decode_ms(runner, args.batch, PROMPT_TOKENS, 2 * args.steps, 10)  # also captures the graphs
        print(f"decode batch {args.batch}: {ms:.2f} ms/step (median, unprofiled)")
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        with profile(activities=activities) as prof:
            decode_ms(runner, args.batch, PROMPT_TOKENS, args.steps, 1000)
    table = prof.key_averages()
    print(table.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    if args.device == "cuda":
        print(table.table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60))


if __name__ == "__main__":
    main()
