"""``a8w8-serve default-model``: build (if needed) and print the built-in default model's path."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> None:
    from offline.default_model import ensure_default_model, ensure_random_model

    print(ensure_random_model() if args.random else ensure_default_model()[0])


def add_parser(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser("default-model", help="create (if needed) and print the built-in default model's path")
    d.add_argument("--random", action="store_true", help="the random-weight Qwen3 demo model instead")
    d.set_defaults(func=run)
