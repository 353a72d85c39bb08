"""Real servers for the HTTP tests: the CLI in a subprocess, or uvicorn in a thread for special configs."""

from __future__ import annotations

import glob
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from engine.config import EngineConfig, SchedulerConfig
from npu.config import WorkerConfig
from server.config import ServerSettings

STARTUP_TIMEOUT = 120.0
MODEL = "test-model"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(base: str, timeout: float = STARTUP_TIMEOUT, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{base} not healthy after {timeout}s")


class CliServer:
    """``a8w8-serve serve`` as a subprocess on 127.0.0.1."""

    def __init__(self, model_dir: Path, *args: str, env: dict[str, str] | None = None, own_group: bool = False):
        """``own_group``: start it in a process group of its own (a new session), as a shell starts a job, so
        that a signal can be sent to the whole group (``os.killpg``) as a terminal's Ctrl-C does."""
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"a8w8-server-{self.port}.log", "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "a8w8_serve", "serve", "--model", str(model_dir), "--port", str(self.port), *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=own_group,
        )
        wait_healthy(self.base, proc=self.proc)

    def worker_pid(self) -> int | None:
        """The pid of the server's worker process (its multiprocessing-spawned child), if it has one."""
        return worker_pid(self.proc.pid)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(20)
        self.log.close()


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux lists them per thread that started them)."""
    return [int(c) for f in glob.glob(f"/proc/{pid}/task/*/children") for c in Path(f).read_text().split()]


def worker_pid(api_pid: int) -> int | None:
    for c in child_pids(api_pid):
        try:
            if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text():
                return c
        except OSError:
            continue  # exited meanwhile
    return None


def rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


class ThreadServer:
    """uvicorn running ``app`` in a background thread on 127.0.0.1."""

    def __init__(self, app, wait: bool = True):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        if wait:
            wait_healthy(self.base)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def server_settings(model_dir, **kw) -> ServerSettings:
    """Settings of a small in-process server of ``model_dir`` (the engine's, worker's and scheduler's fields by
    name, in ``engine``, ``worker`` and ``scheduler``)."""
    worker_kw = kw.pop("worker", {})
    sched_kw = kw.pop("scheduler", {})
    engine = EngineConfig(
        worker=WorkerConfig(model_dir=str(model_dir), kv_cache_memory_bytes=32 << 20, max_model_len=1024, **worker_kw),
        scheduler=SchedulerConfig(**sched_kw),
        max_queued_requests=kw.pop("max_queued_requests", 1024),
        **kw.pop("engine", {}),
    )
    return ServerSettings(engine=engine, served_model_names=[MODEL], **kw)


def metric(base: str, name: str, labels: str = "", default: float | None = None) -> float:
    """Value of ``name{model_name=MODEL,...labels}`` in /metrics (labels in any order)."""
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        head, _, value = line.rpartition(" ")
        if head.startswith(name + "{") and f'model_name="{MODEL}"' in head and labels in head:
            return float(value)
    assert default is not None, f"{name} {labels} not in /metrics"
    return default


def data_events(base: str, path: str, body: dict) -> list[dict]:
    """The JSON data of a stream's server-sent events, up to its [DONE]."""
    with httpx.stream("POST", f"{base}{path}", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]
