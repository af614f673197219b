"""Running the app: one uvicorn process, or gunicorn with many, both shutting down gracefully.

SIGTERM handling, in order: readiness turns 503 at once; the process keeps serving for
``shutdown_delay_s`` so a load balancer notices; then it stops accepting, lets in-flight requests
finish (up to ``drain_timeout_s``), runs the lifespan shutdown and exits 0.

Under gunicorn the model is loaded in each worker after fork (never in the master: an onnxruntime
session inherited across fork is unsafe), and a worker takes no traffic until its model is loaded.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
from collections.abc import Callable, Generator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn
from gunicorn.arbiter import Arbiter
from uvicorn_worker import UvicornWorker

from server.logs import route_server_loggers
from server.settings import Settings

log = logging.getLogger("voxswap.serving")
METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"


class GracefulServer(uvicorn.Server):
    """uvicorn, with a readiness-first shutdown delay and exit code 0 after a graceful stop."""

    def __init__(self, config: uvicorn.Config, *, on_shutdown: Callable[[], bool], delay_s: float):
        super().__init__(config)
        self._on_shutdown = on_shutdown
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
    from server.app import begin_shutdown, create_app

    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None,
                            timeout_graceful_shutdown=max(1, round(settings.drain_timeout_s)))
    server = GracefulServer(config, on_shutdown=lambda: begin_shutdown(app), delay_s=settings.shutdown_delay_s)
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
        from server.storage.registry import Registry

        multiprocess.mark_process_dead(worker.pid)  # type: ignore[no-untyped-call]
        WorkerBoard(Registry(settings.registry)).withdraw(worker.pid)

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
        "keepalive": 5,
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
        from server.app import begin_shutdown

        app = self.wsgi
        settings: Settings = app.state.ctx.settings
        self.config.app = app
        self.config.timeout_graceful_shutdown = max(1, round(settings.drain_timeout_s))
        server = GracefulServer(self.config, on_shutdown=lambda: begin_shutdown(app),
                                delay_s=settings.shutdown_delay_s)
        self._install_sigquit_handler()
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
