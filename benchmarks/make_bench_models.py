"""Write the random Qwen3-shaped benchmark checkpoints: W8A8 (compressed-tensors) and its BF16 twin; for the 8B
and 14B shapes W8A8 only, written one tensor at a time (their float copy would not fit in memory).

    python benchmarks/make_bench_models.py [--shape 0.6b|1.7b|8b|14b] [--dir /tmp/bench-models]
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from worker_bench import SHAPES

from loaders.assets import qwen3_tokenizer_dir
from loaders.writer import write_random_qwen3, write_random_qwen3_w8a8_streaming

# Shapes whose float copy does not fit this machine's memory: W8A8 only, written streaming.
STREAMED = ("8b", "14b")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="0.6b")
    ap.add_argument("--dir", default="/tmp/bench-models")
    args = ap.parse_args()
    spec = replace(SHAPES[args.shape], max_position_embeddings=40960, seed=0)
    if args.shape in STREAMED:
        dst = Path(args.dir) / f"qwen3-{args.shape}-shaped-w8a8"
        print(write_random_qwen3_w8a8_streaming(dst, spec, tokenizer_dir=qwen3_tokenizer_dir()))
        return
    for quantized, suffix in ((True, "w8a8"), (False, "bf16")):
        dst = Path(args.dir) / f"qwen3-{args.shape}-shaped-{suffix}"
        write_random_qwen3(dst, spec, quantized=quantized, tokenizer_dir=qwen3_tokenizer_dir())
        print(dst)


if __name__ == "__main__":
    main()
