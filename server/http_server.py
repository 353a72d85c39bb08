"""The HTTP server process: uvicorn with a graceful drain on SIGTERM/SIGINT and a header timeout.

- **Drain.** The first SIGTERM or SIGINT turns ``/health`` 503 and refuses new generation requests with
  503 while the listening socket stays open (a load balancer sees the drain instead of refused
  connections); running requests get up to ``shutdown_timeout`` seconds to finish, then every one still
  open ends with an error event and ``[DONE]`` (or a 503), the worker is stopped and the process exits 0.
  A second signal exits at once.
- **Slow clients.** uvicorn's keep-alive timer is reset by every byte received, so a client that sends its
  request headers one byte at a time would hold its connection forever. Here a connection that has not
  sent a complete request head within ``header_timeout`` seconds of becoming idle is closed (nginx's
  ``client_header_timeout``); a stalled request body is the guard's business (408).
- **Fatal engine failures** (the worker cannot be started, or keeps dying) make the process exit 1, so that
  an orchestrator restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.config import HTTPSettings

log = logging.getLogger("a8w8.server")

# After the drain, how long uvicorn waits for the connections to finish writing (the cut streams' last
# events) before it closes them.
CONNECTION_CLOSE_GRACE_SECONDS = 5.0
EXIT_FATAL = 1


def header_timeout_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol, closing a connection whose request head does not arrive within ``seconds``."""

    class HeaderTimeoutH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._watch_request_head()

        def handle_events(self) -> None:
            super().handle_events()
            self._watch_request_head()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._watch_request_head()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_timer()
            super().connection_lost(exc)

        def _stop_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _watch_request_head(self) -> None:
            # h11's view of the client: IDLE until a whole request head has been parsed.
            waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
            if waiting and self._header_timer is None:
                self._header_timer = self.loop.call_later(seconds, self._request_head_timed_out)
            elif not waiting:
                self._stop_timer()

        def _request_head_timed_out(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutH11Protocol


class GracefulServer(uvicorn.Server):
    """uvicorn.Server with the drain, the second-signal exit and the fatal exit described above."""

    def __init__(self, config: uvicorn.Config, shutdown_timeout: float):
        super().__init__(config)
        self.shutdown_timeout = shutdown_timeout
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        # Not recorded in uvicorn's captured signals: it would raise them again once serve() returns, and
        # the process would end by the signal instead of exiting 0 after the drain.
        if self._loop is None:
            self.should_exit = True
            return
        if self._draining:
            log.warning("second %s: exiting now", signal.Signals(sig).name)
            self.force_exit = self.should_exit = True
            engine = self.engine
            if engine is not None:
                engine.kill_worker()
            return
        self._draining = True
        log.warning(
            "%s: draining (up to %g s for running requests; send it again to exit now)",
            signal.Signals(sig).name,
            self.shutdown_timeout,
        )
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain_then_exit()))

    @property
    def engine(self):
        """The app's engine (``app.state.engine``), once its lifespan has started."""
        return getattr(self.config.app.state, "engine", None)

    async def _drain_then_exit(self) -> None:
        engine = self.engine
        if engine is not None:
            cut = await engine.drain(self.shutdown_timeout)
            if cut:
                log.warning("ended %d request(s) still running after %g s with an error", cut, self.shutdown_timeout)
        self.should_exit = True

    def fatal(self, reason: str) -> None:
        """The engine cannot serve any more: exit non-zero (an orchestrator restarts the process)."""
        self.exit_code = EXIT_FATAL
        self.should_exit = True


def build_server(app_factory, http: HTTPSettings) -> GracefulServer:
    """``app_factory(on_fatal)`` builds the ASGI app; its ``on_fatal`` makes the server exit with code 1."""
    holder: list[GracefulServer] = []
    app = app_factory(lambda reason: holder[0].fatal(reason))
    # access_log off: the app logs one line per request itself, with its duration.
    config = uvicorn.Config(
        app,
        host=http.host,
        port=http.port,
        log_level=http.log_level,
        access_log=False,
        http=header_timeout_protocol(http.header_timeout),
        timeout_graceful_shutdown=CONNECTION_CLOSE_GRACE_SECONDS,
    )
    server = GracefulServer(config, http.shutdown_timeout)
    holder.append(server)
    return server
