"""Parent-side handle of the worker process: spawn, wait until ready, send steps, detect death."""

from __future__ import annotations

import multiprocessing as mp
import signal
import time

from npu import messages as m
from npu.config import WorkerConfig
from npu.worker import worker_main

# How often a waiting parent checks that the worker is still alive.
POLL_SECONDS = 0.05
DEFAULT_STARTUP_TIMEOUT = 600.0
# How long to wait for a worker whose pipe closed to be reaped, so that its exit status can be reported
# (the kernel closes a killed process's pipe before it has finished tearing the process down).
REAP_SECONDS = 5.0


class WorkerError(RuntimeError):
    """The worker failed to start, died, or rejected a step."""


class WorkerDied(WorkerError):
    pass


class WorkerClient:
    """Owns one worker process. Not thread-safe: one thread drives steps."""

    def __init__(self, config: WorkerConfig):
        self.config = config
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=worker_main, args=(child, config), name="a8w8-worker", daemon=True)
        # A terminal's Ctrl-C sends SIGINT to the whole process group: the worker must not die of it (the API
        # process drains, then stops the worker). Spawned with SIGINT blocked in this thread, the child starts
        # with it blocked (the mask survives fork and exec) until worker_main ignores it, so not even a Ctrl-C
        # during the interpreter's start reaches it. Only this thread's mask changes: a SIGINT meanwhile goes
        # to the main thread as usual.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            self.process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        child.close()  # so that the worker's death closes the pipe and recv() raises at once
        self.info: m.Ready | None = None

    def exit_description(self) -> str:
        """How the worker ended, e.g. 'killed by signal SIGKILL' (reaps it, waiting up to REAP_SECONDS)."""
        self.process.join(REAP_SECONDS)
        code = self.process.exitcode
        if code is None:
            return "its pipe closed but it is still running"
        if code < 0:
            try:
                return f"was killed by signal {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with code {code}"

    def _recv(self, timeout: float | None = None) -> m.FromWorker:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._conn.poll(POLL_SECONDS):
            if not self.process.is_alive():
                raise WorkerDied(f"the worker process {self.exit_description()}")
            if deadline is not None and time.monotonic() > deadline:
                raise WorkerError(f"worker did not answer within {timeout} s")
        try:
            return m.decode_from_worker(self._conn.recv_bytes())
        except (EOFError, OSError):
            raise WorkerDied(f"the worker process {self.exit_description()}") from None

    def wait_ready(self, timeout: float = DEFAULT_STARTUP_TIMEOUT) -> m.Ready:
        msg = self._recv(timeout)
        if isinstance(msg, m.StartupFailed):
            self.process.join(timeout=5)
            raise WorkerError(f"worker failed to start: {msg.message}")
        assert isinstance(msg, m.Ready), msg
        self.info = msg
        return msg

    def step(self, req: m.StepRequest, timeout: float | None = None) -> m.StepResult:
        """Send one step and wait for its result; raises WorkerError on a rejected step. A worker that has not
        answered within ``timeout`` seconds is hung: it is killed, and WorkerDied raised (as for a crash)."""
        try:
            self._conn.send_bytes(m.encode(req))
        except (BrokenPipeError, OSError):
            raise WorkerDied(f"the worker process {self.exit_description()}") from None
        try:
            reply = self._recv(timeout)
        except WorkerDied:
            raise
        except WorkerError:  # no answer in time
            self.process.kill()
            raise WorkerDied(
                f"the worker did not finish a step within {timeout:.0f} s (hung or stopped): it was killed"
            ) from None
        if isinstance(reply, m.StepError):
            raise WorkerError(f"worker rejected step {reply.step_id}: {reply.message}")
        assert isinstance(reply, m.StepResult) and reply.step_id == req.step_id, reply
        return reply

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    def shutdown(self, timeout: float = 10.0) -> None:
        if self.process.is_alive():
            try:
                self._conn.send_bytes(m.encode(m.Shutdown()))
            except (BrokenPipeError, OSError):
                pass
            self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout)
        self._conn.close()
