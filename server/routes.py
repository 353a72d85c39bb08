"""The HTTP routes: OpenAI's /v1 API, tokenize and detokenize, health, liveness, version and metrics.

Each route gets the server's :class:`~server.serving.ServingContext` (engine, metrics, served names) through a
dependency on ``app.state.serving``, which the app's lifespan sets when the engine starts (server/app.py).
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from engine.async_engine import EngineState
from server.errors import ERROR_TYPES, APIError
from server.schemas import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, ErrorResponse, TokenizeRequest
from server.serving import ServingContext, chat_prompt_ids, create_chat_completion, create_completion, input_named
from server.version import package_version

# Statuses every POST route can answer with an OpenAI-style error body (documented in /openapi.json).
ERROR_STATUSES = (400, 401, 404, 408, 413, 429, 500, 503)
# The same for the routes outside /v1 that never reach the worker (no API key, no queue).
LOCAL_ERROR_STATUSES = (400, 404, 408, 413, 503)


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


def serving_context(request: Request) -> ServingContext:
    """The dependency every route takes: the context the lifespan built."""
    return request.app.state.serving


Serving = Annotated[ServingContext, Depends(serving_context)]
router = APIRouter()


@router.get("/health", responses={503: {"description": "loading, restarting its worker, draining, or dead"}})
async def health(c: Serving) -> Response:
    engine = c.engine
    if engine.healthy:
        return JSONResponse({"status": "ok"})
    state = engine.state
    status = "unavailable" if state is EngineState.READY else state.value  # READY with a dead worker
    return JSONResponse({"status": status, "error": engine.state_detail}, status_code=503)


@router.get("/live", responses={503: {"description": "the engine is dead (the process is about to exit)"}})
async def live(c: Serving) -> Response:
    # Liveness, apart from readiness (/health): 200 while this process's event loop answers, also while
    # the model loads or the worker restarts by itself (an orchestrator must not kill the pod for that).
    if c.engine.state is EngineState.DEAD:
        return JSONResponse({"status": "dead", "error": c.engine.state_detail}, status_code=503)
    return JSONResponse({"status": "alive", "engine": c.engine.state.value})


@router.get("/version")
async def get_version(c: Serving) -> dict:
    """The package version and, once the worker is up, where the model runs and on which kernels."""
    info = c.engine.core.worker_info
    body: dict = {"version": package_version()}
    if info is not None:
        body.update(device=info.device, backend=info.backend)
    return body


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(c: Serving) -> Response:
    return Response(c.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


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


@router.get("/v1/models", responses=_error_responses((401,)))
async def models(c: Serving) -> dict:
    return {"object": "list", "data": [model_card(c, name) for name in c.served_model_names]}


@router.get("/v1/models/{model_id:path}", responses=_error_responses((401, 404)))
async def retrieve_model(model_id: str, c: Serving) -> dict:
    if model_id not in c.served_model_names:
        raise APIError(404, f"The model `{model_id}` does not exist.", "model")
    return model_card(c, model_id)


@router.post("/v1/chat/completions", responses=_error_responses(streams=True))
async def chat(req: ChatCompletionRequest, request: Request, c: Serving) -> Response:
    return await create_chat_completion(c, req, request)


@router.post("/v1/completions", responses=_error_responses(streams=True))
async def completions(req: CompletionRequest, request: Request, c: Serving) -> Response:
    return await create_completion(c, req, request)


@router.post("/tokenize", responses=_error_responses(LOCAL_ERROR_STATUSES))
async def tokenize(req: TokenizeRequest, c: Serving) -> dict:
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


@router.post("/detokenize", responses=_error_responses(LOCAL_ERROR_STATUSES))
async def detokenize(req: DetokenizeRequest, c: Serving) -> dict:
    c.check_model(req.model)
    vocab = c.engine.tokenizer.vocab_size
    bad = [t for t in req.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"token id {bad[0]} is out of range [0, {vocab})", "tokens")
    return {"prompt": await asyncio.to_thread(c.engine.tokenizer.decode, req.tokens)}
