"""INT8 linear kernels available in this PyTorch on this CPU, side by side (GB/s of weight, GOP/s).

    python benchmarks/kernels.py [--n 3072 --k 1024] [--out bench-results/kernels.json]

Weights are cycled through a set larger than L3 so that small-M numbers are not hot-cache numbers.
Paths: bf16 F.linear; our BF16 kernel (the BF16 lm_head's); our VNNI kernel (quantize + GEMM + epilogue in
one C call) and the same GEMM of every other kernel family this CPU runs (AVX2; the avx-vnni source through the
AVX-512 encoding of vpdpbusd where the CPU has AVX-512 VNNI but not AVX-VNNI); the eager A8W8 op
(per-token quantize + torch._int_mm + fp32 epilogue); _int_mm alone; fbgemm dynamic quantized linear (per-tensor uint8 activations: different math, speed only);
oneDNN qlinear_pointwise with a prepacked weight (per-tensor uint8 activations: speed only).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from loaders.quantization import quantize_activations, quantize_linear
from npu.backends.cpu.backend import Int8GemmLinear
from npu.backends.cpu.vnni import (
    AVX_VNNI_EVEX_TWIN,
    FAMILIES,
    Bf16Linear,
    VnniLinear,
    Workspace,
    build_family_library,
    load_kernel_library,
    load_vnni_library,
)
from npu.host_memory import HugePageArena

WORKING_SET_BYTES = 96 * 1024**2  # > 32 MiB L3


def timed(fn, weights, repeats: int = 3) -> float:
    for w in weights:
        fn(w)
    t = time.perf_counter()
    for _ in range(repeats):
        for w in weights:
            fn(w)
    return (time.perf_counter() - t) / (repeats * len(weights))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3072)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--out", default="bench-results/kernels.json")
    args = ap.parse_args()
    n, k = args.n, args.k
    count = max(2, WORKING_SET_BYTES // (n * k))
    g = torch.Generator().manual_seed(0)
    floats = [torch.randn(n, k, generator=g) * k**-0.5 for _ in range(count)]
    bf16 = [w.to(torch.bfloat16) for w in floats]
    ours = [Int8GemmLinear(quantize_linear(w)) for w in floats]
    lib, why = load_vnni_library()
    workspace, arena = Workspace(), HugePageArena()  # packed weights on huge pages, as the cpu backend keeps them
    vnni = [VnniLinear(quantize_linear(w), lib, workspace, arena) for w in floats] if lib is not None else []
    bf16_ours = [Bf16Linear(w, lib, workspace, arena) for w in bf16] if lib is not None and lib.has_bf16 else []
    # the A8W8 GEMM of the other kernel families this CPU runs (same interface, same results)
    family_ops = {}
    for name in FAMILIES:
        family_lib = load_kernel_library(name)[0]
        if name != "avx512-vnni" and family_lib is not None:
            family_ops[name] = [VnniLinear(quantize_linear(w), family_lib, workspace, arena) for w in floats]
    # where the CPU lacks AVX-VNNI but has AVX-512 VNNI: the avx-vnni GEMM through the EVEX encoding of its
    # instruction (a proxy for its speed, not an AVX-VNNI CPU's)
    twin_lib = None if "avx-vnni" in family_ops else build_family_library(AVX_VNNI_EVEX_TWIN)[0]
    if twin_lib is not None:
        family_ops["avx-vnni (EVEX twin)"] = [
            VnniLinear(quantize_linear(w), twin_lib, workspace, arena) for w in floats
        ]
    torch.backends.quantized.engine = "fbgemm"
    packed = []
    onednn = []
    for op in ours:
        qw = torch._make_per_channel_quantized_tensor(
            op.qweight, op.scale.double(), torch.zeros(n, dtype=torch.long), 0
        )
        packed.append(torch.ops.quantized.linear_prepack(qw, None))
        onednn.append((torch.ops.onednn.qlinear_prepack(op.qweight, [1, k]), op.scale))
    rows = []
    for m in (1, 16, 256, 2048):
        x = torch.randn(m, k, generator=g)
        xb = x.to(torch.bfloat16)
        qx, _ = quantize_activations(x)
        xu8 = (qx.to(torch.int16) + 128).to(torch.uint8)
        paths = {
            "bf16 F.linear": (lambda w: F.linear(xb, w), bf16, 2),
            "bf16 kernel (ours)": (lambda op: op(x), bf16_ours, 2),
            "a8w8 VNNI kernel (fused quantize + epilogue)": (lambda op: op(x), vnni, 1),
            **{f"a8w8 {name} kernel (same interface)": (lambda op: op(x), ops, 1) for name, ops in family_ops.items()},
            "a8w8 (quantize + _int_mm + epilogue)": (lambda op: op(x), ours, 1),
            "_int_mm only": (lambda op: torch._int_mm(qx, op.qweight.t()), ours, 1),
            "fbgemm linear_dynamic (per-tensor u8)": (
                lambda p: torch.ops.quantized.linear_dynamic(x, p, False),
                packed,
                1,
            ),
            "onednn qlinear_pointwise (per-tensor u8)": (
                lambda p: torch.ops.onednn.qlinear_pointwise(
                    xu8,
                    0.01,
                    128,
                    p[0],
                    p[1],
                    torch.zeros(n, dtype=torch.int32),
                    None,
                    1.0,
                    0,
                    torch.float32,
                    "none",
                    [],
                    "",
                ),
                onednn,
                1,
            ),
        }
        for name, (fn, ws, bytes_per_weight) in paths.items():
            if not ws:
                rows.append({"m": m, "path": name, "error": why or "CPU lacks avx512_bf16"})
                continue
            try:
                dt = timed(fn, ws)
            except Exception as e:  # a path this build lacks is reported, not fatal
                rows.append({"m": m, "path": name, "error": str(e)[:120]})
                continue
            rows.append(
                {
                    "m": m,
                    "path": name,
                    "us": dt * 1e6,
                    "weight_GBps": n * k * bytes_per_weight / dt / 1e9,
                    "GOPs": 2 * m * n * k / dt / 1e9,
                }
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"n": n, "k": k, "threads": torch.get_num_threads(), "rows": rows}, indent=2))
    print(
        f"[{n} x {k}] weights, {count} distinct matrices ({count * n * k / 2**20:.0f} MiB int8), "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    for r in rows:
        if "error" in r:
            print(f"M={r['m']:5d}  {r['path']:44s} unavailable: {r['error']}")
        else:
            print(
                f"M={r['m']:5d}  {r['path']:44s} {r['us']:9.1f} us  {r['weight_GBps']:6.1f} GB/s  {r['GOPs']:7.1f} GOP/s"
            )


if __name__ == "__main__":
    main()
