"""The FastAPI application: lifespan (engine start/stop), middleware, and the routes."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import logging
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

from engine.async_engine import AsyncEngine
from engine.core import EngineConfig
from server.errors import APIError, error_response, install_error_handlers
from server.metrics import ServerMetrics
from server.schemas import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from server.serving import ServingContext, create_chat_completion, create_completion, render_chat_prompt

log = logging.getLogger("a8w8.server")

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024  # generous for long prompts, small enough to refuse abuse


@dataclass
class ServerSettings:
    engine: EngineConfig
    served_model_names: list[str]
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    reasoning_parser: str = "auto"  # auto | qwen3 | none


def package_version() -> str:
    try:
        return version("a8w8-serve")
    except PackageNotFoundError:
        return "0.0.0+local"


def _after_engine_start(task: asyncio.Task) -> None:
    if task.cancelled():
        return
    if task.exception() is not None:
        log.error("engine failed to start: %s", task.exception())
        return
    # What startup built (app, tokenizer, template) lives as long as the process: keep it out of the cyclic
    # collector's full passes, which otherwise walk all of it in the middle of serving (as vLLM does).
    gc.freeze()


def create_app(settings: ServerSettings) -> FastAPI:
    """Build the app; the engine (and its worker process) starts in the lifespan, in the background."""
    holder: dict[str, object] = {}

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        engine = AsyncEngine(settings.engine)
        template = engine.chat_template
        reasoning = settings.reasoning_parser == "qwen3" or (
            settings.reasoning_parser == "auto" and template is not None and "<think>" in template.source
        )
        ctx = ServingContext(engine=engine, metrics=ServerMetrics(engine, settings.served_model_names[0]),
                             served_model_names=settings.served_model_names,
                             model_dir=settings.engine.worker.model_dir, reasoning=reasoning)
        holder["ctx"] = ctx
        start = asyncio.create_task(engine.start())  # /health answers 503 until the model is loaded
        start.add_done_callback(_after_engine_start)
        try:
            yield
        finally:
            if not start.done():
                start.cancel()
            await engine.stop()

    app = FastAPI(title="a8w8-serve", version=package_version(), lifespan=lifespan)
    install_error_handlers(app)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"],
                           allow_headers=["*"], allow_credentials=False)

    def ctx() -> ServingContext:
        return holder["ctx"]  # type: ignore[return-value]

    @app.middleware("http")
    async def guard(request: Request, call_next):
        t0 = time.perf_counter()
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            return error_response(413, f"request body of {length} bytes exceeds the limit of {settings.max_body_bytes}")
        if settings.api_key and request.url.path.startswith("/v1/"):
            auth = request.headers.get("authorization", "")
            given = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(given.encode(), settings.api_key.encode()):
                return error_response(401, "invalid or missing API key (Authorization: Bearer <key>)")
        response = await call_next(request)
        log.info("%s %s %d %.3fs", request.method, request.url.path, response.status_code, time.perf_counter() - t0)
        return response

    @app.get("/health")
    async def health() -> Response:
        engine = ctx().engine
        if engine.healthy:
            return JSONResponse({"status": "ok"})
        status = "loading" if engine.dead is None and not engine.ready.is_set() else "unavailable"
        return JSONResponse({"status": status, "error": engine.dead}, status_code=503)

    @app.get("/version")
    async def get_version() -> dict:
        return {"version": package_version()}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(ctx().metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict:
        c = ctx()
        max_len = c.engine.max_model_len if c.engine.ready.is_set() else None
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": c.created, "owned_by": "a8w8-serve", "root": c.model_dir,
             "parent": None, "max_model_len": max_len}
            for name in c.served_model_names
        ]}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(ctx(), req, request)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        return await create_completion(ctx(), req, request)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict:
        c = ctx()
        c.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", "prompt")
        if req.messages is not None:
            tokens = render_chat_prompt(c, req.messages, req.add_generation_prompt, req.chat_template_kwargs)
        else:
            tokens = c.engine.tokenizer.encode(req.prompt)
        max_len = c.engine.max_model_len if c.engine.ready.is_set() else None
        return {"tokens": tokens, "count": len(tokens), "max_model_len": max_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict:
        c = ctx()
        c.check_model(req.model)
        vocab = c.engine.tokenizer.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is out of range [0, {vocab})", "tokens")
        return {"prompt": c.engine.tokenizer.decode(req.tokens)}

    return app
