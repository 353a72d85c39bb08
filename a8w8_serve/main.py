"""The ``a8w8-serve`` command line (one module per subcommand): serve, generate, quantize, default-model, convert-gguf, eval-quality.

Building the parser imports nothing heavy (no torch, no FastAPI), so ``--help`` and ``--version`` answer at
once; each command imports what it runs. Errors a user can cause (a missing or broken checkpoint, a file that
is not GGUF, a port in use) end the command with one ``error: ...`` line and exit code 1, not a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from a8w8_serve import convert_gguf, default_model, eval_quality, generate, quantize, serve
from server.version import package_version

SUBCOMMANDS = (serve, generate, quantize, default_model, convert_gguf, eval_quality)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="a8w8-serve", description="OpenAI-compatible A8W8 (INT8) Qwen3 server")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in SUBCOMMANDS:
        command.add_parser(sub)
    return parser


def user_error(exc: BaseException) -> bool:
    """Errors a user causes and can fix from the message alone (a missing or broken checkpoint, a GGUF
    file that is not one, a worker that could not load the model): reported in one line, no traceback."""
    from loaders.checkpoint import CheckpointError
    from loaders.config import ConfigError
    from npu.client import WorkerError

    return isinstance(
        exc, (ConfigError, CheckpointError, WorkerError, FileNotFoundError, NotADirectoryError, PermissionError)
    )


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, getattr(args, "log_level", "info").upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        args.func(args)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as e:
        if not user_error(e):
            raise
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(1)
