"""Errors in each API's own shape, with the right status: OpenAI's ``{"error": {"message", "type", "param",
"code"}}`` everywhere but under Anthropic's Messages API (``/v1/messages``), which answers Anthropic's ``{"type":
"error", "error": {"type", "message"}}``. :func:`error_format_for` says which a path gets."""

from __future__ import annotations

import logging
from collections.abc import Callable
from http import HTTPStatus

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.async_engine import EngineOverloaded, EngineUnavailable, RequestFailed
from engine.chat_template import ChatTemplateError
from engine.sampling_params import InvalidRequest
from server.responses import ErrorBody, ErrorResponse

log = logging.getLogger("a8w8.server")

# Seconds a client should wait before retrying an overloaded server.
RETRY_AFTER_SECONDS = 1

ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    408: "RequestTimeoutError",
    413: "RequestTooLargeError",
    429: "RateLimitError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


def error_type(status: int) -> str:
    """The ``type`` of an error body: the table's, else the status phrase as one word (405 ->
    ``MethodNotAllowedError``), in the same style as every other error."""
    if status in ERROR_TYPES:
        return ERROR_TYPES[status]
    return "".join(w.capitalize() for w in HTTPStatus(status).phrase.replace("-", " ").split()) + "Error"


def error_body(status: int, message: str, param: str | None = None) -> dict:
    """The error's body as a dict (the plain-ASGI guard and the SSE error event serialize it themselves)."""
    return ErrorResponse(error=ErrorBody(message=message, type=error_type(status), param=param, code=status)).as_dict()


# Anthropic's error types by status (its API reference, "Errors"); any other status is an api_error.
ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    529: "overloaded_error",
}
ANTHROPIC_API_PREFIX = "/v1/messages"


def anthropic_error_body(status: int, message: str, param: str | None = None) -> dict:
    """Anthropic's error body; its shape has no ``param``, so the field at fault leads the message."""
    if param and not message.startswith(param):
        message = f"{param}: {message}"
    return {"type": "error", "error": {"type": ANTHROPIC_ERROR_TYPES.get(status, "api_error"), "message": message}}


ErrorFormat = Callable[[int, str, "str | None"], dict]


def error_format_for(path: str) -> ErrorFormat:
    """The error body of the API a request path belongs to."""
    if path == ANTHROPIC_API_PREFIX or path.startswith(ANTHROPIC_API_PREFIX + "/"):
        return anthropic_error_body
    return error_body


def error_response(
    status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None, path: str = ""
) -> JSONResponse:
    return JSONResponse(error_format_for(path)(status, message, param), status_code=status, headers=headers)


def to_api_error(exc: BaseException) -> APIError:
    """Map engine exceptions to HTTP errors (bad input is never a 500)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidRequest):
        return APIError(400, str(exc), exc.param)
    if isinstance(exc, ChatTemplateError):
        return APIError(400, str(exc), "messages")
    if isinstance(exc, EngineOverloaded):
        return APIError(429, str(exc), headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    if isinstance(exc, EngineUnavailable):
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after is not None else None
        return APIError(503, str(exc), headers=headers)
    if isinstance(exc, RequestFailed):  # a server-side failure confined to this request
        log.error("request failed: %s", exc)
        return APIError(500, str(exc))
    log.exception("unexpected error", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}")


def _body_problem(error: dict, content_type: str | None) -> str:
    """What is wrong with a request body that is not a JSON object, in the client's terms."""
    if error.get("type") == "missing":
        return "the request has no body: send a JSON object with Content-Type: application/json"
    sent = (content_type or "").split(";")[0].strip()
    if sent and sent != "application/json":
        return (
            f"the request body must be a JSON object sent with Content-Type: application/json (it was sent as {sent})"
        )
    return "the request body must be a JSON object"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        path = request.url.path
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":  # (pydantic's JSON parser: the reason says where)
            reason = (first.get("ctx") or {}).get("error", "invalid JSON")
            if "surrogate" in reason or "hex escape" in reason:
                reason = f"a \\uD800-\\uDFFF escape that is not half of a surrogate pair is not text ({reason})"
            return error_response(400, f"the request body is not valid JSON: {reason}", "body", path=path)
        if tuple(first.get("loc", ())) == ("body",):  # the body as a whole: missing, or not a JSON object
            return error_response(400, _body_problem(first, request.headers.get("content-type")), "body", path=path)
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        return error_response(400, f"{param}: {msg}" if param else msg, param, path=path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # (keeps the exception's headers: a 405's Allow, which RFC 9110 requires, lists the route's methods)
        headers = getattr(exc, "headers", None)
        return error_response(exc.status_code, str(exc.detail), headers=headers, path=request.url.path)

    async def _mapped(request: Request, exc: Exception) -> JSONResponse:
        err = to_api_error(exc)
        return error_response(err.status, err.message, err.param, err.headers, path=request.url.path)

    for exc_class in (APIError, InvalidRequest, ChatTemplateError, EngineOverloaded, EngineUnavailable, RequestFailed):
        app.add_exception_handler(exc_class, _mapped)
