"""Sampling one decode step's tokens: ours beside the path it replaced, at Qwen3's vocabulary size.

    python benchmarks/sampler_bench.py [--batch 16] [--rounds 5] [--out bench-results/sampler_bench.json]

For each option set (greedy, temperature alone as OpenAI clients send it by default, top-p, top-k, min-p, their
combinations), the median milliseconds to sample ``--batch`` rows of 151936 random logits with the worker's
``Sampler``, and with the path it replaced: the row's top-k, or else the whole row sorted, softmax, filters,
torch.multinomial. Logits are ``randn * 3`` (a peaked row: the nucleus is a few hundred tokens), or ``randn * 0.3``
for the sets marked flat (a random-weight model's rows: the nucleus is most of the vocabulary, which is what sorting
paid for most). Interleaved rounds on the same logits. Prints and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from npu.messages import SamplingOptions
from npu.sampler import Sampler, SequenceSamplingState

VOCAB = 151936  # Qwen3's embedding rows
SAMPLEABLE = 151669  # its tokenizer's vocabulary (the rest is padding)
OPTION_SETS = {
    "greedy": SamplingOptions(temperature=0.0),
    "temperature 1": SamplingOptions(temperature=1.0),
    "temperature 0.7, top_p 0.9": SamplingOptions(temperature=0.7, top_p=0.9),
    "temperature 0.7, top_k 20": SamplingOptions(temperature=0.7, top_k=20),
    "temperature 0.7, min_p 0.05": SamplingOptions(temperature=0.7, min_p=0.05),
    "temperature 0.6, top_p 0.95, top_k 20": SamplingOptions(temperature=0.6, top_p=0.95, top_k=20),
    "temperature 0.7, top_p 0.9, min_p 0.05": SamplingOptions(temperature=0.7, top_p=0.9, min_p=0.05),
    "flat: temperature 1, top_p 0.9": SamplingOptions(temperature=1.0, top_p=0.9),
    "flat: temperature 0.2, top_p 0.9": SamplingOptions(temperature=0.2, top_p=0.9),
}
PEAKED_SCALE, FLAT_SCALE = 3.0, 0.3


def previous_sample(logits: torch.Tensor, o: SamplingOptions, g: torch.Generator) -> list[int]:
    """The reference (the sampler's previous path): per row its top-k, else the whole vocabulary sorted, then
    softmax, top-p/min-p, torch.multinomial."""
    logits = logits.float()
    logits[:, SAMPLEABLE:] = float("-inf")
    if o.temperature == 0.0:
        return logits.argmax(-1).tolist()
    out = []
    for row in logits:
        if 0 < o.top_k < row.numel():
            values, ids = torch.topk(row, o.top_k)
        else:
            values, ids = torch.sort(row, descending=True)
        probs = torch.softmax(values / o.temperature, dim=-1)
        keep = torch.ones_like(probs, dtype=torch.bool)
        if o.top_p < 1.0:
            keep &= (torch.cumsum(probs, dim=-1) - probs) < o.top_p
        if o.min_p > 0.0:
            keep &= probs >= o.min_p * probs[0]
        keep[0] = True
        out.append(int(ids[torch.multinomial(torch.where(keep, probs, 0.0), 1, generator=g)]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("bench-results/sampler_bench.json"))
    args = ap.parse_args()
    noise = torch.randn(args.batch, VOCAB, generator=torch.Generator().manual_seed(0))
    sampler = Sampler(SAMPLEABLE, seed=0)
    g = torch.Generator().manual_seed(0)
    rows = []
    print(f"sampling {args.batch} rows of {VOCAB} logits, {torch.get_num_threads()} threads, median of {args.rounds}")
    for name, opts in OPTION_SETS.items():
        logits = noise * (FLAT_SCALE if name.startswith("flat") else PEAKED_SCALE)
        states = [SequenceSamplingState(opts, [1]) for _ in range(args.batch)]
        paths = {
            "ours": lambda: sampler.sample(logits.clone(), list(range(args.batch)), states),
            "previous": lambda: previous_sample(logits.clone(), opts, g),
        }
        times: dict[str, list[float]] = {k: [] for k in paths}
        for fn in paths.values():
            fn()  # warm-up
        for _ in range(args.rounds):  # interleaved, so both see the same machine state
            for k, fn in paths.items():
                t0 = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t0) * 1000)
        ours, ref = statistics.median(times["ours"]), statistics.median(times["previous"])
        rows.append({"options": name, "ours_ms": ours, "previous_ms": ref, "speedup": ref / ours})
        print(f"  {name:40s} ours {ours:8.2f} ms   previous {ref:8.2f} ms   -> {ref / ours:6.1f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"batch": args.batch, "vocab": VOCAB, "rows": rows}, indent=2) + "\n")
    print(f"JSON: {args.out}")


if __name__ == "__main__":
    main()
