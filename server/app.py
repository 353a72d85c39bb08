"""The FastAPI application: lifespan (engine start/stop), middleware, and the routes."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from engine.async_engine import AsyncEngine, EngineState
from engine.core import EngineConfig
from server.errors import ERROR_TYPES, APIError, install_error_handlers
from server.guard import RequestGuard
from server.http_server import DEFAULT_BODY_TIMEOUT_SECONDS, DEFAULT_MAX_BODY_BYTES
from server.metrics import ServerMetrics
from server.schemas import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ErrorResponse, TokenizeRequest
from server.serving import ServingContext, chat_prompt_ids, create_chat_completion, create_completion, input_named
from server.startup import startup_summary, startup_warnings
from server.version import package_version
from server.web_ui import mount_web_ui

log = logging.getLogger("a8w8.server")

# Statuses every POST route can answer with an OpenAI-style error body (documented in /openapi.json).
ERROR_STATUSES = (400, 401, 404, 408, 413, 429, 500, 503)
# The same for the routes outside /v1 that never reach the worker (no API key, no queue).
LOCAL_ERROR_STATUSES = (400, 404, 408, 413, 503)


@dataclass
class ServerSettings:
    engine: EngineConfig
    served_model_names: list[str]
    api_key: str | None = None
    cors_origins: list[str] = field(default_factory=list)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    body_timeout_seconds: float = DEFAULT_BODY_TIMEOUT_SECONDS
    reasoning_parser: str = "auto"  # auto | qwen3 | none
    base_url: str | None = None  # where clients reach the server, for the startup summary
    web_ui: bool = True  # the chat page at / (server/web_ui.py); off behind a gateway that wants only the API


def _error_responses(statuses: tuple[int, ...] = ERROR_STATUSES, streams: bool = False) -> dict[int | str, dict]:
    """OpenAPI ``responses`` for a route: its error statuses with their body, and (``streams``) the
    success answered either as JSON or as server-sent events."""
    responses: dict[int | str, dict] = {
        status: {"model": ErrorResponse, "description": ERROR_TYPES.get(status, "error")} for status in statuses
    }
    if streams:
        responses[200] = {
            "content": {"application/json": {}, "text/event-stream": {}},
            "description": "a JSON object, or with stream=true server-sent events",
        }
    return responses


def _openapi_with_400(app: FastAPI) -> dict:
    """FastAPI documents request-validation failures as 422 with its own body; this server answers 400
    with an OpenAI-style error body (clients and schema-driven testers compare the two)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(settings: ServerSettings, on_fatal: Callable[[str], None] | None = None) -> FastAPI:
    """Build the app; the engine (and its worker process) starts in the lifespan, in the background.
    ``on_fatal(reason)`` is called when the engine cannot serve any more (its worker failed to start, or
    kept dying): the process should then exit non-zero. The engine is ``app.state.engine`` once started."""
    holder: dict[str, object] = {}

    def engine_failed(reason: str) -> None:
        log.critical("the engine cannot serve: %s", reason)
        if on_fatal is not None:
            on_fatal(reason)

    started = time.monotonic()

    def after_engine_start(task: asyncio.Task) -> None:
        if task.cancelled():
            return
        if task.exception() is not None:
            engine_failed(f"the engine failed to start: {task.exception()}")
            return
        engine: AsyncEngine = holder["ctx"].engine  # type: ignore[attr-defined]
        for warning in startup_warnings(engine):
            log.warning("%s", warning)
        log.info(
            "%s",
            startup_summary(
                engine,
                settings.served_model_names,
                settings.base_url,
                time.monotonic() - started,
                package_version(),
                settings.web_ui,
            ),
        )
        # What startup built (app, tokenizer, template) lives as long as the process: keep it out of the
        # cyclic collector's full passes, which otherwise walk all of it in the middle of serving (as vLLM does).
        gc.freeze()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        worker = settings.engine.worker
        log.info(
            "loading %s from %s (quantization %s, KV cache %s); /health answers 503 until it is ready",
            settings.served_model_names[0],
            worker.model_dir,
            worker.quantization,
            worker.kv_cache_dtype,
        )
        engine = AsyncEngine(settings.engine, on_fatal=engine_failed)
        template = engine.chat_template
        reasoning = settings.reasoning_parser == "qwen3" or (
            settings.reasoning_parser == "auto" and template is not None and "<think>" in template.source
        )
        ctx = ServingContext(
            engine=engine,
            metrics=ServerMetrics(engine, settings.served_model_names[0]),
            served_model_names=settings.served_model_names,
            reasoning=reasoning,
        )
        holder["ctx"] = ctx
        app.state.engine = engine
        start = asyncio.create_task(engine.start())  # /health answers 503 until the model is loaded
        start.add_done_callback(after_engine_start)
        try:
            yield
        finally:
            if not start.done():
                start.cancel()
            await engine.stop()

    app = FastAPI(title="a8w8-serve", version=package_version(), lifespan=lifespan)
    app.openapi = lambda: _openapi_with_400(app)  # type: ignore[method-assign]
    install_error_handlers(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            allow_credentials=False,
        )
    app.add_middleware(
        RequestGuard,
        api_key=settings.api_key,
        max_body_bytes=settings.max_body_bytes,
        body_timeout_seconds=settings.body_timeout_seconds,
    )

    def ctx() -> ServingContext:
        return holder["ctx"]  # type: ignore[return-value]

    @app.get("/health", responses={503: {"description": "loading, restarting its worker, draining, or dead"}})
    async def health() -> Response:
        engine = ctx().engine
        if engine.healthy:
            return JSONResponse({"status": "ok"})
        state = engine.state
        status = "unavailable" if state is EngineState.READY else state.value  # READY with a dead worker
        return JSONResponse({"status": status, "error": engine.state_detail}, status_code=503)

    @app.get("/live", responses={503: {"description": "the engine is dead (the process is about to exit)"}})
    async def live() -> Response:
        # Liveness, apart from readiness (/health): 200 while this process's event loop answers, also while
        # the model loads or the worker restarts by itself (an orchestrator must not kill the pod for that).
        if ctx().engine.state is EngineState.DEAD:
            return JSONResponse({"status": "dead", "error": ctx().engine.state_detail}, status_code=503)
        return JSONResponse({"status": "alive", "engine": ctx().engine.state.value})

    @app.get("/version")
    async def get_version() -> dict:
        """The package version and, once the worker is up, where the model runs and on which kernels."""
        info = ctx().engine.core.worker_info
        body: dict = {"version": package_version()}
        if info is not None:
            body.update(device=info.device, backend=info.backend)
        return body

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        return Response(ctx().metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    def model_card(c: ServingContext, name: str) -> dict:
        # root names the model, not where it lies on this machine (a cache path says nothing to a client)
        return {
            "id": name,
            "object": "model",
            "created": c.created,
            "owned_by": "a8w8-serve",
            "root": c.served_model_names[0],
            "parent": None,
            "max_model_len": c.engine.max_model_len,
        }

    @app.get("/v1/models", responses=_error_responses((401,)))
    async def models() -> dict:
        c = ctx()
        return {"object": "list", "data": [model_card(c, name) for name in c.served_model_names]}

    @app.get("/v1/models/{model_id:path}", responses=_error_responses((401, 404)))
    async def retrieve_model(model_id: str) -> dict:
        c = ctx()
        if model_id not in c.served_model_names:
            raise APIError(404, f"The model `{model_id}` does not exist.", "model")
        return model_card(c, model_id)

    @app.post("/v1/chat/completions", responses=_error_responses(streams=True))
    async def chat(req: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(ctx(), req, request)

    @app.post("/v1/completions", responses=_error_responses(streams=True))
    async def completions(req: CompletionRequest, request: Request) -> Response:
        return await create_completion(ctx(), req, request)

    @app.post("/tokenize", responses=_error_responses(LOCAL_ERROR_STATUSES))
    async def tokenize(req: TokenizeRequest) -> dict:
        c = ctx()
        c.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", "prompt")
        with input_named("messages" if req.messages is not None else "prompt"):
            if req.messages is not None:
                tokens = await asyncio.to_thread(
                    chat_prompt_ids,
                    c,
                    req.messages,
                    req.add_generation_prompt,
                    req.chat_template_kwargs,
                    req.continue_final_message,
                    [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None,
                )
            else:
                tokens = await asyncio.to_thread(c.engine.core.encode_prompt, req.prompt)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": c.engine.max_model_len}

    @app.post("/detokenize", responses=_error_responses(LOCAL_ERROR_STATUSES))
    async def detokenize(req: DetokenizeRequest) -> dict:
        c = ctx()
        c.check_model(req.model)
        vocab = c.engine.tokenizer.vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is out of range [0, {vocab})", "tokens")
        return {"prompt": await asyncio.to_thread(c.engine.tokenizer.decode, req.tokens)}

    if settings.web_ui:
        mount_web_ui(app)
    return app
