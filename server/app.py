"""The app factory: ``create_app(settings)`` builds everything; the lifespan loads the model.

Run it with ``uvicorn --factory server.app:create_app`` or ``voxswap serve``. Nothing heavy happens
at import, and all state hangs off ``app.state.ctx``, so tests can run isolated apps side by side.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import IO, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server import demo
from server.errors import PayloadTooLarge, VoxswapError, envelope
from server.inference import InferencePool
from server.jobs import JobRunner, JobStore
from server.loader import ModelLoader, SwapReport
from server.logs import request_id_var
from server.metrics import Metrics
from server.registry import Registry
from server.service import TranscriptionService
from server.settings import Settings

log = logging.getLogger("voxswap.app")
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
UPLOAD_PREFIXES = ("/api/transcribe", "/v1/audio/", "/admin/model/versions", "/api/jobs")
UPLOAD_ROUTES = frozenset({"/api/transcribe", "/v1/audio/transcriptions", "/admin/model/versions", "/api/jobs"})
UNCOUNTED_PATHS = frozenset({"/health", "/health/live", "/health/ready", "/metrics"})  # probes and scrapes
TRANSCRIPTION_PREFIXES = ("/api/transcribe", "/v1/audio/")  # what voxswap_requests_in_flight counts
STAGING_MAX_AGE_S = 3600.0  # older staging folders belong to no add that is still running


@dataclass
class AppContext:
    """Everything long-lived that one app owns."""

    settings: Settings
    registry: Registry
    metrics: Metrics
    loader: ModelLoader
    pool: InferencePool
    service: TranscriptionService
    started_at: float = field(default_factory=time.time)
    shutting_down: bool = False
    recycle_reason: str | None = None  # set after a swap left this worker over its memory budget
    recycling: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _recycle_lock: IO[str] | None = None
    jobs: JobRunner | None = None  # batch jobs (server/jobs.py)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    registry = Registry(settings.registry)
    metrics = Metrics()
    loader = ModelLoader(registry, settings, metrics)
    pool = InferencePool(workers=settings.inference_workers, max_queue=settings.max_queue,
                         timeout_s=settings.inference_timeout_s, metrics=metrics)
    service = TranscriptionService(loader, pool, settings, metrics)
    ctx = AppContext(settings, registry, metrics, loader, pool, service)
    ctx.jobs = JobRunner(JobStore(settings.data_dir), service, pool, loader, settings)
    loader.after_swap = lambda report: _check_memory_budget(ctx, report)

    app = FastAPI(title="voxswap", version=_package_version(), lifespan=_lifespan,
                  docs_url="/docs", redoc_url=None)
    app.state.ctx = ctx
    _install_error_handlers(app)

    from server import admin, api, jobs_api, web

    app.include_router(api.router)
    app.include_router(jobs_api.router)
    app.include_router(admin.router)
    app.include_router(web.router)
    app.add_middleware(RequestContextMiddleware, ctx=ctx)  # type: ignore[arg-type]
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    ctx: AppContext = app.state.ctx
    ctx.registry.ensure()
    leftovers = await asyncio.to_thread(ctx.registry.clean_staging, older_than_s=STAGING_MAX_AGE_S)
    if leftovers:
        log.warning("removed what interrupted adds left in the registry's staging folder",
                    extra={"event": "staging_cleaned", "leftovers": leftovers})
    if ctx.settings.seed_demo:
        await asyncio.to_thread(demo.seed_if_empty, ctx.registry)
    try:
        await asyncio.to_thread(ctx.loader.load_current)
    except VoxswapError as exc:
        log.error("no model could be loaded at start; serving 503 until one is promoted",
                  extra={"event": "startup_load_failed", "reason": exc.message})
    ctx.tasks.append(asyncio.create_task(_watch_registry(ctx), name="voxswap-registry-watch"))
    ctx.tasks.append(asyncio.create_task(_heartbeat(ctx), name="voxswap-heartbeat"))
    if ctx.jobs is not None:
        ctx.jobs.start()
    live = ctx.loader.live
    log.info("voxswap ready", extra={"event": "ready", "version": live.version if live else None,
                                     "registry": str(ctx.registry.root)})
    try:
        yield
    finally:
        ctx.shutting_down = True
        if ctx.jobs is not None:
            await ctx.jobs.stop()  # a job cut short goes back to pending
        for task in ctx.tasks:
            task.cancel()
        for task in ctx.tasks:
            with suppress(asyncio.CancelledError):
                await task
        await asyncio.to_thread(ctx.pool.shutdown)
        ctx.loader.shutdown()


async def _watch_registry(ctx: AppContext) -> None:
    """Follow state.json (one stat per tick) and rollout.json, so a CLI promote, a peer's rollout or
    an operator's unload reaches this process."""
    # the first tick always compares generations: a commit may land between this process loading
    # its model and this loop starting, and no later change of state.json would announce it
    last: tuple[int, int, int] | None = None
    pending = True
    while True:
        await asyncio.sleep(ctx.settings.watch_interval_s)
        try:
            signature = ctx.registry.state_signature()
            if signature != last or pending:
                last = signature
                pending = not await asyncio.to_thread(ctx.loader.follow_registry)
            if ctx.loader.board.rollout_path.exists() or ctx.loader.has_candidate:
                await asyncio.to_thread(ctx.loader.follow_rollout)
        except Exception:  # the watcher must survive anything one swap does, and try again
            pending = True
            log.exception("following the registry failed", extra={"event": "watch_error"})


async def _heartbeat(ctx: AppContext) -> None:
    """Publish this process's heartbeat and refresh its memory gauge; sweep dead workers' files."""
    beats = 0
    while True:
        try:
            ctx.metrics.refresh_process()
            await asyncio.to_thread(ctx.loader.publish)
            if ctx.jobs is not None and ctx.jobs.store.exists():
                ctx.metrics.jobs_pending.set(await asyncio.to_thread(ctx.jobs.store.pending))
            if beats % 10 == 0:
                await asyncio.to_thread(ctx.loader.board.sweep)
        except Exception:
            log.exception("heartbeat failed", extra={"event": "heartbeat_error"})
        # a watch runs in the process that swapped, which is the one a swap pushes over budget:
        # recycling it mid-watch would leave the verdict at "watching" for good
        if ctx.recycle_reason and not ctx.shutting_down and not ctx.recycling and not ctx.loader.watch.running:
            await asyncio.to_thread(_try_recycle, ctx)
        beats += 1
        await asyncio.sleep(ctx.settings.heartbeat_interval_s)


def _check_memory_budget(ctx: AppContext, report: SwapReport) -> None:
    """Only a swap that freed an old model is judged: memory it did not give back is the leak that
    recycling cures. A fresh worker's first load is its baseline, not a leak."""
    budget = ctx.settings.memory_budget_mb
    if not budget or ctx.settings.workers < 2:
        return  # a lone process cannot be replaced without a gap; the metric and alert say it instead
    if not report.from_version or "rss_before_free_bytes" not in report.memory:
        return
    version = report.version
    rss = ctx.metrics.refresh_process()
    if rss > budget * 2**20:
        ctx.recycle_reason = (f"resident memory {rss / 2**20:.0f} MiB after the swap to {version!r} "
                              f"exceeds the {budget} MiB budget")


def _try_recycle(ctx: AppContext) -> None:
    """Leave gracefully so gunicorn starts a fresh worker, but only when every other worker serves
    and no other worker is being recycled: one at a time, never a gap in capacity."""
    peers = ctx.loader.board.peers()
    if len(peers) + 1 < ctx.settings.workers or any(p.state != "ready" for p in peers):
        return
    handle = (ctx.registry.root / ".recycle.lock").open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return
    ctx._recycle_lock = handle  # held until this process exits; the next worker waits for it
    ctx.recycling = True
    ctx.registry.record("recycle", pid=os.getpid(), version=ctx.loader.live_version, actor="memory_budget",
                        outcome="started", reason=ctx.recycle_reason)
    log.warning("recycling this worker", extra={"event": "recycle", "reason": ctx.recycle_reason})
    os.kill(os.getpid(), signal.SIGTERM)


def begin_shutdown(app: FastAPI) -> bool:
    """SIGTERM arrived: readiness turns 503 now; serving goes on until the server stops accepting.

    Returns whether peers on the same listening socket cover for this worker (it is being
    recycled), so it can stop accepting at once instead of waiting for a load balancer to notice.
    """
    ctx: AppContext = app.state.ctx
    ctx.loader.draining = True
    if ctx.recycling:
        return True  # peers keep this instance ready; only this worker leaves
    if not ctx.shutting_down:
        ctx.shutting_down = True
        log.info("shutdown requested: readiness is 503, still serving",
                 extra={"event": "shutdown_begin", "delay_s": ctx.settings.shutdown_delay_s})
        with suppress(OSError):
            ctx.loader.publish()
    return False


def _install_error_handlers(app: FastAPI) -> None:
    async def voxswap_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, VoxswapError)
        body = envelope(exc.message, type_=exc.type, code=exc.code, param=exc.param,
                        request_id=request_id_var.get())
        report = getattr(exc, "report", None)
        if report:
            body["error"]["report"] = report  # type: ignore[index]
        headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if exc.retry_after else {}
        if exc.status_code == 409 and not exc.retry_after:
            headers["x-should-retry"] = "false"  # the openai client retries 409s unless told this one won't pass
        if exc.status_code >= 500 and exc.status_code not in (503, 504):
            log.error("request failed", exc_info=exc)
        return JSONResponse(body, status_code=exc.status_code, headers=headers)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = f"{param or 'request'}: {first.get('msg', 'invalid value')}"
        return JSONResponse(envelope(message, type_="invalid_request_error", code="invalid_request",
                                     param=param, request_id=request_id_var.get()), status_code=400)

    async def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error", exc_info=exc)
        return JSONResponse(envelope("internal server error", type_="server_error",
                                     code="internal_error", request_id=request_id_var.get()),
                            status_code=500)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(envelope(str(exc.detail), type_="invalid_request_error", code=code,
                                     request_id=request_id_var.get()),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(VoxswapError, voxswap_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected_error)


class RequestContextMiddleware:
    """Request id, upload size limit, and request metrics, as plain ASGI (no per-request copies)."""

    def __init__(self, app: ASGIApp, ctx: AppContext):
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        incoming = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if REQUEST_ID_RE.fullmatch(incoming) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        path: str = scope.get("path", "")
        counted = path not in UNCOUNTED_PATHS
        transcription = path.startswith(TRANSCRIPTION_PREFIXES)
        limit = self.ctx.settings.max_upload_bytes
        status = {"code": 500, "version": "none"}
        started = time.perf_counter()
        metrics = self.ctx.metrics
        body_limit: _BodyLimit | None = None
        if transcription:
            metrics.in_flight.inc()
        try:
            if path.startswith(UPLOAD_PREFIXES) and scope.get("method") == "POST":
                length = headers.get(b"content-length")
                if length is not None and length.isdigit() and int(length) > limit:
                    await self._refuse_too_large(send, request_id, int(length), limit)
                    status["code"] = 413
                    metrics.rejections.labels("too_large").inc()
                    return
                receive = body_limit = _BodyLimit(receive, limit)

            async def send_wrapper(message: Message) -> None:
                if body_limit is not None and body_limit.exceeded:
                    # FastAPI answers an error raised while it reads the body with its own 400
                    if message["type"] == "http.response.start":
                        status["code"] = 413
                        metrics.rejections.labels("too_large").inc()
                        await self._refuse_too_large(send, request_id, None, limit)
                    return
                if message["type"] == "http.response.start":
                    status["code"] = message["status"]
                    raw = list(message.get("headers", []))
                    for key, value in raw:
                        if key.lower() == b"x-model-version":
                            status["version"] = value.decode()
                    raw.append((b"x-request-id", request_id.encode()))
                    if self.ctx.loader.draining:
                        # a client told to close now never races the idle-connection close at shutdown
                        raw.append((b"connection", b"close"))
                    message["headers"] = raw
                await send(message)

            await self.app(scope, receive, send_wrapper)
        finally:
            if transcription:
                metrics.in_flight.dec()
            if counted:
                label = self._route_label(scope)
                metrics.requests.labels(label, str(status["code"]), status["version"]).inc()
                metrics.request_duration.labels(label, status["version"]).observe(time.perf_counter() - started)
            request_id_var.reset(token)

    @staticmethod
    def _route_label(scope: Scope) -> str:
        """The route's template (never the raw path: one series per job id would be unbounded). An
        upload refused before routing (413 from its Content-Length) still gets its route's name."""
        route = getattr(scope.get("route"), "path", None)
        if route is None and scope.get("path") in UPLOAD_ROUTES:
            route = scope["path"]
        return route or "unmatched"

    async def _refuse_too_large(self, send: Send, request_id: str, length: int | None, limit: int) -> None:
        message = (f"the upload is {length} bytes; this server accepts at most {limit} bytes" if length
                   else f"the upload exceeds {limit} bytes, the most this server accepts")
        body = envelope(message, type_="invalid_request_error", code="payload_too_large", param="file",
                        request_id=request_id)
        response = JSONResponse(body, status_code=413, headers={"x-request-id": request_id,
                                                                "connection": "close"})
        await response({"type": "http"}, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}


class _BodyLimit:
    """Count body bytes as they arrive, for uploads sent without a Content-Length."""

    def __init__(self, receive: Receive, limit: int):
        self.receive = receive
        self.limit = limit
        self.seen = 0
        self.exceeded = False

    async def __call__(self) -> Message:
        message = await self.receive()
        if message["type"] == "http.request":
            self.seen += len(message.get("body", b""))
            if self.seen > self.limit:
                self.exceeded = True
                raise PayloadTooLarge(f"the upload is larger than {self.limit} bytes", param="file")
        return message


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("voxswap")
    except PackageNotFoundError:
        return "0.0.0"
