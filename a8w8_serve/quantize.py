"""``a8w8-serve quantize``: a float checkpoint -> compressed-tensors W8A8 (SmoothQuant, rotations, GPTQ)."""

from __future__ import annotations

import argparse
from pathlib import Path

from a8w8_serve.flags import HelpFormatter, check_destination, parse_size
from loaders.options import FLOAT_DTYPE_NAMES


def run(args: argparse.Namespace) -> None:
    from offline.quantize import QuantizeRecipe, quantize_with_recipe
    from offline.rotate import RotationPlan

    if args.no_r3 and args.rotate is None:
        raise SystemExit("error: --no-r3 applies only with --rotate (R3 is one of the rotations)")
    check_destination(Path(args.dst), args.force)
    recipe = QuantizeRecipe(
        smooth_alpha=args.smooth_quant,
        rotation=None if args.rotate is None else RotationPlan(r1=args.rotate, r3=not args.no_r3),
        gptq=args.gptq,
    )
    quantize_with_recipe(args.src, args.dst, recipe, args.max_shard_size, tuple(args.ignore), args.dtype)
    print(f"wrote compressed-tensors W8A8 checkpoint to {args.dst}")


def add_parser(sub: argparse._SubParsersAction) -> None:
    q = sub.add_parser(
        "quantize", help="write a float checkpoint as compressed-tensors W8A8", formatter_class=HelpFormatter
    )
    q.add_argument("src", help="float checkpoint directory")
    q.add_argument("dst", help="directory to write (refused if it exists and is not empty, unless --force)")
    q.add_argument("--force", action="store_true", help="write into an existing, non-empty dst")
    q.add_argument(
        "--max-shard-size", type=parse_size, default="5GiB", metavar="SIZE", help="largest safetensors shard"
    )
    q.add_argument(
        "--smooth-quant",
        type=float,
        nargs="?",
        const=0.7,
        default=None,
        metavar="ALPHA",
        help="fold SmoothQuant activation smoothing (calibrated on a built-in text) into the weights "
        "before quantizing; ALPHA is the migration strength (default 0.7)",
    )
    q.add_argument(
        "--rotate",
        nargs="?",
        const="kron",
        default=None,
        choices=["kron", "blocks"],
        help="fold Hadamard rotations into the weights first (QuaRot/SpinQuant's R1 on the residual stream, R2 "
        "per head, R4 on down_proj's input, applied online by the kernels), written as a compressed-tensors "
        "transform_config: R1 as one Kronecker Hadamard matrix (kron, the default) or power-of-two blocks; "
        "R3 (queries and keys per head after RoPE, online) too unless --no-r3",
    )
    q.add_argument(
        "--no-r3",
        action="store_true",
        help="with --rotate: leave out R3, the online rotation of queries and keys (for a runtime that does "
        "not apply compressed-tensors' q_attn / k_cache transforms); the INT8 KV cache then costs more quality",
    )
    q.add_argument(
        "--gptq",
        action="store_true",
        help="round the INT8 weights with GPTQ (error feedback under the layer inputs' Hessians from a "
        "calibration pass over a built-in text) instead of to nearest; same format, same speed",
    )
    q.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="PATTERN",
        help="keep these linears in float too (repeatable; compressed-tensors syntax: a module name or "
        "re:REGEX, e.g. 're:.*mlp.down_proj'); lm_head is always kept",
    )
    q.add_argument(
        "--dtype",
        choices=["auto", *FLOAT_DTYPE_NAMES],
        default="auto",
        help="dtype of the float tensors written (embedding, norms, lm_head, biases, --ignore'd linears); "
        "auto = as in SRC. INT8 weights and their scales are not affected",
    )
    q.set_defaults(func=run)
