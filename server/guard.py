"""The ASGI layer in front of every route: API key, request body limit, body timeout, one log line per request.

It is plain ASGI (not Starlette's ``BaseHTTPMiddleware``) so that it sees the body as it arrives: a body is
read up to the limit whether or not it declares a ``Content-Length`` (a chunked upload can no longer grow
the process without bound), then handed to the app in one piece. The memory a request can take before
any route runs is therefore bounded by the limit. After a large body has been answered, the C allocator is
asked to return its free memory to the system (glibc's ``malloc_trim``): it otherwise keeps the hundreds of
MiB that parsing and tokenizing a 30 MB body took, in every process that ever received one.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import hmac
import json
import logging
import threading
import time

from server.errors import error_format_for

log = logging.getLogger("a8w8.server")

# After a body passes the limit, the rest is read and discarded for at most this long before the 413 is
# sent: a client that is still uploading only reads a response once its upload is done (closing on it
# mid-upload makes its TCP stack see a reset instead of the answer). A client that keeps sending past
# this gets the 413 and a closed connection.
DISCARD_SECONDS = 5.0
# Probes and scrapes are logged at debug level: one a second would otherwise fill the log.
QUIET_PATHS = frozenset({"/health", "/live", "/metrics"})
# Where a generation route records (prompt_tokens, completion_tokens) in request.state for the request's log line.
USAGE_STATE_KEY = "usage"
# Bodies from this size on are followed by a malloc_trim (see the module docstring); smaller ones leave too little
# behind to be worth the call (a few ms on a large heap).
TRIM_AFTER_BODY_BYTES = 1 << 20


def _malloc_trim() -> ctypes._CFuncPtr | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


class _Trimmer:
    """Runs malloc_trim(0) on a background thread, one at a time (requests that end during a trim share it)."""

    def __init__(self):
        self._trim = _malloc_trim()
        self._busy = threading.Lock()

    def request(self) -> None:
        if self._trim is not None and self._busy.acquire(blocking=False):
            threading.Thread(target=self._run, name="malloc-trim", daemon=True).start()

    def _run(self) -> None:
        try:
            self._trim(0)
        finally:
            self._busy.release()


async def send_error(
    send, scope, status: int, message: str, headers: dict[str, str] | None = None, close: bool = False
) -> None:
    """A JSON error in the shape of the API the request's path belongs to, as a complete ASGI response."""
    body = json.dumps(error_format_for(scope["path"])(status, message, None)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    if close:
        raw.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    def __init__(self, message: str, body_done: bool):
        super().__init__(message)
        self.body_done = body_done  # the whole body has been received (nothing left to discard)


class _BodyTimeout(Exception):
    pass


class RequestGuard:
    """Wraps the app: see the module docstring. ``body_timeout_seconds`` bounds the wait for each piece of
    a request body (a client that stops sending mid-body gets 408 instead of holding the request open)."""

    def __init__(self, app, *, api_key: str | None, max_body_bytes: int, body_timeout_seconds: float):
        self.app = app
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout_seconds
        self._trimmer = _Trimmer()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 0

        async def send_and_note(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        state = scope.setdefault("state", {})  # (a route's request.state: generation routes leave their usage)
        try:
            await self._guarded(scope, receive, send_and_note)
        finally:
            level = logging.DEBUG if scope["path"] in QUIET_PATHS else logging.INFO
            # For a stream this is when the stream ended, so the duration is the whole response's.
            usage = state.get(USAGE_STATE_KEY)
            tokens = f" prompt_tokens={usage[0]} completion_tokens={usage[1]}" if usage else ""
            log.log(level, "%s %s %d %.3fs%s", scope["method"], scope["path"], status, time.perf_counter() - t0, tokens)

    def _authorized(self, scope) -> bool:
        if not self.api_key or not scope["path"].startswith("/v1/") or scope["method"] == "OPTIONS":
            return True  # (a CORS preflight carries no credentials)
        headers = dict(scope["headers"])
        auth = headers.get(b"authorization", b"").decode("latin-1")
        # OpenAI's clients send Authorization: Bearer; Anthropic's send x-api-key (either is taken on any route)
        given = auth[7:] if auth.lower().startswith("bearer ") else headers.get(b"x-api-key", b"").decode("latin-1")
        return hmac.compare_digest(given.encode(), self.api_key.encode())

    async def _guarded(self, scope, receive, send) -> None:
        if not self._authorized(scope):
            await send_error(
                send, scope, 401, "invalid or missing API key (Authorization: Bearer <key>, or x-api-key: <key>)"
            )
            return
        declared = dict(scope["headers"]).get(b"content-length")
        try:
            if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
                raise _BodyTooLarge(
                    f"request body of {int(declared)} bytes exceeds the limit of {self.max_body_bytes}", body_done=False
                )
            body = await self._read_body(receive)
        except _BodyTooLarge as e:
            if not e.body_done:
                await self._discard_rest(receive)
            await send_error(send, scope, 413, str(e), close=True)
            return
        except _BodyTimeout as e:
            await send_error(send, scope, 408, str(e), close=True)
            return
        if body is None:  # the client left before sending its body
            return
        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect the streaming routes listen for

        try:
            await self.app(scope, replay, send)
        finally:
            if len(body) >= TRIM_AFTER_BODY_BYTES:
                del body
                self._trimmer.request()

    async def _receive(self, receive):
        try:
            return await asyncio.wait_for(receive(), self.body_timeout)
        except TimeoutError:
            raise _BodyTimeout(f"no request body data for {self.body_timeout:g} s") from None

    async def _read_body(self, receive) -> bytes | None:
        parts: list[bytes] = []
        size = 0
        while True:
            message = await self._receive(receive)
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _BodyTooLarge(
                    f"request body exceeds the limit of {self.max_body_bytes} bytes",
                    body_done=not message.get("more_body", False),
                )
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts)

    async def _discard_rest(self, receive) -> None:
        deadline = time.monotonic() + DISCARD_SECONDS
        while (left := deadline - time.monotonic()) > 0:
            try:
                message = await asyncio.wait_for(receive(), left)
            except TimeoutError:
                return
            if message["type"] == "http.disconnect" or not message.get("more_body", False):
                return
