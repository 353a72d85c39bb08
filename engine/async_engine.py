"""The asyncio face of the engine: the event loop never blocks on the worker.

One engine thread runs ``EngineCore.step`` in a loop (the worker computes in its own process);
requests and aborts reach it through a thread-safe queue, outputs return to each request's
``asyncio.Queue`` with ``call_soon_threadsafe``. Steps are not overlapped: the next step is prepared
after the previous one's tokens are known (the worker computes for milliseconds per step at these
sizes; overlapping would need speculative scheduling).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from enum import Enum

from engine.client import EngineClient
from engine.config import EngineConfig
from engine.core import EngineCore
from engine.sampling_params import InvalidRequest, SamplingParams
from engine.sequence import Sequence, TokenLogprob
from npu.client import WorkerDied, WorkerError
from npu.messages import Ready, SpecDecodeStats

log = logging.getLogger("a8w8.engine")
# How long the idle engine thread waits for a command before checking for shutdown and worker death.
IDLE_WAIT_SECONDS = 0.1
STATS_LOG_INTERVAL_SECONDS = 10.0
# Seconds to wait before the k-th worker restart within the restart window (the last value repeats):
# the first restart is immediate, a crash loop backs off.
WORKER_RESTART_BACKOFF_SECONDS = (0.0, 1.0, 2.0, 4.0, 8.0)
# What a client is told to wait before retrying while the worker restarts (about one model load).
RESTART_RETRY_AFTER_SECONDS = 10
# How often drain() looks whether the open requests have finished.
DRAIN_POLL_SECONDS = 0.05


class EngineState(str, Enum):
    """What the engine can do now; ``/health`` is 200 only in READY."""

    LOADING = "loading"  # the first worker is loading the model
    READY = "ready"
    RESTARTING = "restarting"  # the worker died; a new one is loading
    DRAINING = "draining"  # shutting down: running requests finish, new ones are refused
    DEAD = "dead"  # the worker could not be (re)started; the process should exit


class EngineUnavailable(RuntimeError):
    """The engine cannot take or finish this request now (HTTP 503, with Retry-After when it is coming back)."""

    def __init__(self, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class EngineOverloaded(RuntimeError):
    """The waiting queue is past its bound (HTTP 429)."""


class RequestFailed(RuntimeError):
    """The worker could not run this request; other requests were not affected (HTTP 500)."""


class _Command(Enum):
    ADD = "add"
    ABORT = "abort"
    WAKE = "wake"


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
    worker_restarts: int = 0
    constraint_failures: int = 0


class RequestStream:
    """Async iterator over one request's outputs; closing it early aborts the request."""

    def __init__(self, engine: AsyncEngine, request_id: str, seqs: list[Sequence]):
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


class AsyncEngine(EngineClient):
    """The :class:`~engine.client.EngineClient` the server talks to. Its ``EngineCore`` is private to the engine
    thread (engine/client.py states the threading rule; ``EngineCore`` enforces it)."""

    def __init__(self, config: EngineConfig, on_fatal: Callable[[str], None] | None = None):
        """``on_fatal(reason)`` is called on the event loop when the worker cannot be restarted any more."""
        self.config = config
        self._core = EngineCore(config)
        self.tokenizer = self._core.tokenizer
        self.chat_template = self._core.chat_template
        self.generation_defaults = self._core.generation_defaults
        self.model_config = self._core.model_config
        self.on_fatal = on_fatal
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._state_lock = threading.Lock()
        self.state = EngineState.LOADING
        self.state_detail: str | None = None  # why the engine is restarting or dead
        self.stats = EngineStats()
        self._request_ids = itertools.count()
        self._pending_adds = 0
        self._restart_times: list[float] = []

    # ---- lifecycle --------------------------------------------------------------------------
    async def start(self) -> None:
        """Wait (off the event loop) for the worker to load, then start the engine thread."""
        self._loop = asyncio.get_running_loop()
        try:
            await asyncio.to_thread(self._core.start)
        except WorkerError as e:
            self._set_state(EngineState.DEAD, str(e))
            raise
        self._thread = threading.Thread(target=self._run, name="a8w8-engine", daemon=True)
        self._thread.start()
        self._set_state(EngineState.READY, None, only_from=(EngineState.LOADING,))

    async def stop(self) -> None:
        self._stopping.set()
        self._commands.put((_Command.WAKE, None))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
        await asyncio.to_thread(self._core.shutdown)

    def _set_state(
        self, state: EngineState, detail: str | None, only_from: tuple[EngineState, ...] | None = None
    ) -> None:
        with self._state_lock:
            if only_from is None or self.state in only_from:
                self.state, self.state_detail = state, detail

    @property
    def max_model_len(self) -> int | None:
        return self._core.max_model_len

    @property
    def worker_info(self) -> Ready | None:
        return self._core.worker_info

    @property
    def spec_totals(self) -> SpecDecodeStats:
        return self._core.spec_totals

    def encode_prompt(self, text: str) -> list[int]:
        return self._core.encode_prompt(text)

    def prompt_from_ids(self, ids: list[int]) -> str:
        self._core.check_prompt_ids(ids)  # before decoding: ids past the vocabulary or the context never reach it
        return self.tokenizer.decode(ids)

    def compile_grammar(self, grammar: str) -> concurrent.futures.Future:
        return self._core.grammars.submit(grammar)

    def kill_worker(self) -> None:
        worker = self._core.worker
        if worker is not None:
            worker.process.kill()

    @property
    def healthy(self) -> bool:
        worker = self._core.worker
        return (
            self.state is EngineState.READY
            and worker is not None
            and worker.alive
            and self._core.step_watch.stalled() is None
        )

    def stalled(self) -> str | None:
        """Why the worker counts as stalled (a step past its deadline), or None."""
        return self._core.step_watch.stalled() if self.state is EngineState.READY else None

    @property
    def num_open_requests(self) -> int:
        return len(self._streams)

    async def drain(self, timeout: float) -> int:
        """Refuse new requests, give the open ones up to ``timeout`` seconds to finish, then end the rest
        with an error (streams get an error event, never a silent cut). Returns how many were cut."""
        self._set_state(
            EngineState.DRAINING,
            "the server is shutting down",
            only_from=(EngineState.LOADING, EngineState.READY, EngineState.RESTARTING),
        )
        deadline = time.monotonic() + timeout
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_SECONDS)
        cut = list(self._streams)
        for rid in cut:
            self._fail_stream(
                rid,
                EngineUnavailable(f"the server is shutting down and did not finish this request within {timeout:g} s"),
            )
        return len(cut)

    # ---- requests ---------------------------------------------------------------------------
    def new_request_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._request_ids)}-{time.monotonic_ns():x}"

    def _unavailable(self) -> EngineUnavailable:
        state, detail = self.state, self.state_detail
        if state is EngineState.LOADING:
            return EngineUnavailable("the model is still loading", RESTART_RETRY_AFTER_SECONDS)
        if state is EngineState.RESTARTING:
            return EngineUnavailable(
                f"the worker is restarting after a failure ({detail})", RESTART_RETRY_AFTER_SECONDS
            )
        if state is EngineState.DRAINING:
            return EngineUnavailable("the server is shutting down")
        return EngineUnavailable(f"the engine is not available: {detail}")

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams, priority: int = 0) -> None:
        """What :meth:`add_request` would refuse of this request (EngineUnavailable, InvalidRequest), checked
        without queueing it: the server asks before it compiles the request's grammar."""
        if self.state is not EngineState.READY:
            raise self._unavailable()
        self._core.check_request(prompt_token_ids, params, priority)

    def add_request(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None, priority: int = 0
    ) -> RequestStream:
        """Validate and enqueue; raises InvalidRequest, EngineOverloaded or EngineUnavailable synchronously."""
        if self.state is not EngineState.READY:
            raise self._unavailable()
        if self.stats.num_waiting + self._pending_adds >= self.config.max_queued_requests:
            raise EngineOverloaded(
                f"too many requests waiting ({self.stats.num_waiting}); the limit is {self.config.max_queued_requests}"
            )
        request_id = request_id or self.new_request_id("req")
        if request_id in self._streams:
            raise InvalidRequest(f"request id {request_id!r} is already in use", "request_id")
        seqs = self._core.make_sequences(request_id, prompt_token_ids, params, priority)
        stream = RequestStream(self, request_id, seqs)
        self._streams[request_id] = stream
        self._pending_adds += 1
        self._commands.put((_Command.ADD, seqs))
        return stream

    def abort(self, request_id: str) -> None:
        """Free everything the request holds, at the next engine iteration (within one step)."""
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            self._commands.put((_Command.ABORT, stream.seqs))

    def _fail_stream(self, request_id: str, error: BaseException) -> None:
        """(Event loop.) End a request with ``error`` and free whatever it still holds."""
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.queue.put_nowait(error)
            self._commands.put((_Command.ABORT, stream.seqs))

    # ---- the engine thread -------------------------------------------------------------------
    def _drain_commands(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=IDLE_WAIT_SECONDS) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            kind, payload = cmd
            if kind is _Command.ADD:
                self._core.add(payload)
                self._loop.call_soon_threadsafe(self._added)
            elif kind is _Command.ABORT:
                self._core.abort(payload)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _added(self) -> None:
        self._pending_adds -= 1

    def _run(self) -> None:
        """The engine thread: serve steps; when the worker is lost (or a step breaks), restart it."""
        self._core.claim_thread()
        while not self._stopping.is_set():
            try:
                self._serve()
            except Exception as e:  # noqa: BLE001 - every failure of the serving loop ends in a restart
                if self._stopping.is_set():
                    return
                if not isinstance(e, WorkerDied):
                    log.exception("engine step failed; restarting the worker")
                if not self._recover(str(e) if isinstance(e, WorkerDied) else f"{type(e).__name__}: {e}"):
                    return

    def _serve(self) -> None:
        last_log = time.monotonic()
        logged_activity = (
            self.stats.prompt_tokens_total,
            self.stats.generation_tokens_total,
            self.stats.num_preemptions,
        )
        while not self._stopping.is_set():
            sched = self._core.scheduler
            self._drain_commands(block=not sched.has_work)
            if sched.has_work:
                t0 = time.perf_counter()
                updates = self._core.step()
                self._publish(updates)
                self.stats.steps += 1
                self.stats.step_seconds_total += time.perf_counter() - t0
                self.stats.compute_seconds_total += self._core.last_step_compute_seconds
            elif not self._core.worker.alive:  # died while idle: notice now, not at the next request
                raise WorkerDied(f"the worker process {self._core.worker.exit_description()}")
            self._update_stats()
            if time.monotonic() - last_log > STATS_LOG_INTERVAL_SECONDS:
                last_log = time.monotonic()
                s = self.stats
                activity = (s.prompt_tokens_total, s.generation_tokens_total, s.num_preemptions)
                # An idle server says nothing: a line only when something ran since the last one, or is queued.
                if s.num_running or s.num_waiting or activity != logged_activity:
                    logged_activity = activity
                    log.info(
                        "running=%d waiting=%d kv_usage=%.1f%% preemptions=%d generated_tokens=%d",
                        s.num_running,
                        s.num_waiting,
                        100 * s.kv_usage,
                        s.num_preemptions,
                        s.generation_tokens_total,
                    )

    def _recover(self, reason: str) -> bool:
        """The worker is lost: fail the requests it was running, reap it, start a new one (with back-off)
        and rebuild the scheduler; requests that had not started run on the new worker. False when the
        restart budget is spent (the engine is then DEAD and ``on_fatal`` was called)."""
        log.error("worker lost: %s", reason)
        self._set_state(EngineState.RESTARTING, reason, only_from=(EngineState.READY, EngineState.RESTARTING))
        carried, lost = self._core.take_unstarted()
        lost_error = EngineUnavailable(
            f"the worker failed while this request was running ({reason}); it can be retried",
            RESTART_RETRY_AFTER_SECONDS,
        )
        for rid in dict.fromkeys(seq.request_id for seq in lost):
            self._loop.call_soon_threadsafe(self._fail_stream, rid, lost_error)
        self._core.stop_worker()
        if self.state is EngineState.DRAINING:  # shutting down (a second signal killed the worker): no restart
            return False
        window = self.config.worker_restart_window_seconds
        while not self._stopping.is_set():
            now = time.monotonic()
            self._restart_times = [t for t in self._restart_times if now - t < window]
            if len(self._restart_times) >= self.config.max_worker_restarts:
                self._give_up(
                    f"{reason}; the worker was restarted {len(self._restart_times)} times in {window:g} s, giving up"
                )
                return False
            delay = WORKER_RESTART_BACKOFF_SECONDS[
                min(len(self._restart_times), len(WORKER_RESTART_BACKOFF_SECONDS) - 1)
            ]
            if self._stopping.wait(delay):
                return False
            self._restart_times.append(time.monotonic())
            log.warning("starting a new worker (restart %d in the last %g s)", len(self._restart_times), window)
            try:
                self._core.start(carried)
            except WorkerError as e:
                reason = str(e)
                log.error("the new worker failed to start: %s", reason)
                self._core.stop_worker()
                continue
            self.stats.worker_restarts += 1
            self._update_stats()
            self._set_state(EngineState.READY, None, only_from=(EngineState.RESTARTING,))
            log.warning("worker restarted; serving again")
            return True
        return False

    def _give_up(self, reason: str) -> None:
        log.critical("engine stopped: %s", reason)
        self._set_state(EngineState.DEAD, reason)
        error = EngineUnavailable(f"the engine is not available: {reason}")

        def fail_all() -> None:
            for rid in list(self._streams):
                self._fail_stream(rid, error)
            if self.on_fatal is not None:
                self.on_fatal(reason)

        self._loop.call_soon_threadsafe(fail_all)

    def _publish(self, updates) -> None:
        outs: list[RequestOutput | tuple[str, BaseException]] = []
        for u in updates:
            seq = u.seq
            if u.error is not None:
                outs.append((seq.request_id, RequestFailed(u.error)))
                continue
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

    def _deliver_many(self, outs: list[RequestOutput | tuple[str, BaseException]]) -> None:
        for o in outs:
            if isinstance(o, tuple):
                self._fail_stream(*o)
                continue
            stream = self._streams.get(o.request_id)
            if stream is None:
                continue  # aborted
            stream.queue.put_nowait(o)
            if o.finished:
                stream.undelivered_finishes -= 1
                if stream.undelivered_finishes == 0:
                    del self._streams[o.request_id]

    def _update_stats(self) -> None:
        sched, s = self._core.scheduler, self.stats
        s.num_running, s.num_waiting = len(sched.running), len(sched.waiting)
        s.kv_usage = sched.bm.usage()
        s.num_free_blocks, s.num_blocks = sched.bm.num_free_blocks, sched.bm.num_blocks
        s.num_preemptions = sched.num_preemptions
        s.constraint_failures = sched.num_constraint_failures
        s.prefix_queries, s.prefix_hits = sched.bm.prefix_queries, sched.bm.prefix_hits
        s.prompt_tokens_total = self._core.prompt_tokens_total
        s.generation_tokens_total = self._core.generation_tokens_total
