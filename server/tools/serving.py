"""Running the app: one uvicorn process, or gunicorn with many, both shutting down gracefully.

SIGTERM handling, in order: readiness turns 503 at once; the process keeps serving for
``shutdown_delay_s`` so a load balancer notices; then it stops accepting, lets in-flight requests
finish (up to ``drain_timeout_s``), runs the lifespan shutdown and exits 0.

Under gunicorn the model is loaded in each worker after fork (never in the master: an onnxruntime
session inherited across fork is unsafe), and a worker takes no traffic until its model is loaded.

Both run uvicorn's h11 protocol with what it lacks against slow and greedy clients
(:class:`SlowClientProtocol`): a deadline for the request headers and a cap on open connections.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import resource
import shutil
import socket
import sys
import tempfile
import threading
from collections.abc import Awaitable, Callable, Generator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import h11
import uvicorn
from gunicorn.arbiter import Arbiter
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn_worker import UvicornWorker

from server.errors import envelope
from server.logs import route_server_loggers
from server.settings import Settings

log = logging.getLogger("voxswap.serving")
connections_log = logging.getLogger("voxswap.connections")  # rate-limited (server/logs.py)
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


class SlowClientProtocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline and a connection cap.

    uvicorn times out idle keep-alive connections but not one that is slow to send its request
    headers (or sends nothing at all): each held a descriptor for as long as the client liked,
    until the process ran out of them (issue 18, finding F). Here a connection whose headers are
    not complete ``header_timeout_s`` after it opened, or after the first byte of its next request,
    is closed. And the process keeps at most ``max_connections`` open, so descriptors never run
    out: a new connection beyond it pushes out the oldest one that is not in a request (idle, or
    still sending its headers), so a slow-header flood cannot crowd out clients that send their
    request at once; with every connection in a request, the new one is answered 503 and closed.
    (uvicorn's ``limit_concurrency`` only looks once a request's headers are in, which a slow-header
    flood never reaches.) The body's deadlines live in the ASGI guard (``server/http/guard.py``),
    which can answer 408 in the error envelope.
    """

    header_timeout_s = 10.0
    max_connections = 500

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._opened = self.loop.time()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections and not self._evict_one():
            connections_log.warning("connection refused: every connection this process keeps is in a request",
                                    extra={"event": "connection_refused", "max_connections": self.max_connections})
            transport.write(_TOO_MANY_CONNECTIONS)
            transport.close()
            return
        self._arm_header_timer()

    def _evict_one(self) -> bool:
        """Close the oldest connection that is between requests or still sending its headers."""
        idle = self._idle_peers()
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c._opened)
        connections_log.warning("connection closed to make room: the most open connections were reached and "
                                "it was not in a request", extra={"event": "connection_evicted",
                                                                  "max_connections": self.max_connections})
        oldest.transport.close()
        oldest.connections.discard(oldest)  # its slot is free now, not when the close completes
        return True

    def _idle_peers(self) -> list[SlowClientProtocol]:
        return [c for c in self.connections if isinstance(c, SlowClientProtocol) and c is not self
                and c.conn.their_state is h11.IDLE and (c.cycle is None or c.cycle.response_complete)
                and not c.transport.is_closing()]

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        if self._header_timer is None and self.conn.their_state is h11.IDLE:
            self._arm_header_timer()  # the first bytes of the next request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_timed_out)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            connections_log.warning("connection closed: its request headers took longer than the header "
                                    "timeout", extra={"event": "header_timeout", "timeout_s": self.header_timeout_s})
            self.transport.close()


def _raw_503() -> bytes:
    body = json.dumps(envelope("this server has as many connections open as it keeps; try again shortly",
                               type_="server_error", code="overloaded", request_id=None)).encode()
    head = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
            b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n")
    return head + body


_TOO_MANY_CONNECTIONS = _raw_503()


def http_protocol(settings: Settings) -> type[SlowClientProtocol]:
    """The protocol class uvicorn builds one of per connection, with these settings' limits."""

    class VoxswapProtocol(SlowClientProtocol):
        header_timeout_s = settings.header_timeout_s
        max_connections = settings.max_connections

    return VoxswapProtocol


def uvicorn_config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """uvicorn's configuration for voxswap: the slow-client protocol, keep-alive and drain timeouts."""
    options: dict[str, Any] = {
        "host": settings.host, "port": settings.port, "log_config": None, "http": http_protocol(settings),
        "timeout_keep_alive": settings.keepalive_timeout_s,
        "timeout_graceful_shutdown": max(1, round(settings.drain_timeout_s)),
        "proxy_headers": True, "forwarded_allow_ips": forwarded_allow_ips(settings),
        "ws_max_size": ws_max_size(settings),
    }
    return uvicorn.Config(app, **{**options, **overrides})


def ws_max_size(settings: Settings) -> int:
    """The WebSocket frame limit: twice the realtime message limit, so a message over the limit but
    under this gets an ``error`` event that names the limit (and the session goes on); beyond it the
    protocol closes the connection with 1009 before the message is buffered."""
    return 2 * settings.realtime_max_message_bytes


def forwarded_allow_ips(settings: Settings) -> str:
    """The peers whose ``X-Forwarded-For`` uvicorn believes for the client's address (a canary's
    split, logs): ``VOXSWAP_TRUSTED_PROXIES``. Nobody's when it is empty."""
    return ",".join(str(net) for net in settings.trusted_proxies) or "''"


def warn_if_exposed(settings: Settings) -> bool:
    """Log a warning when the server listens beyond loopback with no client API keys: anyone who can
    reach it may transcribe, and every client sees every job. True when it warned."""
    if settings.api_keys_file is not None or _is_loopback(settings.host):
        return False
    log.warning("listening on %s without client API keys: anyone who can reach this port may transcribe "
                "and see every job; set VOXSWAP_API_KEYS_FILE", settings.host,
                extra={"event": "no_api_keys", "host": settings.host})
    return True


def raise_open_files_limit(settings: Settings, backlog: int) -> None:
    """Make room for every connection the process keeps plus one accept burst: asyncio accepts up
    to the listen backlog at once, before any of them can be turned away, and a process out of
    descriptors stops answering even /health. Like Go's runtime, raise the soft limit (within the
    hard one) rather than fail; warn when even the hard limit is too low."""
    needed = settings.max_connections + backlog + 256  # 256: the registry, job store, logs, models
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        log.warning("the open-files limit is lower than VOXSWAP_MAX_CONNECTIONS needs; lower it or raise "
                    "`ulimit -n`", extra={"event": "open_files_limit", "limit": target, "needed": needed})


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a hostname: it may resolve to anything


class GracefulServer(uvicorn.Server):
    """uvicorn, with a readiness-first shutdown delay and exit code 0 after a graceful stop."""

    def __init__(self, config: uvicorn.Config, *, on_shutdown: Callable[[], bool], delay_s: float,
                 before_close: Callable[[], Awaitable[None]] | None = None):
        super().__init__(config)
        self._on_shutdown = on_shutdown
        self._before_close = before_close
        self._delay_s = delay_s
        self._stop_requested = False
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets=sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._stop_requested or self._delay_s <= 0:
            self._on_shutdown()
            super().handle_exit(sig, frame)  # a second signal still forces uvicorn's fast path
            return
        self._stop_requested = True
        if self._on_shutdown() and self._loop is not None:
            # Peers accept on the same socket: stop taking connections now, so the only ones left
            # at shutdown are those already told "Connection: close".
            self._loop.call_soon_threadsafe(self._stop_accepting)
        timer = threading.Timer(self._delay_s, super().handle_exit, (sig, frame))
        timer.daemon = True
        timer.start()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn closes every WebSocket with 1012 at once: let realtime sessions finish their turns
        first (they close themselves), then close what is left."""
        if self._before_close is not None:
            self._stop_accepting()
            await self._before_close()
        await super().shutdown(sockets=sockets)

    def _stop_accepting(self) -> None:
        for server in self.servers:
            server.close()

    @contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # uvicorn re-raises the captured signal after a graceful stop, so the process would die "by
        # SIGTERM"; a clean drain is a successful exit, and supervisors should see 0.
        with super().capture_signals():
            try:
                yield
            finally:
                self._captured_signals.clear()


def serve_single(settings: Settings) -> int:
    from server.app import begin_shutdown, create_app, drain_streams

    warn_if_exposed(settings)
    app = create_app(settings)
    config = uvicorn_config(app, settings)
    raise_open_files_limit(settings, config.backlog)
    server = GracefulServer(config, on_shutdown=lambda: begin_shutdown(app), delay_s=settings.shutdown_delay_s,
                            before_close=lambda: drain_streams(app))
    server.run()
    return 0 if server.started else 1


# -- gunicorn -------------------------------------------------------------------------------------


def prepare_metrics_dir() -> str:
    """A clean PROMETHEUS_MULTIPROC_DIR, set before prometheus_client is imported anywhere."""
    path = os.environ.get(METRICS_DIR_ENV)
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        for stale in Path(path).glob("*.db"):
            stale.unlink(missing_ok=True)
    else:
        path = tempfile.mkdtemp(prefix="voxswap-metrics-")
        os.environ["VOXSWAP_OWNS_METRICS_DIR"] = "1"
    os.environ[METRICS_DIR_ENV] = path
    return path


def gunicorn_options(settings: Settings) -> dict[str, Any]:
    """Everything gunicorn needs from voxswap's settings; the hooks close over ``settings``."""

    def on_starting(server: Any) -> None:
        from server.storage.registry import Registry

        Registry(settings.registry).ensure()
        log.info("gunicorn starting", extra={"event": "gunicorn_start", "workers": settings.workers,
                                             "metrics_dir": os.environ.get(METRICS_DIR_ENV)})

    def child_exit(server: Any, worker: Any) -> None:
        # a dead worker's gauges must stop counting, and peers must stop waiting for it
        from prometheus_client import multiprocess

        from server.lifecycle.board import WorkerBoard
        from server.storage.catalog import ModelCatalog

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
        catalog = ModelCatalog(settings.registry, default=settings.default_model)
        for name in catalog.names():  # a worker publishes a heartbeat on every model's board
            WorkerBoard(catalog.registry(name)).withdraw_pid(worker.pid)

    def on_exit(server: Any) -> None:
        path = os.environ.get(METRICS_DIR_ENV)
        if path and os.environ.get("VOXSWAP_OWNS_METRICS_DIR") == "1":
            shutil.rmtree(path, ignore_errors=True)

    return {
        "bind": [f"{settings.host}:{settings.port}"],
        "workers": settings.workers,
        "threads": settings.inference_workers,
        "worker_class": "server.tools.serving.VoxswapWorker",
        "timeout": settings.worker_timeout_s,
        "graceful_timeout": int(settings.shutdown_delay_s + settings.drain_timeout_s) + 5,
        "keepalive": settings.keepalive_timeout_s,
        "forwarded_allow_ips": forwarded_allow_ips(settings),
        "preload_app": False,  # load the model after fork, in each worker
        "control_socket_disable": True,  # gunicorn 27 would otherwise create ~/.gunicorn/gunicorn.ctl
        "accesslog": None,
        "errorlog": "-",
        "loglevel": settings.log_level.lower(),
        "proc_name": "voxswap",
        "on_starting": on_starting,
        "child_exit": child_exit,
        "on_exit": on_exit,
    }


def run_gunicorn(settings: Settings) -> int:
    warn_if_exposed(settings)
    prepare_metrics_dir()
    from gunicorn.app.base import BaseApplication

    class VoxswapGunicorn(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            for key, value in gunicorn_options(settings).items():
                self.cfg.set(key, value)

        def load(self) -> Any:
            from server.app import create_app

            return create_app(settings)

    VoxswapGunicorn().run()
    return 0


class VoxswapWorker(UvicornWorker):  # type: ignore[misc]
    """uvicorn-worker's worker, with voxswap's graceful shutdown and its log routing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        route_server_loggers()  # uvicorn-worker points uvicorn's loggers at gunicorn's handlers

    async def _serve(self) -> None:
        from server.app import begin_shutdown, drain_streams

        app = self.wsgi
        settings: Settings = app.state.ctx.settings
        self.config.app = app
        self.config.http = http_protocol(settings)  # keep-alive comes from gunicorn's own option
        raise_open_files_limit(settings, self.config.backlog)
        self.config.timeout_graceful_shutdown = max(1, round(settings.drain_timeout_s))
        self.config.ws_max_size = ws_max_size(settings)
        server = GracefulServer(self.config, on_shutdown=lambda: begin_shutdown(app),
                                delay_s=settings.shutdown_delay_s, before_close=lambda: drain_streams(app))
        self._install_sigquit_handler()
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
