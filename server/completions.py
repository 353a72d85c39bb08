"""``/v1/completions``: prompts (text or token ids, one or several) -> engine -> a Completion or its chunks."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from engine.async_engine import RequestOutput, RequestStream
from engine.tokenizer import Tokenizer
from server.constraints import answer_constraint
from server.context import ServingContext
from server.errors import APIError
from server.request_mapping import (
    ClientDisconnected,
    completion_prompts,
    input_named,
    refuse_a_huge_logprobs_body,
    refuse_stream_options_without_stream,
    sampling_params,
    structured_output,
)
from server.response_builder import ChoiceState, ResponseBuilder, completion_logprobs
from server.responses import Completion, CompletionChoice, CompletionChunk, CompletionUsage
from server.schemas import CompletionRequest
from server.streaming import collected_response, merge_streams, sse_response


class CompletionResponseBuilder(ResponseBuilder):
    """``n`` choices for each of the prompts (choice ``p * n + i`` is prompt ``p``'s ``i``-th) -> CompletionChunks
    or one Completion. ``echo``: each choice starts with its prompt's text; ``logprobs``: the number of top
    logprobs per token (None: no logprobs)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        request_id: str,
        model: str,
        n: int,
        prompts: list[tuple[str, list[int]]],
        *,
        echo: bool = False,
        logprobs: int | None = None,
        include_usage: bool = False,
    ):
        super().__init__(sum(len(ids) for _, ids in prompts), [ChoiceState() for _ in range(len(prompts) * n)])
        self.tokenizer, self.request_id, self.model, self.n, self.prompts = tokenizer, request_id, model, n, prompts
        self.echo, self.logprobs, self.include_usage = echo, logprobs, include_usage

    def usage(self) -> CompletionUsage:
        cached = sum(self.choices[p * self.n].cached_tokens for p in range(len(self.prompts)))
        return CompletionUsage.of(self.prompt_tokens, self.completion_tokens, cached)

    def _chunk(self, **kw: Any) -> CompletionChunk:
        return CompletionChunk(
            id=self.request_id, object="text_completion", created=int(time.time()), model=self.model, **kw
        )

    def opening(self) -> list[CompletionChunk]:
        return [
            self._chunk(choices=[CompletionChoice(index=p * self.n + i, text=text, logprobs=None, finish_reason=None)])
            for p, (text, _) in enumerate(self.prompts if self.echo else [])
            for i in range(self.n)
        ]

    def add(self, prompt_index: int, out: RequestOutput) -> None:
        self.choices[prompt_index * self.n + out.index].add(out)

    def chunk(self, prompt_index: int, out: RequestOutput) -> list[CompletionChunk]:
        idx = prompt_index * self.n + out.index
        ch = self.choices[idx]
        offset = len(ch.text)
        _, text, _ = ch.add(out)
        if not text and not out.finished and not out.new_logprobs:
            return []
        choice = CompletionChoice(
            index=idx,
            text=text,
            logprobs=completion_logprobs(self.tokenizer, out.new_logprobs, offset)
            if self.logprobs is not None
            else None,
            finish_reason=out.finish_reason if out.finished else None,
            **({"stop_reason": out.stop_reason} if out.finished else {}),  # only in the last chunk
        )
        return [self._chunk(choices=[choice])]

    def closing(self) -> list[CompletionChunk]:
        return [self._chunk(choices=[], usage=self.usage())] if self.include_usage else []

    def response(self) -> Completion:
        result = []
        for idx, ch in enumerate(self.choices):
            prefix = self.prompts[idx // self.n][0] if self.echo else ""
            result.append(
                CompletionChoice(
                    index=idx,
                    text=prefix + ch.text,
                    logprobs=completion_logprobs(self.tokenizer, ch.logprobs, len(prefix))
                    if self.logprobs is not None
                    else None,
                    finish_reason=ch.finish_reason,
                    stop_reason=ch.stop_reason,
                )
            )
        return Completion(
            id=self.request_id,
            object="text_completion",
            created=int(time.time()),
            model=self.model,
            choices=result,
            usage=self.usage(),
        )


async def create_completion(ctx: ServingContext, req: CompletionRequest, request: Request) -> Response:
    with input_named("prompt"):
        try:
            return await _completion(ctx, req, request)
        except ClientDisconnected:
            ctx.metrics.observe_aborted()
            return Response(status_code=499)


async def _completion(ctx: ServingContext, req: CompletionRequest, request: Request) -> Response:
    model = ctx.check_model(req.model)
    refuse_stream_options_without_stream(req)
    constraint = answer_constraint(req)
    if req.suffix:
        raise APIError(400, "suffix is not supported", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, "best_of is not supported (only best_of equal to n, the default)", "best_of")
    prompts = await asyncio.to_thread(completion_prompts, ctx, req.prompt)
    params = sampling_params(ctx, req, req.max_tokens if req.max_tokens is not None else 16, req.logprobs)
    for _, ids in prompts:  # every cheap check first: the grammar is compiled only for a request that will run
        ctx.engine.check_request(ids, params, req.priority)
    lengths = [len(ids) for _, ids in prompts]
    refuse_a_huge_logprobs_body(ctx, req.stream, params.n, lengths, params.max_tokens, req.logprobs)
    params = dataclasses.replace(params, structured=await structured_output(ctx, constraint, request))
    request_id = f"cmpl-{uuid.uuid4().hex}"
    streams: list[RequestStream] = []
    try:
        for i, (_, ids) in enumerate(prompts):
            streams.append(ctx.engine.add_request(ids, params, f"{request_id}-{i}", priority=req.priority))
    except Exception:
        for s in streams:
            ctx.engine.abort(s.request_id)
        raise
    ctx.metrics.observe_request("completions")
    builder = CompletionResponseBuilder(
        ctx.engine.tokenizer,
        request_id,
        model,
        params.n,
        prompts,
        echo=req.echo,
        logprobs=req.logprobs,
        include_usage=bool(req.stream and req.stream_options and req.stream_options.include_usage),
    )
    if req.stream:
        return sse_response(ctx, request, [s.request_id for s in streams], merge_streams(streams), builder)
    return await collected_response(ctx, request, merge_streams(streams), builder)
