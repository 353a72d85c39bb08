"""Real servers for the HTTP tests: the CLI in a subprocess, or uvicorn in a thread for special configs."""

from __future__ import annotations

import glob
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn

STARTUP_TIMEOUT = 120.0


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
            [sys.executable, "-m", "server.cli", "serve", "--model", str(model_dir), "--port", str(self.port), *args],
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
