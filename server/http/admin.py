"""Admin routes, behind the bearer token: update, rollback, reload, load/unload, versions, history.

Every model route exists twice: ``/admin/models/{model}/...`` for a named model and, as in earlier
releases, ``/admin/model/...`` for the default model; one handler serves both. Swaps are
synchronous: the answer comes after the swap finished or failed, with its timings and the memory
it gave back. They run in a thread so the event loop keeps serving transcriptions, and two models'
swaps run at the same time (two of one model: the second is a 409).
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Path, Query, Request, UploadFile
from pydantic import BaseModel, Field

from server.errors import Conflict, NotFound, NotReady, SwapInProgress
from server.http import schemas
from server.http.deps import CtxDep, require_admin
from server.http.status_schemas import CanaryAnswer, CanaryRequest, ModelsAnswer
from server.lifecycle.policy import ModelLifecycle
from server.service.status import model_status
from server.storage.manifest import validate_model_name, validate_new_name
from server.storage.registry import ANY_CURRENT

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)],
                   responses=schemas.errors(401, 403))
SWAP_ERRORS = schemas.errors(400, 404, 409, 422, 503)
ModelName = Annotated[str, Path(description="A model name (GET /admin/models lists them)", max_length=64)]


async def _model_param(model: ModelName) -> None:
    """Declares ``{model}`` on the named routes (their handlers read it through :func:`_lifecycle`)."""


async def _lifecycle(ctx: CtxDep, request: Request) -> ModelLifecycle:
    """The model a route acts on: ``{model}`` of /admin/models/{model}/..., else the default model."""
    name = request.path_params.get("model")
    return ctx.lifecycle if name is None else ctx.models.get(name)


LifecycleDep = Annotated[ModelLifecycle, Depends(_lifecycle)]


def _model_route(method: str, path: str, **options: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a handler at /admin/model{path} (default model) and /admin/models/{model}{path}."""
    def register(handler: Callable[..., Any]) -> Callable[..., Any]:
        router.api_route("/model" + path, methods=[method], **options)(handler)
        named = {**options, "responses": {**options.get("responses", {}), **schemas.errors(404)}}  # unknown model
        router.api_route("/models/{model}" + path, methods=[method], dependencies=[Depends(_model_param)],
                         **named)(handler)
        return handler
    return register


class UpdateRequest(BaseModel):
    version: str = Field(min_length=1, max_length=64)
    expected_current: str | None = Field(default=None, description="409 unless this is the current (committed) version")
    watch_seconds: float | None = Field(default=None, ge=0, le=3600,
                                        description="watch the new version this long; roll back if worse")


class ExpectRequest(BaseModel):
    expected_current: str | None = None


def _expect(body: ExpectRequest | UpdateRequest | CanaryRequest | None) -> Any:
    if body is None or "expected_current" not in body.model_fields_set:
        return ANY_CURRENT
    return body.expected_current


@router.get("/models", response_model=ModelsAnswer)
async def models(ctx: CtxDep) -> dict[str, Any]:
    """Every named model: state, live and previous version, memory, versions, workers, rollout, watch."""
    def collect() -> dict[str, Any]:
        ctx.models.discover()
        return {"default": ctx.models.default.name, "models": [model_status(ctx, m) for m in ctx.models]}
    return await asyncio.to_thread(collect)


@_model_route("POST", "/update", response_model=schemas.SwapReport, responses=SWAP_ERRORS)
async def update(lifecycle: LifecycleDep, body: UpdateRequest) -> dict[str, Any]:
    lifecycle.registry.manifest(body.version)  # 404 before any work
    report = await asyncio.to_thread(lifecycle.swap_to, body.version, expected_current=_expect(body),
                                     event="promote", actor="admin", watch_seconds=body.watch_seconds)
    return report.to_json()


@_model_route("GET", "/watch", response_model=schemas.WatchAnswer)
async def watch(lifecycle: LifecycleDep) -> dict[str, Any]:
    """The model's last post-swap watch: watching, passed, rolled_back, inconclusive or superseded."""
    return {"watch": lifecycle.watch.current()}


@_model_route("POST", "/rollback", response_model=schemas.SwapReport, responses=SWAP_ERRORS)
async def rollback(lifecycle: LifecycleDep, body: ExpectRequest | None = None) -> dict[str, Any]:
    target = lifecycle.registry.rollback_target()
    report = await asyncio.to_thread(lifecycle.swap_to, target, expected_current=_expect(body),
                                     event="rollback", actor="admin")
    return report.to_json()


@_model_route("POST", "/reload", response_model=schemas.SwapReport, responses=SWAP_ERRORS)
async def reload(lifecycle: LifecycleDep) -> dict[str, Any]:
    """Build the current version afresh beside itself (e.g. after a suspected leak), blue/green."""
    current = lifecycle.live_version or lifecycle.registry.state().current
    if current is None:
        raise NotReady(f"nothing to reload: model {lifecycle.name!r} has no current version")
    report = await asyncio.to_thread(lifecycle.swap_to, current, event="reload", actor="admin",
                                     commit_registry=False)
    return report.to_json()


@_model_route("POST", "/load", response_model=schemas.SwapReport, responses=SWAP_ERRORS)
async def load(lifecycle: LifecycleDep) -> dict[str, Any]:
    if lifecycle.live is not None:
        raise Conflict(f"version {lifecycle.live_version!r} of model {lifecycle.name!r} is already loaded; "
                       "use update or reload")
    report = await asyncio.to_thread(lifecycle.load, actor="admin")
    if report is None:
        raise NotReady(lifecycle.not_ready_reason())
    return report.to_json()


@_model_route("POST", "/unload", response_model=schemas.Unloaded | schemas.NothingUnloaded,
              responses=schemas.errors(404, 409))
async def unload(lifecycle: LifecycleDep) -> dict[str, Any]:
    return await asyncio.to_thread(lifecycle.unload, actor="admin")


@_model_route("GET", "/versions", response_model=schemas.VersionList, responses=schemas.errors(404))
async def versions(lifecycle: LifecycleDep) -> dict[str, Any]:
    state = lifecycle.registry.state()
    loaded = set(lifecycle.loaded_versions())
    return {
        "current": state.current,
        "previous": state.previous,
        "generation": state.generation,
        "live": lifecycle.live_version,
        "versions": [
            {**m.to_json(), "current": m.name == state.current, "previous": m.name == state.previous,
             "loaded": m.name in loaded, "golden_smoke": bool(m.smoke)}
            for m in lifecycle.registry.versions()
        ],
    }


@_model_route("POST", "/versions", status_code=201, response_model=schemas.Manifest,
              responses=schemas.errors(400, 409, 413, 422))
async def upload_version(
    ctx: CtxDep,
    request: Request,
    version: Annotated[str, Form()],
    file: Annotated[UploadFile, File(description="tar.gz of a version folder")],
    kind: Annotated[str | None, Form(description="The model kind; detected from the files when not sent",
                                     max_length=64)] = None,
) -> dict[str, Any]:
    """Add a version from a tar.gz (as deploy.sh sends it); checksums are verified on arrival. A
    named model that does not exist yet is created, of the kind its files show (or ``kind``).

    The archive is kept in a folder of the registry's ``.staging`` that this process owns while it
    works, so one a killed server left is found and removed at the next start, and a live one never.
    """
    model = request.path_params.get("model", ctx.models.default.name)
    validate_model_name(model)  # 400 before a possibly large archive is copied
    validate_new_name(version)
    with ctx.registry.work_folder("received") as folder:
        archive = folder / "version.tar.gz"
        with archive.open("wb") as out:
            await asyncio.to_thread(shutil.copyfileobj, file.file, out)
        manifest = await asyncio.to_thread(ctx.catalog.add_archive, model, archive, version, kind=kind,
                                           actor="admin")
    ctx.models.discover()
    return manifest.to_json()


@_model_route("DELETE", "/versions/{name}", response_model=schemas.Removed, responses=schemas.errors(400, 404, 409))
async def remove_version(lifecycle: LifecycleDep, name: str) -> dict[str, Any]:
    if name in lifecycle.loaded_versions():
        raise Conflict(f"version {name!r} of model {lifecycle.name!r} is loaded and cannot be removed")
    await asyncio.to_thread(lifecycle.registry.remove, name, actor="admin",
                            guard=lambda: _not_rolling_out(lifecycle, name))
    return {"removed": name}


def _not_rolling_out(lifecycle: ModelLifecycle, name: str) -> None:
    """409 while any worker builds ``name`` for an update: it is not loaded yet, so without this the
    files would go from under the build, and the update would fail its verification instead.

    Called under the registry lock, under which rollouts are claimed: none can begin meanwhile.
    """
    board = lifecycle.board
    rollout = board.rollout()
    if rollout and rollout.version == name and rollout.phase in ("staging", "committed") and not board.stale(rollout):
        raise SwapInProgress(f"version {name!r} is being rolled out by an update; remove it once the update "
                             "has finished (and it is neither current nor previous)", retry_after=2)


@router.get("/history", response_model=schemas.History, responses=schemas.errors(400, 404))
async def history(
    ctx: CtxDep,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    model: Annotated[str | None, Query(max_length=64, description="One model's events; every model's without")] = None,
) -> dict[str, Any]:
    return {"events": await asyncio.to_thread(ctx.catalog.history, model, limit)}


@_model_route("POST", "/canary", response_model=CanaryAnswer, responses=SWAP_ERRORS)
async def start_canary(ctx: CtxDep, lifecycle: LifecycleDep, body: CanaryRequest) -> dict[str, Any]:
    """Build the candidate beside the live version on every worker (the usual gate), then let it
    answer a share of clients (canary) or shadow a share of requests, and judge it: promote, hold
    or drop it by itself. Answers once the candidate serves; GET follows the comparison."""
    s = ctx.settings
    criteria = body.criteria.model_dump(exclude_none=True) if body.criteria else None
    state = await asyncio.to_thread(
        lifecycle.canary.start, body.version, mode=body.mode or s.canary_mode,
        percent=body.percent or s.canary_percent, duration_s=body.duration_s or s.canary_duration_s,
        on_pass=body.on_pass or s.canary_on_pass, criteria=criteria, expected_current=_expect(body))
    return state.to_json()


@_model_route("GET", "/canary", response_model=CanaryAnswer, responses=schemas.errors(404))
async def canary_status(lifecycle: LifecycleDep) -> dict[str, Any]:
    state = await asyncio.to_thread(lifecycle.canary.current)
    if state is None:
        raise NotFound(f"model {lifecycle.name!r} has had no canary")
    return state.to_json()


@_model_route("DELETE", "/canary", response_model=CanaryAnswer, responses=schemas.errors(404, 409))
async def stop_canary(lifecycle: LifecycleDep) -> dict[str, Any]:
    """End the running canary: the candidate is dropped (unloaded and freed) on every worker."""
    return (await asyncio.to_thread(lifecycle.canary.stop)).to_json()
