"""The FastAPI application: lifespan (engine start/stop), middleware, the OpenAPI document; the routes are in
server/routes.py."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema

from engine.async_engine import AsyncEngine
from engine.client import EngineClient
from server.api_docs import mount_api_docs
from server.config import ServerSettings
from server.context import ServingContext
from server.errors import install_error_handlers
from server.guard import RequestGuard
from server.messages_schemas import CountTokensRequest, MessagesRequest, MessageStreamEvent
from server.metrics import ServerMetrics
from server.response_store import ResponseStore
from server.responses import STREAM_CHUNKS
from server.responses_schemas import ResponsesRequest, ResponseStreamEvent
from server.routes import router
from server.schemas import REQUEST_BODIES
from server.startup import startup_summary, startup_warnings
from server.version import package_version
from server.web_ui import mount_web_ui

log = logging.getLogger("a8w8.server")


def _openapi(app: FastAPI) -> dict:
    """FastAPI's OpenAPI document, with three corrections. Request-validation failures are documented as 400
    with an OpenAI-style error body, which this server answers, not as FastAPI's 422 (clients and
    schema-driven testers compare the two). And the streamed chunk models, which the event streams' item
    schemas reference, join the component schemas (FastAPI collects only the models of JSON bodies). And so do the
    request bodies, which the routes read themselves (off the event loop when large)."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        _, chunks = models_json_schema(
            [(model, "serialization") for model in STREAM_CHUNKS + (ResponseStreamEvent, MessageStreamEvent)],
            ref_template="#/components/schemas/{model}",
        )
        for name, definition in chunks.get("$defs", {}).items():
            components.setdefault(name, definition)
        # the request bodies, which the routes validate themselves (server/request_body.py)
        _, bodies = models_json_schema(
            [
                (model, "validation")
                for model in REQUEST_BODIES + (ResponsesRequest, MessagesRequest, CountTokensRequest)
            ],
            ref_template="#/components/schemas/{model}",
        )
        for name, definition in bodies.get("$defs", {}).items():
            components.setdefault(name, definition)
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(settings: ServerSettings, on_fatal: Callable[[str], None] | None = None) -> FastAPI:
    """Build the app; the engine (and its worker process) starts in the lifespan, in the background.
    ``on_fatal(reason)`` is called when the engine cannot serve any more (its worker failed to start, or
    kept dying): the process should then exit non-zero. The engine is ``app.state.engine`` once started, and
    the routes (server/routes.py) find their ServingContext at ``app.state.serving``."""

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
        engine: EngineClient = app.state.engine
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
            responses=ResponseStore(settings.responses_store_max_count, settings.responses_store_max_bytes),
        )
        app.state.serving, app.state.engine = ctx, engine
        start = asyncio.create_task(engine.start())  # /health answers 503 until the model is loaded
        start.add_done_callback(after_engine_start)
        try:
            yield
        finally:
            if not start.done():
                start.cancel()
            await engine.stop()

    # FastAPI's /docs and /redoc load their scripts from a CDN: replaced by pages served from the package
    app = FastAPI(title="a8w8-serve", version=package_version(), lifespan=lifespan, docs_url=None, redoc_url=None)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
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

    app.include_router(router)
    mount_api_docs(app)
    if settings.web_ui:
        mount_web_ui(app)
    return app
