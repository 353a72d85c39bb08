"""``a8w8-serve serve``: the HTTP server."""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys
from pathlib import Path

from a8w8_serve.flags import (
    API_KEY_ENV,
    HelpFormatter,
    add_model_args,
    add_serving_engine_args,
    engine_config,
    format_size,
    parse_generation_overrides,
    parse_size,
)
from engine.config import GrammarLimits
from server.config import (
    DEFAULT_BODY_TIMEOUT_SECONDS,
    DEFAULT_HEADER_TIMEOUT_SECONDS,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_SHUTDOWN_TIMEOUT_SECONDS,
    ReasoningParserChoice,
)
from server.response_store import DEFAULT_MAX_BYTES, DEFAULT_MAX_RESPONSES


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


def run(args: argparse.Namespace) -> None:
    from server.app import create_app
    from server.config import HTTPSettings, ServerSettings
    from server.http_server import build_server

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
        reasoning_parser=ReasoningParserChoice(args.reasoning_parser),
        base_url=f"http://{_url_host(args.host)}:{args.port}",
        web_ui=args.web_ui,
        responses_store_max_count=args.responses_store_max_count,
        responses_store_max_bytes=args.responses_store_max_bytes,
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


def add_parser(sub: argparse._SubParsersAction) -> None:
    serve = sub.add_parser("serve", help="start the HTTP server", formatter_class=HelpFormatter)
    add_model_args(serve)
    add_serving_engine_args(serve)
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
        choices=[c.value for c in ReasoningParserChoice],
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
    rs = serve.add_argument_group("the Responses API's stored responses (store, previous_response_id)")
    rs.add_argument(
        "--responses-store-max-count",
        type=int,
        default=DEFAULT_MAX_RESPONSES,
        metavar="N",
        help="keep at most this many responses in memory (the oldest go first; 0: store none)",
    )
    rs.add_argument(
        "--responses-store-max-bytes",
        type=parse_size,
        default=format_size(DEFAULT_MAX_BYTES),
        metavar="SIZE",
        help="keep at most this much of them (their JSON and conversations; the oldest go first)",
    )
    serve.set_defaults(func=run)
