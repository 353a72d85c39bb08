"""The worker process: load the model, allocate the KV cache, warm up, then serve steps."""

from __future__ import annotations

import gc
import logging
import signal
import traceback
from multiprocessing.connection import Connection

from npu import messages as m
from npu.config import WorkerConfig

log = logging.getLogger("a8w8.worker")


def _make_runner(config: WorkerConfig):
    if config.replay_token_ids is not None:
        from npu.replay import ReplayRunner

        return ReplayRunner(config)
    from npu.runner import ModelRunner

    return ModelRunner(config)


def worker_main(conn: Connection, config: WorkerConfig) -> None:
    """Entry point of the spawned process. Exits when told to, or when the parent's pipe closes."""
    # Terminal signals are the API process's to handle (it drains, then stops this process): a Ctrl-C sent to
    # the process group is ignored here. The parent spawned this process with SIGINT blocked; any SIGINT
    # that arrived meanwhile is discarded when it is unblocked.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    try:
        runner = _make_runner(config)
        runner.warmup()
    except Exception as e:  # any startup failure is reported to the parent, then the process exits
        conn.send_bytes(m.encode(m.StartupFailed(message=f"{type(e).__name__}: {e}")))
        return
    # The model's hundreds of thousands of objects live as long as the process: out of the cyclic collector's
    # full passes, which would otherwise walk them all in the middle of a step.
    gc.freeze()
    conn.send_bytes(m.encode(runner.ready_message()))
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return  # parent went away
        step_id = -1
        try:
            msg = m.decode_to_worker(data)
            if isinstance(msg, m.Shutdown):
                return
            step_id = msg.step_id
            reply = runner.execute(msg)
        except (m.msgspec.ValidationError, m.msgspec.DecodeError) as e:
            reply = m.StepError(step_id=step_id, message=str(e))
        except Exception as e:  # a bug outside the forward: the engine restarts this worker
            log.error("step %s failed:\n%s", step_id, traceback.format_exc())
            reply = m.StepError(step_id=step_id, message=f"{type(e).__name__}: {e}")
        try:
            conn.send_bytes(m.encode(reply))
        except (BrokenPipeError, OSError):
            return
