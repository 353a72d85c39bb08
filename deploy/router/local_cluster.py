"""N local a8w8-serve replicas behind HAProxy on 127.0.0.1: a demo of multi-replica serving.

    python deploy/router/local_cluster.py --replicas 2 --port 8000 [-- --model DIR --max-model-len 4096]

Starts ``a8w8-serve serve`` N times (ports PORT+1 .. PORT+N; arguments after ``--`` go to every replica),
waits until each answers ``/health``, writes the HAProxy config from ``haproxy.cfg.template`` and runs
``haproxy`` (Debian's package) on PORT until Ctrl-C, then stops everything (SIGTERM: the replicas drain).
Clients that send ``X-Session-Id`` (or the OpenAI ``user`` field) keep hitting one replica.
``tests/system/test_router.py`` drives the same class.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

TEMPLATE = Path(__file__).with_name("haproxy.cfg.template")
EXAMPLE = Path(__file__).with_name("haproxy.cfg")
# How often HAProxy asks each replica's /health: a drain or a dead replica stops getting requests within it.
CHECK_INTERVAL = "500ms"
# HAProxy's buffer holds a whole request so it can be retried on another replica (bodies up to this size).
BUFFER_BYTES = 65536
STARTUP_SECONDS = 600.0  # the first start of the default model converts it
STOP_SECONDS = 60.0


def render_config(replicas: list[str], listen: str, check_interval: str = CHECK_INTERVAL) -> str:
    """The HAProxy config for ``replicas`` ("host:port" each) with the router on ``listen`` ("host:port")."""
    names = [f"replica{i + 1}" for i in range(len(replicas))]
    least = "\n".join(f"    server {n} {addr} check" for n, addr in zip(names, replicas))
    # the session backend shares the health of the first backend's servers instead of checking them again
    by_session = "\n".join(f"    server {n} {addr} track least_outstanding/{n}" for n, addr in zip(names, replicas))
    values = {
        "{bufsize}": str(BUFFER_BYTES),
        "{check_interval}": check_interval,
        "{listen}": listen,
        "{least_outstanding_servers}": least,
        "{by_session_servers}": by_session,
    }
    text = TEMPLATE.read_text()
    for key, value in values.items():
        text = text.replace(key, value)
    return text


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} for {url} exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} not healthy after {timeout:g} s")


@dataclass
class LocalCluster:
    """``replicas`` servers and one HAProxy, all on 127.0.0.1; ``serve_args`` go to every replica."""

    ports: list[int]
    router_port: int
    serve_args: list[str] = field(default_factory=list)
    log_dir: Path | None = None
    haproxy: str = "haproxy"
    procs: list[subprocess.Popen] = field(default_factory=list, init=False)
    router: subprocess.Popen | None = field(default=None, init=False)

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{p}" for p in self.ports]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.router_port}"

    def _log(self, name: str):
        if self.log_dir is None:
            return None
        return open(self.log_dir / f"{name}.log", "a")

    def spawn_replica(self, index: int) -> subprocess.Popen:
        """Start replica ``index`` (``a8w8-serve serve`` on its port); it is not waited for."""
        cmd = [sys.executable, "-m", "a8w8_serve", "serve", "--port", str(self.ports[index]), *self.serve_args]
        return subprocess.Popen(cmd, stdout=self._log(f"replica{index + 1}"), stderr=subprocess.STDOUT)

    def start(self, timeout: float = STARTUP_SECONDS) -> None:
        if shutil.which(self.haproxy) is None:
            raise RuntimeError("haproxy is not installed (Debian: apt-get install haproxy)")
        self.log_dir = self.log_dir or Path(tempfile.mkdtemp(prefix="a8w8-cluster-"))
        self.procs = [self.spawn_replica(i) for i in range(len(self.ports))]
        for url, proc in zip(self.urls, self.procs):
            wait_healthy(url, proc, timeout)
        config = self.log_dir / "haproxy.cfg"
        config.write_text(render_config([f"127.0.0.1:{p}" for p in self.ports], f"127.0.0.1:{self.router_port}"))
        check = subprocess.run([self.haproxy, "-c", "-q", "-f", str(config)], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy rejected {config}: {check.stdout}{check.stderr}")
        self.router = subprocess.Popen(
            [self.haproxy, "-db", "-f", str(config)], stdout=self._log("haproxy"), stderr=subprocess.STDOUT
        )
        wait_healthy(self.url, self.router, timeout=30)

    def stop(self) -> None:
        for proc in [*self.procs, self.router]:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*self.procs, self.router]:
            if proc is None:
                continue
            try:
                proc.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def main() -> None:
    argv = sys.argv[1:]
    serve_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--port", type=int, default=8000, help="the router's port; replicas use the next ones")
    parser.add_argument("--write-example", action="store_true", help=f"write {EXAMPLE.name} (2 replicas) and exit")
    args = parser.parse_args(argv)
    if args.write_example:
        EXAMPLE.write_text(render_config(["127.0.0.1:8001", "127.0.0.1:8002"], "127.0.0.1:8000"))
        print(f"wrote {EXAMPLE}")
        return
    cluster = LocalCluster([args.port + i + 1 for i in range(args.replicas)], args.port, serve_args)
    try:
        cluster.start()
        print(f"router on {cluster.url}, replicas {', '.join(cluster.urls)}; logs in {cluster.log_dir}; Ctrl-C stops")
        stop_signals = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)  # after the children started: they keep theirs
        signal.sigwait(stop_signals)
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
