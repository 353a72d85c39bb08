"""Decode TPOT at batch 1: transformers eager (BF16 checkpoint) vs. a8w8-serve's offline engine (A8W8).

    python benchmarks/transformers_bench.py --bf16 DIR --w8a8 DIR [--prompt-len 256 --tokens 32 --rounds 9]

TPOT = (time to generate 1 + N tokens - time to generate 1 token) / N, same prompt. Ours runs twice: with
the checkpoint's BF16 lm_head (the default) and with ``--quantize-lm-head``. All three stay loaded and are
measured in turn within each round (the order rotating), because this machine's speed drifts within
minutes; the ratio is the median of the rounds' ratios, each taken between measurements seconds apart.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from pathlib import Path

import torch


def tpot_once(generate, n: int) -> float:
    """One TPOT measurement: a 1-token generation, then a (1 + n)-token one."""
    t = time.perf_counter()
    generate(1)
    one = time.perf_counter() - t
    t = time.perf_counter()
    generate(1 + n)
    return (time.perf_counter() - t - one) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bf16", required=True, help="float checkpoint for transformers")
    ap.add_argument("--w8a8", required=True, help="the same weights as compressed-tensors W8A8, for a8w8-serve")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--out", default="bench-results/transformers.json")
    args = ap.parse_args()
    prompt = [1000 + (i * 7919) % 100000 for i in range(args.prompt_len)]

    from transformers import AutoModelForCausalLM

    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    model = AutoModelForCausalLM.from_pretrained(args.bf16, dtype=torch.bfloat16).eval()
    ids = torch.tensor([prompt])

    def hf_generate(n: int) -> None:
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    def ours_generate(llm: LLM):
        def generate(n: int) -> None:
            llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))

        return generate

    with contextlib.ExitStack() as stack:
        systems = {"transformers_bf16": hf_generate}
        for label, int8_head in (("a8w8_serve", False), ("a8w8_serve_int8_lm_head", True)):
            llm = stack.enter_context(
                LLM(args.w8a8, kv_cache_memory_bytes=1 << 30, max_model_len=4096, quantize_lm_head=int8_head)
            )
            systems[label] = ours_generate(llm)
        for generate in systems.values():
            generate(2)  # warm-up
        labels = list(systems)
        rounds = []
        for r in range(args.rounds):
            order = labels[r % len(labels) :] + labels[: r % len(labels)]
            rounds.append({label: tpot_once(systems[label], args.tokens) for label in order})
    hf = [r["transformers_bf16"] for r in rounds]
    report = {
        "transformers_bf16_tpot_ms": statistics.median(hf) * 1000,
        "prompt_len": args.prompt_len,
        "tokens": args.tokens,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "rounds": [{k: v * 1000 for k, v in r.items()} for r in rounds],
    }
    parts = []
    for label, flag in (("a8w8_serve", ""), ("a8w8_serve_int8_lm_head", " with --quantize-lm-head")):
        ratios = [r["transformers_bf16"] / r[label] for r in rounds]
        report[f"{label}_tpot_ms"] = statistics.median(r[label] for r in rounds) * 1000
        report[f"{label}_speedup"] = statistics.median(ratios)
        report[f"{label}_speedup_rounds"] = ratios
        parts.append(
            f"a8w8-serve A8W8{flag} {report[f'{label}_tpot_ms']:.1f} ms -> {statistics.median(ratios):.2f}x "
            f"lower (rounds " + ", ".join(f"{x:.2f}" for x in ratios) + ")"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(
        f"batch-1 decode TPOT, medians of {args.rounds} interleaved rounds: transformers eager BF16 "
        f"{report['transformers_bf16_tpot_ms']:.1f} ms; " + "; ".join(parts) + f"; JSON in {args.out}"
    )


if __name__ == "__main__":
    main()
