"""Request bodies read as JSON and validated into their models, off the event loop when they are large.

FastAPI parses and validates a declared body on the event loop, before the route runs: a body of a million
token ids (``/detokenize``) or a 30 MB prompt holds every other client's request for that long. Routes take
their body through :func:`json_body` instead: the same validation (pydantic's own JSON parser, errors as
FastAPI's ``RequestValidationError`` with ``("body", ...)`` locations, so the error handler answers them as
before), in a thread for bodies of :data:`OFF_LOOP_BODY_BYTES` or more. The OpenAPI document still describes
each body (:func:`documented_body`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

from server.errors import APIError

# Smaller bodies are validated on the event loop (a thread hand-off costs more than they do).
OFF_LOOP_BODY_BYTES = 64 * 1024
JSON_TYPES = ("application/json",)
# Large bodies are validated on threads of their own: forty clients sending 3 MB bodies must not hold up the
# threads that tokenize other requests' prompts (asyncio's default pool).
BODY_THREADS = 2
_pool = concurrent.futures.ThreadPoolExecutor(BODY_THREADS, thread_name_prefix="a8w8-body")

M = TypeVar("M", bound=BaseModel)


def _is_json(content_type: str | None) -> bool:
    """No Content-Type, application/json or a ``+json`` type (as FastAPI accepts)."""
    if not content_type:
        return True
    kind = content_type.split(";")[0].strip().lower()
    return kind in JSON_TYPES or kind.endswith("+json")


def validate_body(model: type[M], raw: bytes) -> M:
    """``raw`` as a ``model``; RequestValidationError with FastAPI's locations where it is not one."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as e:
        raise RequestValidationError(
            [{**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False)]
        ) from None


def json_body(model: type[M], max_bytes: Callable[[Request], tuple[int, str, str]] | None = None) -> Any:
    """``Annotated[model, Depends(...)]``: the route's body, validated off the event loop when large.
    ``max_bytes(request)``: (the most bytes this route's body can usefully have, the field to name, why) for
    a route whose useful bodies are far smaller than the server's body limit: a larger declared body is a 413
    before it is read."""

    async def parse(request: Request) -> M:
        if max_bytes is not None:
            limit, param, why = max_bytes(request)
            declared = request.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                raise APIError(413, f"a body of {declared} bytes: at most {limit} ({why})", param)
        raw = await request.body()
        if not raw:
            raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required"}])
        if not _is_json(request.headers.get("content-type")):
            raise RequestValidationError(
                [{"type": "model_attributes_type", "loc": ("body",), "msg": "Input should be a JSON object"}]
            )
        if len(raw) >= OFF_LOOP_BODY_BYTES:
            return await asyncio.get_running_loop().run_in_executor(_pool, validate_body, model, raw)
        return validate_body(model, raw)

    return Annotated[model, Depends(parse)]


def documented_body(model: type[BaseModel]) -> dict[str, Any]:
    """The route's ``openapi_extra``: its JSON body, the model's schema among the components (which
    ``server.app._openapi`` adds, as FastAPI would for a declared body)."""
    schema = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
