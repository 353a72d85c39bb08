"""The asyncio face of the engine: the event loop never blocks on the worker.

One engine thread runs ``EngineCore.step`` in a loop (the worker computes in its own process);
requests and aborts reach it through a thread-safe queue, outputs return to each request's
``asyncio.Queue`` with ``call_soon_threadsafe``. Steps are not overlapped: the next step is prepared
after the previous one's tokens are known (the worker computes for milliseconds per step at these
sizes; overlapping would need speculative scheduling).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from engine.core import EngineConfig, EngineCore
from engine.request import Sequence, TokenLogprob
from engine.sampling_params import InvalidRequest, SamplingParams
from npu.client import WorkerError

log = logging.getLogger("a8w8.engine")
# How long the idle engine thread waits for a command before checking for shutdown.
IDLE_WAIT_SECONDS = 0.1
STATS_LOG_INTERVAL_SECONDS = 10.0


class EngineDead(RuntimeError):
    """The worker died or the engine thread stopped; no request can be served."""


class EngineOverloaded(RuntimeError):
    """The waiting queue is past its bound (HTTP 429)."""


@dataclass
class RequestOutput:
    """One choice's progress, as one step changed it."""

    request_id: str
    index: int
    new_text: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob]
    finished: bool
    finish_reason: str | None
    stop_reason: str | int | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    arrival: float = 0.0
    first_scheduled: float | None = None
    first_token: float | None = None
    finished_at: float | None = None
    token_times: list[float] = field(default_factory=list)


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    num_free_blocks: int = 0
    num_blocks: int = 0
    num_preemptions: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    steps: int = 0
    step_seconds_total: float = 0.0
    compute_seconds_total: float = 0.0


class RequestStream:
    """Async iterator over one request's outputs; closing it early aborts the request."""

    def __init__(self, engine: "AsyncEngine", request_id: str, seqs: list[Sequence]):
        self.engine, self.request_id, self.seqs = engine, request_id, seqs
        self.queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._remaining = len(seqs)  # choices the consumer has not seen finish
        self.undelivered_finishes = len(seqs)  # choices whose final output was not yet queued
        self.prompt_tokens = len(seqs[0].prompt_token_ids)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        try:
            while self._remaining:
                item = await self.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    self._remaining -= 1
                yield item
        finally:
            if self._remaining:
                self.engine.abort(self.request_id)


class AsyncEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.core = EngineCore(config)
        self.tokenizer = self.core.tokenizer
        self.chat_template = self.core.chat_template
        self.generation_defaults = self.core.generation_defaults
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self.ready = threading.Event()
        self.dead: str | None = None
        self.stats = EngineStats()
        self._request_ids = itertools.count()
        self._pending_adds = 0

    # ---- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        """Wait (off the event loop) for the worker to load, then start the engine thread."""
        self._loop = asyncio.get_running_loop()
        try:
            await asyncio.to_thread(self.core.wait_ready)
        except WorkerError as e:
            self.dead = str(e)
            raise
        self._thread = threading.Thread(target=self._run, name="a8w8-engine", daemon=True)
        self._thread.start()
        self.ready.set()

    async def stop(self) -> None:
        self._stopping.set()
        self._commands.put(("wake", None))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
        await asyncio.to_thread(self.core.shutdown)

    @property
    def max_model_len(self) -> int:
        return self.core.max_model_len

    @property
    def healthy(self) -> bool:
        return self.ready.is_set() and self.dead is None and self.core.worker.alive

    # ---- requests ---------------------------------------------------------------------------
    def new_request_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._request_ids)}-{time.monotonic_ns():x}"

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    priority: int = 0) -> RequestStream:
        """Validate and enqueue; raises InvalidRequest, EngineOverloaded or EngineDead synchronously."""
        if self.dead is not None:
            raise EngineDead(self.dead)
        if not self.ready.is_set():
            raise EngineDead("the model is still loading")
        if self.stats.num_waiting + self._pending_adds >= self.config.max_queued_requests:
            raise EngineOverloaded(
                f"too many requests waiting ({self.stats.num_waiting}); the limit is {self.config.max_queued_requests}"
            )
        request_id = request_id or self.new_request_id("req")
        if request_id in self._streams:
            raise InvalidRequest(f"request id {request_id!r} is already in use", "request_id")
        seqs = self.core.make_sequences(request_id, prompt_token_ids, params, priority)
        stream = RequestStream(self, request_id, seqs)
        self._streams[request_id] = stream
        self._pending_adds += 1
        self._commands.put(("add", seqs))
        return stream

    def abort(self, request_id: str) -> None:
        """Free everything the request holds, at the next engine iteration (within one step)."""
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            self._commands.put(("abort", stream.seqs))

    # ---- the engine thread -------------------------------------------------------------------
    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.queue.put_nowait(item)

    def _drain_commands(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=IDLE_WAIT_SECONDS) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, payload = cmd
            if kind == "add":
                self.core.add(payload)
                self._loop.call_soon_threadsafe(self._added)
            elif kind == "abort":
                self.core.abort(payload)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _added(self) -> None:
        self._pending_adds -= 1

    def _run(self) -> None:
        last_log = time.monotonic()
        try:
            while not self._stopping.is_set():
                sched = self.core.scheduler
                self._drain_commands(block=not sched.has_work)
                if sched.has_work:
                    t0 = time.perf_counter()
                    updates = self.core.step()
                    self._publish(updates)
                    self.stats.steps += 1
                    self.stats.step_seconds_total += time.perf_counter() - t0
                    self.stats.compute_seconds_total += self.core.last_step_compute_seconds
                self._update_stats()
                if time.monotonic() - last_log > STATS_LOG_INTERVAL_SECONDS:
                    last_log = time.monotonic()
                    s = self.stats
                    log.info("running=%d waiting=%d kv_usage=%.1f%% preemptions=%d generated_tokens=%d",
                             s.num_running, s.num_waiting, 100 * s.kv_usage, s.num_preemptions,
                             s.generation_tokens_total)
        except Exception as e:  # worker died or a bug: every open request gets the error, health turns 503
            log.exception("engine thread stopped")
            self.dead = f"{type(e).__name__}: {e}"
            err = EngineDead(self.dead)
            for rid in list(self._streams):
                self._loop.call_soon_threadsafe(self._deliver, rid, err)

    def _publish(self, updates) -> None:
        outs: list[RequestOutput] = []
        for u in updates:
            seq = u.seq
            t = seq.times
            outs.append(
                RequestOutput(
                    request_id=seq.request_id,
                    index=seq.index,
                    new_text=u.new_text,
                    new_token_ids=u.new_token_ids,
                    new_logprobs=u.new_logprobs,
                    finished=u.finished,
                    finish_reason=seq.finish_reason.value if seq.finish_reason else None,
                    stop_reason=seq.stop_reason,
                    prompt_tokens=len(seq.prompt_token_ids),
                    completion_tokens=len(seq.output_token_ids),
                    cached_tokens=seq.num_cached_tokens,
                    arrival=t.arrival,
                    first_scheduled=t.first_scheduled,
                    first_token=t.first_token,
                    finished_at=t.finished,
                    token_times=list(t.token_times) if u.finished else [],
                )
            )
        if outs:
            self._loop.call_soon_threadsafe(self._deliver_many, outs)

    def _deliver_many(self, outs: list[RequestOutput]) -> None:
        for o in outs:
            stream = self._streams.get(o.request_id)
            if stream is None:
                continue  # aborted
            stream.queue.put_nowait(o)
            if o.finished:
                stream.undelivered_finishes -= 1
                if stream.undelivered_finishes == 0:
                    del self._streams[o.request_id]

    def _update_stats(self) -> None:
        sched, s = self.core.scheduler, self.stats
        s.num_running, s.num_waiting = len(sched.running), len(sched.waiting)
        s.kv_usage = sched.bm.usage()
        s.num_free_blocks, s.num_blocks = sched.bm.num_free_blocks, sched.bm.num_blocks
        s.num_preemptions = sched.num_preemptions
        s.prefix_queries, s.prefix_hits = sched.bm.prefix_queries, sched.bm.prefix_hits
        s.prompt_tokens_total = self.core.prompt_tokens_total
        s.generation_tokens_total = self.core.generation_tokens_total
