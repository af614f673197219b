"""The app factory: ``create_app(settings)`` builds everything; the lifespan loads the model.

Run it with ``uvicorn --factory server.app:create_app`` or ``voxswap serve``. Nothing heavy happens
at import, and all state hangs off ``app.state.ctx``, so tests can run isolated apps side by side.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress

from fastapi import FastAPI

from server.errors import VoxswapError
from server.http import admin, jobs, page, pipelines, realtime, transcribe, ui
from server.http.errors import install_error_handlers
from server.http.middleware import RequestContextMiddleware
from server.lifecycle.models import ModelSet
from server.lifecycle.policy import ModelLifecycle
from server.logs import quiet_denied_handshakes
from server.metrics import Metrics
from server.service import background
from server.service.context import AppContext
from server.service.inference import InferencePool
from server.service.jobs import JobRunner
from server.service.pipeline import PipelineGate
from server.service.stream_session import StreamServices
from server.service.streams import StreamHub
from server.service.transcription import TranscriptionService
from server.settings import Settings
from server.storage import seed
from server.storage.catalog import ModelCatalog
from server.storage.jobs_url import open_job_store
from server.storage.pipelines import PipelineStore

log = logging.getLogger("voxswap.app")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    catalog = ModelCatalog(settings.registry, default=settings.default_model)
    metrics = Metrics()
    models = ModelSet(catalog, settings, metrics)
    pool = InferencePool(workers=settings.inference_workers, max_queue=settings.max_queue,
                         timeout_s=settings.inference_timeout_s, metrics=metrics,
                         batch_max=settings.batch_max_size, batch_wait_s=settings.batch_wait_ms / 1000)
    service = TranscriptionService(models, pool, settings, metrics)
    ctx = AppContext(settings, catalog, metrics, models, pool, service)
    ctx.pipelines = PipelineStore(catalog)
    models.pipeline_gate = PipelineGate(models, ctx.pipelines, settings).check
    ctx.streams = StreamHub(StreamServices(settings, models, ctx.pipelines, service, pool, metrics))
    jobs_url = settings.jobs_url.get_secret_value() if settings.jobs_url else None
    store = open_job_store(jobs_url, settings.data_dir, blob_limit=settings.jobs_blob_limit_bytes)
    ctx.jobs = JobRunner(store, service, pool, models.default, settings, ctx.pipelines)
    for gauge in (metrics.jobs_pending, metrics.jobs_running):
        gauge.labels(ctx.jobs.queue_label).set(0)  # the series exists before the first heartbeat
    models.after_swap = lambda report: background.check_memory_budget(ctx, report)

    # public_docs off: /docs and /openapi.json are not mounted (404 as any unknown path); behind the
    # token they would be no use, as Swagger's page cannot send one for /openapi.json
    docs = settings.public_docs
    app = FastAPI(title="voxswap", version=_package_version(), lifespan=_lifespan, redoc_url=None,
                  docs_url="/docs" if docs else None, openapi_url="/openapi.json" if docs else None)
    app.state.ctx = ctx
    install_error_handlers(app)
    quiet_denied_handshakes()
    for router in (transcribe.router, realtime.router, jobs.router, admin.router, pipelines.router, ui.router,
                   page.router):
        app.include_router(router)
    app.add_middleware(RequestContextMiddleware, ctx=ctx)  # type: ignore[arg-type]
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    ctx: AppContext = app.state.ctx
    ctx.registry.ensure()
    if ctx.settings.seed_demo:
        await asyncio.to_thread(seed.seed_if_empty, ctx.registry)
    ctx.models.discover()
    for lifecycle in ctx.models:
        await _start_model(lifecycle)
    ctx.tasks.append(asyncio.create_task(background.follow_registry(ctx), name="voxswap-registry-watch"))
    ctx.tasks.append(asyncio.create_task(background.heartbeat(ctx), name="voxswap-heartbeat"))
    if ctx.jobs is not None:
        ctx.jobs.start()
    log.info("voxswap ready", extra={"event": "ready", "registry": str(ctx.registry.root),
                                     "models": {m.name: m.live_version for m in ctx.models}})
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
        ctx.service.shadow.shutdown()
        await asyncio.to_thread(ctx.pool.shutdown)
        ctx.models.shutdown()


async def _start_model(lifecycle: ModelLifecycle) -> None:
    """Clear what crashes left in the model's registry, then load its current version. One model
    that cannot load serves 503 for itself only; the others start regardless."""
    leftovers = await asyncio.to_thread(lifecycle.registry.clean_leftovers)  # only what no live process owns
    if leftovers:
        log.warning("removed what crashed adds, uploads and writes left in the registry",
                    extra={"event": "staging_cleaned", "model": lifecycle.name, "leftovers": leftovers})
    try:
        await asyncio.to_thread(lifecycle.load_current)
    except VoxswapError as exc:
        log.error("a model could not be loaded at start; it answers 503 until a version is promoted",
                  extra={"event": "startup_load_failed", "model": lifecycle.name, "reason": exc.message})


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("voxswap")
    except PackageNotFoundError:
        return "0.0.0"


def begin_shutdown(app: FastAPI) -> bool:
    """SIGTERM arrived: see :func:`server.service.background.begin_shutdown`. Realtime sessions start
    draining now (no new turn; each closes with 1012 once its open turn is transcribed)."""
    ctx: AppContext = app.state.ctx
    recycled = background.begin_shutdown(ctx)
    ctx.streams.begin_drain()
    return recycled


async def drain_streams(app: FastAPI) -> None:
    """Before the server closes its connections (uvicorn would close WebSockets mid-turn): wait
    for the realtime sessions to end their turns and close themselves."""
    ctx: AppContext = app.state.ctx
    ctx.streams.begin_drain()
    await ctx.streams.drained(ctx.settings.drain_timeout_s + ctx.settings.inference_timeout_s)
