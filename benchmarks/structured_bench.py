"""What constrained decoding costs per decode step, side by side in one run: a batch of sequences decoded
without a grammar, then the same batch each under a JSON-schema grammar (engine: llguidance mask per row;
worker: the mask applied to that row's logits), on the same engine and worker.

    python benchmarks/make_bench_models.py --shape 0.6b        # once: /tmp/bench-models/qwen3-0.6b-shaped-w8a8
    python benchmarks/structured_bench.py [--model DIR] [--batch 16] [--steps 48] [--temperature 0]
        [--out bench-results/structured.json]

Per step it records the engine thread's wall time of ``EngineCore.step`` (schedule, masks, worker round
trip, postprocess) and the worker's compute time; the grammar's share is the difference. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from engine.config import EngineConfig
from engine.core import EngineCore
from engine.sampling_params import SamplingParams, StructuredOutput
from engine.structured_output import json_schema_grammar
from npu.config import WorkerConfig

DEFAULT_MODEL = "/tmp/bench-models/qwen3-0.6b-shaped-w8a8"
# Warm-up steps left out of the statistics (the prefill step and the first decodes).
WARMUP_STEPS = 4
# A grammar that stays open for the whole run (an unbounded array of short strings), so every measured step
# is constrained: the worst case, every row masked every step.
SCHEMA = {"type": "array", "items": {"type": "string", "maxLength": 12}}


def run(core: EngineCore, batch: int, steps: int, temperature: float, structured: StructuredOutput | None) -> dict:
    params = SamplingParams(
        max_tokens=steps + WARMUP_STEPS, temperature=temperature, seed=0, ignore_eos=True, structured=structured
    )
    prompt = core.tokenizer.encode("List some words:")
    for i in range(batch):
        core.add(core.make_sequences(f"r{i}", prompt, params))
    walls, computes = [], []
    while core.scheduler.has_work:
        t = time.perf_counter()
        core.step()
        walls.append(time.perf_counter() - t)
        computes.append(core.last_step_compute_seconds)
    walls, computes = walls[WARMUP_STEPS:-1], computes[WARMUP_STEPS:-1]
    return {
        "steps": len(walls),
        "step_ms_median": statistics.median(walls) * 1e3,
        "worker_compute_ms_median": statistics.median(computes) * 1e3,
        "host_ms_median": statistics.median(w - c for w, c in zip(walls, computes)) * 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 (greedy: one batched argmax, so the masks' cost shows) or a sampling temperature",
    )
    ap.add_argument("--rounds", type=int, default=2, help="alternate free/constrained this many times")
    ap.add_argument("--out", default="bench-results/structured.json")
    args = ap.parse_args()
    core = EngineCore(EngineConfig(worker=WorkerConfig(model_dir=args.model)))
    core.start()
    try:
        t = time.perf_counter()
        grammar = core.grammars.compile(json_schema_grammar(SCHEMA))
        first_compile_s = time.perf_counter() - t
        structured = StructuredOutput(grammar)
        free, constrained = [], []
        for _ in range(args.rounds):  # interleaved, so that drift of the machine hits both
            free.append(run(core, args.batch, args.steps, args.temperature, None))
            constrained.append(run(core, args.batch, args.steps, args.temperature, structured))
    finally:
        core.shutdown()

    def best(rs: list[dict]) -> dict:
        return min(rs, key=lambda r: r["step_ms_median"])

    f, c = best(free), best(constrained)
    results = {
        "model": args.model,
        "batch": args.batch,
        "temperature": args.temperature,
        "backend": core.worker_info.backend if core.worker_info else None,
        "first_grammar_compile_s (includes the vocabulary view)": first_compile_s,
        "free": free,
        "constrained": constrained,
        "constrained_over_free_step_time": c["step_ms_median"] / f["step_ms_median"],
        "grammar_host_ms_per_step": c["host_ms_median"] - f["host_ms_median"],
        "grammar_worker_ms_per_step": c["worker_compute_ms_median"] - f["worker_compute_ms_median"],
    }
    print(json.dumps(results, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
