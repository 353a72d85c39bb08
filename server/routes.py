"""The HTTP routes: OpenAI's /v1 API, tokenize and detokenize, health, liveness, version and metrics.

Each route gets the server's :class:`~server.context.ServingContext` (engine, metrics, served names) through a
dependency on ``app.state.serving``, which the app's lifespan sets when the engine starts (server/app.py).
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse, Response
from pydantic import BaseModel

from engine.async_engine import EngineState
from server.chat import create_chat_completion
from server.completions import create_completion
from server.context import ServingContext
from server.errors import ERROR_TYPES, APIError
from server.messages_api import count_tokens, create_message
from server.messages_schemas import (
    AnthropicError,
    CountTokensRequest,
    Message,
    MessagesRequest,
    MessageStreamEvent,
    TokenCount,
)
from server.request_body import documented_body, json_body
from server.request_mapping import chat_prompt_ids, input_named
from server.responses import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    DetokenizeResponse,
    ErrorResponse,
    HealthStatus,
    ModelCard,
    ModelList,
    TokenizeResponse,
    VersionInfo,
)
from server.responses_api import create_response, delete_response, retrieve_response
from server.responses_schemas import DeletedResponse, ResponsesRequest, ResponseStreamEvent
from server.responses_schemas import Response as ResponseObject
from server.schemas import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from server.streaming import DONE, json_response
from server.version import package_version

# Statuses every POST route can answer with an OpenAI-style error body (documented in /openapi.json).
ERROR_STATUSES = (400, 401, 404, 408, 413, 429, 500, 503)
# The same for the routes outside /v1 that never reach the worker (no API key, no queue).
LOCAL_ERROR_STATUSES = (400, 404, 408, 413, 503)


def component_ref(model: type[BaseModel]) -> dict[str, str]:
    """A JSON-schema reference to ``model`` among the OpenAPI document's component schemas."""
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _error_responses(
    statuses: tuple[int, ...] = ERROR_STATUSES,
    streams: tuple[type[BaseModel], type[BaseModel]] | None = None,
    error_model: type[BaseModel] = ErrorResponse,
    done: bool = True,
) -> dict[int | str, dict]:
    """OpenAPI ``responses`` for a route: its error statuses with their body (``error_model``: the API's error
    shape), and (``streams``: the response and the chunk or event model) the success answered either as one JSON
    object or as server-sent events whose data are chunks (OpenAPI 3.2's ``itemSchema``, as FastAPI documents its
    own event streams); ``done``: the stream ends with OpenAI's ``[DONE]`` (else its events are named, the Responses
    and Messages APIs')."""
    responses: dict[int | str, dict] = {
        status: {"model": error_model, "description": ERROR_TYPES.get(status, "error")} for status in statuses
    }
    if streams is not None:
        body, chunk = streams
        json_data = {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {"anyOf": [component_ref(chunk), component_ref(error_model)]},
        }
        if done:  # the last event's data is the literal [DONE] (OpenAI's end of stream), not JSON
            properties: dict[str, Any] = {"data": {"anyOf": [{"const": DONE}, json_data]}}
            end = ", then [DONE]"
        else:  # each event named by its type
            properties = {"event": {"type": "string"}, "data": json_data}
            end = ", each named by its type"
        responses[200] = {
            "model": body,
            "content": {
                "text/event-stream": {"itemSchema": {"type": "object", "properties": properties, "required": ["data"]}}
            },
            "description": f"a {body.__name__}; with stream=true, server-sent events whose data are each a "
            f"{chunk.__name__} (an {error_model.__name__} if the request fails after the stream started){end}",
        }
    return responses


def serving_context(request: Request) -> ServingContext:
    """The dependency every route takes: the context the lifespan built."""
    return request.app.state.serving


Serving = Annotated[ServingContext, Depends(serving_context)]
router = APIRouter()


def _status(description: str) -> dict[int | str, dict]:
    """OpenAPI ``responses`` of a status route: 200 and 503, both with a :class:`HealthStatus`."""
    return {200: {"model": HealthStatus}, 503: {"model": HealthStatus, "description": description}}


@router.get("/health", responses=_status("loading, restarting its worker, its worker stalled, draining, or dead"))
async def health(c: Serving) -> Response:
    engine = c.engine
    if engine.healthy:
        return json_response(HealthStatus(status="ok"))
    stalled = engine.stalled()
    if stalled is not None:
        return json_response(HealthStatus(status="stalled", error=stalled), status_code=503)
    state = engine.state
    status = "unavailable" if state is EngineState.READY else state.value  # READY with a dead worker
    return json_response(HealthStatus(status=status, error=engine.state_detail), status_code=503)


@router.get("/live", responses=_status("the engine is dead (the process is about to exit)"))
async def live(c: Serving) -> Response:
    # Liveness, apart from readiness (/health): 200 while this process's event loop answers, also while
    # the model loads or the worker restarts by itself (an orchestrator must not kill the pod for that).
    if c.engine.state is EngineState.DEAD:
        return json_response(HealthStatus(status="dead", error=c.engine.state_detail), status_code=503)
    return json_response(HealthStatus(status="alive", engine=c.engine.state.value))


@router.get("/version", response_model=VersionInfo)
async def get_version(c: Serving) -> Response:
    """The package version and, once the worker is up, where the model runs and on which kernels."""
    info = c.engine.worker_info
    if info is None:
        return json_response(VersionInfo(version=package_version()))
    return json_response(VersionInfo(version=package_version(), device=info.device, backend=info.backend))


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(c: Serving) -> Response:
    return Response(c.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def model_card(c: ServingContext, name: str) -> ModelCard:
    # root names the model, not where it lies on this machine (a cache path says nothing to a client)
    return ModelCard(
        id=name,
        object="model",
        created=c.created,
        owned_by="a8w8-serve",
        root=c.served_model_names[0],
        parent=None,
        max_model_len=c.engine.max_model_len,
    )


@router.get("/v1/models", response_model=ModelList, responses=_error_responses((401,)))
async def models(c: Serving) -> Response:
    return json_response(ModelList(object="list", data=[model_card(c, name) for name in c.served_model_names]))


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=_error_responses((401, 404)))
async def retrieve_model(model_id: str, c: Serving) -> Response:
    if model_id not in c.served_model_names:
        raise APIError(404, f"The model `{model_id}` does not exist.", "model")
    return json_response(model_card(c, model_id))


@router.post(
    "/v1/chat/completions",
    responses=_error_responses(streams=(ChatCompletion, ChatCompletionChunk)),
    openapi_extra=documented_body(ChatCompletionRequest),
)
async def chat(req: json_body(ChatCompletionRequest), request: Request, c: Serving) -> Response:
    return await create_chat_completion(c, req, request)


@router.post(
    "/v1/completions",
    responses=_error_responses(streams=(Completion, CompletionChunk)),
    openapi_extra=documented_body(CompletionRequest),
)
async def completions(req: json_body(CompletionRequest), request: Request, c: Serving) -> Response:
    return await create_completion(c, req, request)


@router.post(
    "/v1/responses",
    responses=_error_responses(streams=(ResponseObject, ResponseStreamEvent), done=False),
    openapi_extra=documented_body(ResponsesRequest),
)
async def responses(req: json_body(ResponsesRequest), request: Request, c: Serving) -> Response:
    """OpenAI's Responses API (server/responses_api.py)."""
    return await create_response(c, req, request)


@router.get("/v1/responses/{response_id}", response_model=ResponseObject, responses=_error_responses((401, 404)))
async def get_response(response_id: str, c: Serving) -> Response:
    """A stored response (``store``: the default), as it was returned."""
    return retrieve_response(c, response_id)


@router.delete("/v1/responses/{response_id}", response_model=DeletedResponse, responses=_error_responses((401, 404)))
async def remove_response(response_id: str, c: Serving) -> Response:
    return delete_response(c, response_id)


@router.post(
    "/v1/messages",
    responses=_error_responses(streams=(Message, MessageStreamEvent), error_model=AnthropicError, done=False),
    openapi_extra=documented_body(MessagesRequest),
)
async def messages(req: json_body(MessagesRequest), request: Request, c: Serving) -> Response:
    """Anthropic's Messages API (server/messages_api.py); errors in Anthropic's shape."""
    return await create_message(c, req, request)


@router.post(
    "/v1/messages/count_tokens",
    response_model=TokenCount,
    responses=_error_responses(LOCAL_ERROR_STATUSES + (401,), error_model=AnthropicError),
    openapi_extra=documented_body(CountTokensRequest),
)
async def messages_count_tokens(req: json_body(CountTokensRequest), c: Serving) -> Response:
    """The prompt tokens a Messages request with these fields has."""
    return await count_tokens(c, req)


@router.post(
    "/tokenize",
    response_model=TokenizeResponse,
    responses=_error_responses(LOCAL_ERROR_STATUSES),
    openapi_extra=documented_body(TokenizeRequest),
)
async def tokenize(req: json_body(TokenizeRequest), c: Serving) -> Response:
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
            tokens = await asyncio.to_thread(c.engine.encode_prompt, req.prompt)
    return json_response(TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=c.engine.max_model_len))


# A token id takes at most this many bytes in a JSON list (digits, a comma, a space); the rest of the body this.
DETOKENIZE_BYTES_PER_ID = 12
DETOKENIZE_BODY_SLACK_BYTES = 4096


def detokenize_body_limit(request: Request) -> tuple[int, str, str]:
    """The most bytes a /detokenize body of a context's worth of ids takes."""
    ids = request.app.state.serving.engine.max_model_len or 0
    limit = ids * DETOKENIZE_BYTES_PER_ID + DETOKENIZE_BODY_SLACK_BYTES
    return limit, "tokens", f"enough for {ids} token ids, the model's context, the most one call takes"


@router.post(
    "/detokenize",
    response_model=DetokenizeResponse,
    responses=_error_responses(LOCAL_ERROR_STATUSES),
    openapi_extra=documented_body(DetokenizeRequest),
)
async def detokenize(req: json_body(DetokenizeRequest, detokenize_body_limit), c: Serving) -> Response:
    c.check_model(req.model)
    limit = c.engine.max_model_len or 0  # (no sequence of this model holds more tokens)
    if len(req.tokens) > limit:
        raise APIError(400, f"{len(req.tokens)} tokens: at most {limit} (the model's context) per call", "tokens")
    vocab = c.engine.tokenizer.vocab_size
    bad = [t for t in req.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"token id {bad[0]} is out of range [0, {vocab})", "tokens")
    return json_response(DetokenizeResponse(prompt=await asyncio.to_thread(c.engine.tokenizer.decode, req.tokens)))
