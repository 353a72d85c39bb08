"""``a8w8-serve convert-gguf``: a Llama-architecture GGUF file -> a Hugging Face checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from a8w8_serve.flags import check_destination


def run(args: argparse.Namespace) -> None:
    from loaders.gguf_convert import convert_gguf

    check_destination(Path(args.dst), args.force)
    convert_gguf(args.src, args.dst)
    print(f"wrote a LlamaForCausalLM checkpoint (float32 safetensors, tokenizer, chat template) to {args.dst}")


def add_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("convert-gguf", help="convert a Llama-architecture GGUF file to a Hugging Face checkpoint")
    c.add_argument("src", help="the .gguf file")
    c.add_argument("dst", help="directory to write (refused if it exists and is not empty, unless --force)")
    c.add_argument("--force", action="store_true", help="write into an existing, non-empty dst")
    c.set_defaults(func=run)
