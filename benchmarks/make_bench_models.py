"""Write the random Qwen3-shaped benchmark checkpoints: W8A8 (compressed-tensors) and its BF16 twin.

    python benchmarks/make_bench_models.py [--shape 0.6b] [--dir /tmp/bench-models]
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from loaders.assets import qwen3_tokenizer_dir
from loaders.writer import write_random_qwen3
from worker_bench import SHAPES


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="0.6b")
    ap.add_argument("--dir", default="/tmp/bench-models")
    args = ap.parse_args()
    spec = replace(SHAPES[args.shape], max_position_embeddings=40960, seed=0)
    for quantized, suffix in ((True, "w8a8"), (False, "bf16")):
        dst = Path(args.dir) / f"qwen3-{args.shape}-shaped-{suffix}"
        write_random_qwen3(dst, spec, quantized=quantized, tokenizer_dir=qwen3_tokenizer_dir())
        print(dst)


if __name__ == "__main__":
    main()
