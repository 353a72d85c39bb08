"""Each CPU kernel family against llama.cpp built for the same instruction set, on one machine: for every family
asked for, ``benchmarks/serve_bench.py`` runs our server with ``--cpu-kernels FAMILY`` (PyTorch's and oneDNN's
own kernels held to the same instruction set: ``ATEN_CPU_CAPABILITY`` / ``ONEDNN_MAX_CPU_ISA``) side by side
with ``llama-server`` whose ``libggml-cpu`` was built for that set, interleaved rounds, and this script gathers
the ratios into one JSON.

    python benchmarks/cpu_family_bench.py --llama-dir ~/.cache/a8w8-peers \\
        --model smollm2 OURS_DIR GGUF --model qwen3-0.6b OURS_DIR GGUF [--families avx2 avx512-vnni]

``--llama-dir`` holds one llama.cpp build per instruction set, ``bin-avx2/`` and ``bin-avx512/`` (each a copy of
``build/bin``; recipe in the README's Performance section). SmolLM2 runs at concurrency 1 and 16 (16 slots for
llama.cpp), other models at 1. A benchmark, not a test: it prints and writes JSON; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what each family holds PyTorch / oneDNN to, and the llama.cpp build for the same instruction set
FAMILY_ENV = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "avx-vnni": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2_VNNI"},
    "avx512-vnni": {},
}
# llama.cpp's avx-vnni build: -DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX_VNNI=ON -DGGML_AVX512=OFF (not run here:
# this machine has no AVX-VNNI)
LLAMA_BUILD = {"avx2": "bin-avx2", "avx-vnni": "bin-avx-vnni", "avx512-vnni": "bin-avx512"}
CONCURRENCY = {"smollm2": [1, 16]}  # other models: [1]


def run_one(family: str, name: str, ours: str, gguf: str, args: argparse.Namespace, out: Path) -> dict:
    build = Path(args.llama_dir).expanduser() / LLAMA_BUILD[family]
    env = {**os.environ, **FAMILY_ENV[family], "LD_LIBRARY_PATH": str(build)}
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "serve_bench.py"),
        "--model",
        ours,
        "--ours-args",
        f"--cpu-kernels {family}",
        "--llama-server",
        str(build / "llama-server"),
        "--llama-model",
        gguf,
        "--concurrency",
        *map(str, CONCURRENCY.get(name, [1])),
        "--rounds",
        str(args.rounds),
        "--out",
        str(out),
    ]
    print(f"== {family} / {name}: {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, env=env, check=True, cwd=ROOT)
    report = json.loads(out.read_text())
    return {"servers": report["servers"], "ratios": report.get("ratios", {})}


def headline(result: dict) -> dict:
    """Median TPOT, TTFT and output tokens/s per server and level."""
    rows = {}
    for server, levels in result["servers"].items():
        for c, m in levels.items():
            rows.setdefault(server.split(" -np")[0], {})[c] = {
                "tpot_ms": m["tpot_s"].get("mean", 0) * 1000,
                "ttft_ms": m["ttft_s"].get("mean", 0) * 1000,
                "output_tokens_per_s": m["output_tokens_per_s"],
            }
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-dir", required=True, help="directory with bin-avx2/ and bin-avx512/ llama.cpp builds")
    ap.add_argument(
        "--model",
        nargs=3,
        action="append",
        required=True,
        metavar=("NAME", "OURS_DIR", "GGUF"),
        help="a model: a name (smollm2 runs c=1 and c=16), our checkpoint, llama.cpp's GGUF of the same weights",
    )
    ap.add_argument("--families", nargs="+", default=["avx2", "avx512-vnni"], choices=list(FAMILY_ENV))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="bench-results/cpu-families.json")
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict = {"date": time.strftime("%Y-%m-%d"), "cpu_count": os.cpu_count(), "rounds": args.rounds, "runs": {}}
    for family in args.families:
        for name, ours, gguf in args.model:
            part = out.with_suffix(f".{family}.{name}.json")
            result = run_one(family, name, ours, gguf, args, part)
            report["runs"].setdefault(family, {})[name] = {"headline": headline(result), **result}
            out.write_text(json.dumps(report, indent=1))
    print("\nfamily       model        server      c   TPOT ms   TTFT ms   out tok/s")
    for family, models in report["runs"].items():
        for name, r in models.items():
            for server, levels in r["headline"].items():
                for c, h in levels.items():
                    print(
                        f"{family:12s} {name:12s} {server[:11]:11s} {c:>2s} "
                        f"{h['tpot_ms']:8.1f} {h['ttft_ms']:9.1f} {h['output_tokens_per_s']:10.1f}"
                    )
    print(f"JSON in {out}")


if __name__ == "__main__":
    main()
