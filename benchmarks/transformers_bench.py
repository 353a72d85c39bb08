"""Decode TPOT at batch 1: transformers eager (BF16 checkpoint) vs. a8w8-serve's offline engine (A8W8).

    python benchmarks/transformers_bench.py --bf16 DIR --w8a8 DIR [--prompt-len 256 --tokens 32]

TPOT = (time to generate 1 + N tokens - time to generate 1 token) / N, median of repeats, same prompt.
Ours runs twice: with the checkpoint's BF16 lm_head (the default) and with ``--quantize-lm-head``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def tpot(generate, n: int, repeats: int) -> float:
    generate(1)  # warm-up
    one, many = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        generate(1)
        one.append(time.perf_counter() - t)
        t = time.perf_counter()
        generate(1 + n)
        many.append(time.perf_counter() - t)
    return (statistics.median(many) - statistics.median(one)) / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bf16", required=True, help="float checkpoint for transformers")
    ap.add_argument("--w8a8", required=True, help="the same weights as compressed-tensors W8A8, for a8w8-serve")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench-results/transformers.json")
    args = ap.parse_args()
    prompt = [1000 + (i * 7919) % 100000 for i in range(args.prompt_len)]

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(args.bf16, torch_dtype=torch.bfloat16).eval()
    ids = torch.tensor([prompt])

    def hf_generate(n: int) -> None:
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    hf = tpot(hf_generate, args.tokens, args.repeats)

    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    ours = {}
    for label, int8_head in (("a8w8_serve", False), ("a8w8_serve_int8_lm_head", True)):
        with LLM(args.w8a8, kv_cache_memory_bytes=1 << 30, max_model_len=4096, quantize_lm_head=int8_head) as llm:
            def ours_generate(n: int) -> None:
                llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))

            ours[label] = tpot(ours_generate, args.tokens, args.repeats)
    report = {"transformers_bf16_tpot_ms": hf * 1000, "prompt_len": args.prompt_len, "tokens": args.tokens,
              "threads": torch.get_num_threads(), "torch": torch.__version__}
    for label, t in ours.items():
        report[f"{label}_tpot_ms"] = t * 1000
        report[f"{label}_speedup"] = hf / t
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"batch-1 decode TPOT: transformers eager BF16 {hf * 1000:.1f} ms; "
          f"a8w8-serve A8W8 {ours['a8w8_serve'] * 1000:.1f} ms -> {hf / ours['a8w8_serve']:.2f}x lower; "
          f"with --quantize-lm-head {ours['a8w8_serve_int8_lm_head'] * 1000:.1f} ms -> "
          f"{hf / ours['a8w8_serve_int8_lm_head']:.2f}x lower; JSON in {args.out}")


if __name__ == "__main__":
    main()
