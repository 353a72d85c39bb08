"""What every generating endpoint shares on the wire: server-sent events with an error event and ``[DONE]`` at the
end, one JSON body collected off the event loop, and a client's disconnect aborting its requests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from sse_starlette.sse import EventSourceResponse

from engine.async_engine import RequestOutput, RequestStream
from server.context import ServingContext
from server.errors import to_api_error
from server.guard import USAGE_STATE_KEY
from server.metrics import ServerMetrics
from server.response_builder import ResponseBuilder
from server.responses import ResponseBody

DONE = "[DONE]"


def json_response(body: ResponseBody, status_code: int = 200) -> Response:
    """``body`` serialized by its model (compact JSON, UTF-8)."""
    return Response(body.serialized(), status_code=status_code, media_type="application/json")


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client goes away (the body has been read, so the next message is a disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_unless_disconnected(request: Request, coro, metrics: ServerMetrics) -> Any:
    """Await ``coro``; if the client disconnects first, cancel it (which aborts its requests)."""
    task = asyncio.ensure_future(coro)
    listener = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait({task, listener}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass
        metrics.observe_aborted()
        return Response(status_code=499)
    finally:
        listener.cancel()
        if not task.done():
            task.cancel()


async def merge_streams(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' outputs as they come: (stream index, output)."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()
    sentinel = object()

    async def pump(i: int, s: RequestStream) -> None:
        try:
            async for out in s:
                await queue.put((i, out))
        except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
            await queue.put((i, e))
        finally:
            await queue.put((i, sentinel))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(streams)
    try:
        while remaining:
            i, item = await queue.get()
            if item is sentinel:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def indexed(stream: RequestStream) -> AsyncIterator[tuple[int, RequestOutput]]:
    """One request's outputs as (prompt index 0, output), the shape :func:`merge_streams` gives."""
    async for out in stream:
        yield 0, out


def note_usage(request: Request, builder: ResponseBuilder) -> None:
    """Leave the request's token counts for its log line (server/guard.py)."""
    setattr(request.state, USAGE_STATE_KEY, (builder.prompt_tokens, builder.completion_tokens))


def sse_response(
    ctx: ServingContext,
    request: Request,
    request_ids: list[str],
    outputs: AsyncIterator[tuple[int, RequestOutput]],
    builder: ResponseBuilder,
) -> EventSourceResponse:
    """The SSE skeleton every streaming endpoint shares: the builder's opening events, one chunk per output
    (:meth:`ResponseBuilder.chunk` of (prompt index, output); None: nothing to send), then its closing events
    and ``[DONE]``. A client that goes away aborts ``request_ids``; an error after the stream started is one
    data event (the status line has been sent)."""

    async def events() -> AsyncIterator[str | dict[str, str]]:
        try:
            for event in builder.opening():
                yield builder.event(event)
            async for p, out in outputs:
                if out.finished:
                    ctx.metrics.observe_finished(out)
                for event in builder.chunk(p, out):
                    yield builder.event(event)
            note_usage(request, builder)
            for event in builder.closing():
                yield builder.event(event)
        except (asyncio.CancelledError, GeneratorExit):
            for rid in request_ids:
                ctx.engine.abort(rid)
            ctx.metrics.observe_aborted()
            raise
        except Exception as e:
            err = to_api_error(e)
            yield builder.error_event(err.status, err.message, err.param)
        if builder.done_event:
            yield DONE

    return EventSourceResponse(events(), ping=15)


async def collected_response(
    ctx: ServingContext, request: Request, outputs: AsyncIterator[tuple[int, RequestOutput]], builder: ResponseBuilder
) -> Response:
    """The answer without streaming: every output recorded, then the builder's response as one JSON body (built
    and serialized in a thread: n long answers with logprobs make a body of many MB). A client that goes away
    first aborts the requests (499)."""

    async def collect() -> Response:
        async for p, out in outputs:
            builder.add(p, out)
            if out.finished:
                ctx.metrics.observe_finished(out)
        note_usage(request, builder)
        return await asyncio.to_thread(lambda: json_response(builder.response()))

    return await run_unless_disconnected(request, collect(), ctx.metrics)
