"""Admin routes, behind the bearer token: update, rollback, reload, load/unload, versions, history.

Swaps are synchronous: the answer comes after the swap finished or failed, with its timings and the
memory it gave back. They run in a thread so the event loop keeps serving transcriptions.
"""

from __future__ import annotations

import asyncio
import shutil
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from pydantic import BaseModel, Field

from server.errors import Conflict, NotReady, SwapInProgress
from server.http import schemas
from server.http.deps import CtxDep, require_admin
from server.service.context import AppContext
from server.storage.manifest import validate_new_name
from server.storage.registry import ANY_CURRENT

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)],
                   responses=schemas.errors(401, 403))
SWAP_ERRORS = schemas.errors(400, 404, 409, 422, 503)


class UpdateRequest(BaseModel):
    version: str = Field(min_length=1, max_length=64)
    expected_current: str | None = Field(default=None, description="409 unless this is the current (committed) version")
    watch_seconds: float | None = Field(default=None, ge=0, le=3600,
                                        description="watch the new version this long; roll back if worse")


class ExpectRequest(BaseModel):
    expected_current: str | None = None


def _expect(body: ExpectRequest | UpdateRequest | None) -> Any:
    if body is None or "expected_current" not in body.model_fields_set:
        return ANY_CURRENT
    return body.expected_current


@router.post("/model/update", response_model=schemas.SwapReport, responses=SWAP_ERRORS)
async def update(ctx: CtxDep, body: UpdateRequest) -> dict[str, Any]:
    ctx.registry.manifest(body.version)  # 404 before any work
    report = await asyncio.to_thread(ctx.lifecycle.swap_to, body.version, expected_current=_expect(body),
                                     event="promote", actor="admin", watch_seconds=body.watch_seconds)
    return report.to_json()


@router.get("/model/watch", response_model=schemas.WatchAnswer)
async def watch(ctx: CtxDep) -> dict[str, Any]:
    """The last post-swap watch: watching, passed, rolled_back, inconclusive or superseded."""
    return {"watch": ctx.lifecycle.watch.current()}


@router.post("/model/rollback", response_model=schemas.SwapReport, responses=SWAP_ERRORS)
async def rollback(ctx: CtxDep, body: ExpectRequest | None = None) -> dict[str, Any]:
    target = ctx.registry.rollback_target()
    report = await asyncio.to_thread(ctx.lifecycle.swap_to, target, expected_current=_expect(body),
                                     event="rollback", actor="admin")
    return report.to_json()


@router.post("/model/reload", response_model=schemas.SwapReport, responses=SWAP_ERRORS)
async def reload(ctx: CtxDep) -> dict[str, Any]:
    """Build the current version afresh beside itself (e.g. after a suspected leak), blue/green."""
    current = ctx.lifecycle.live_version or ctx.registry.state().current
    if current is None:
        raise NotReady("nothing to reload: no version is current")
    report = await asyncio.to_thread(ctx.lifecycle.swap_to, current, event="reload", actor="admin",
                                     commit_registry=False)
    return report.to_json()


@router.post("/model/load", response_model=schemas.SwapReport, responses=SWAP_ERRORS)
async def load(ctx: CtxDep) -> dict[str, Any]:
    if ctx.lifecycle.live is not None:
        raise Conflict(f"version {ctx.lifecycle.live_version!r} is already loaded; use update or reload")
    report = await asyncio.to_thread(ctx.lifecycle.load, actor="admin")
    if report is None:
        raise NotReady(ctx.lifecycle.not_ready_reason())
    return report.to_json()


@router.post("/model/unload", response_model=schemas.Unloaded | schemas.NothingUnloaded,
             responses=schemas.errors(409))
async def unload(ctx: CtxDep) -> dict[str, Any]:
    return await asyncio.to_thread(ctx.lifecycle.unload, actor="admin")


@router.get("/model/versions", response_model=schemas.VersionList)
async def versions(ctx: CtxDep) -> dict[str, Any]:
    state = ctx.registry.state()
    loaded = set(ctx.lifecycle.loaded_versions())
    return {
        "current": state.current,
        "previous": state.previous,
        "generation": state.generation,
        "live": ctx.lifecycle.live_version,
        "versions": [
            {**m.to_json(), "current": m.name == state.current, "previous": m.name == state.previous,
             "loaded": m.name in loaded, "golden_smoke": bool(m.smoke)}
            for m in ctx.registry.versions()
        ],
    }


@router.post("/model/versions", status_code=201, response_model=schemas.Manifest,
             responses=schemas.errors(400, 409, 413, 422))
async def upload_version(
    ctx: CtxDep,
    version: Annotated[str, Form()],
    file: Annotated[UploadFile, File(description="tar.gz of a version folder")],
) -> dict[str, Any]:
    """Add a version from a tar.gz (as deploy.sh sends it); checksums are verified on arrival.

    The archive is kept in a folder of the registry's ``.staging`` that this process owns while it
    works, so one a killed server left is found and removed at the next start, and a live one never.
    """
    validate_new_name(version)  # 400 before a possibly large archive is copied
    with ctx.registry.work_folder("received") as folder:
        archive = folder / "version.tar.gz"
        with archive.open("wb") as out:
            await asyncio.to_thread(shutil.copyfileobj, file.file, out)
        manifest = await asyncio.to_thread(ctx.registry.add_archive, archive, version, actor="admin")
    return manifest.to_json()


@router.delete("/model/versions/{name}", response_model=schemas.Removed,
               responses=schemas.errors(400, 404, 409))
async def remove_version(ctx: CtxDep, name: str) -> dict[str, Any]:
    if name in ctx.lifecycle.loaded_versions():
        raise Conflict(f"version {name!r} is loaded and cannot be removed")
    await asyncio.to_thread(ctx.registry.remove, name, actor="admin", guard=lambda: _not_rolling_out(ctx, name))
    return {"removed": name}


def _not_rolling_out(ctx: AppContext, name: str) -> None:
    """409 while any worker builds ``name`` for an update: it is not loaded yet, so without this the
    files would go from under the build, and the update would fail its verification instead.

    Called under the registry lock, under which rollouts are claimed: none can begin meanwhile.
    """
    board = ctx.lifecycle.board
    rollout = board.rollout()
    if rollout and rollout.version == name and rollout.phase in ("staging", "committed") and not board.stale(rollout):
        raise SwapInProgress(f"version {name!r} is being rolled out by an update; remove it once the update "
                             "has finished (and it is neither current nor previous)", retry_after=2)


@router.get("/history", response_model=schemas.History, responses=schemas.errors(400))
async def history(ctx: CtxDep, limit: Annotated[int, Query(ge=1, le=10_000)] = 100) -> dict[str, Any]:
    return {"events": ctx.registry.history(limit)}
