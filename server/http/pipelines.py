"""Admin routes for named pipelines (behind the token): list, read, set, remove.

A pipeline names the model of each stage; the stages' versions are their models' live ones, each
swapped blue/green through the model routes (``/admin/models/NAME/update``).
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path
from pydantic import Field

from server.errors import NotReady
from server.http import schemas
from server.http.deps import CtxDep, require_admin
from server.http.schemas import Closed
from server.service.context import AppContext
from server.storage.pipelines import PipelineStore

router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(require_admin)],
                   responses=schemas.errors(401, 403))
PipelineName = Annotated[str, Path(description="A pipeline name (shares the namespace of model names)", max_length=64)]


class PipelineBody(Closed):
    asr: str = Field(min_length=1, max_length=64, description="The speech recognition stage's model")
    vad: str | None = Field(None, max_length=64, description="A voice activity detection model (fsmn-vad)")
    punc: str | None = Field(None, max_length=64, description="A punctuation model (ct-punc)")


class GoldenClip(Closed):
    audio: str = Field(description="The clip's file, relative to the registry folder")
    text: str = Field(description="What the whole pipeline must answer for it")


class PipelineAnswer(PipelineBody):
    name: str
    created_at: float
    updated_at: float
    smoke: list[GoldenClip] = Field(description="Golden clips a new version of any stage must pass through the "
                                                "whole pipeline (voxswap pipeline set --smoke-audio/--smoke-text)")


class PipelineList(Closed):
    pipelines: list[PipelineAnswer]


def _store(ctx: AppContext) -> PipelineStore:
    if ctx.pipelines is None:
        raise NotReady("this server keeps no pipelines")
    return ctx.pipelines


@router.get("/pipelines", response_model=PipelineList)
async def list_pipelines(ctx: CtxDep) -> dict[str, Any]:
    return {"pipelines": [p.to_json() for _, p in sorted(_store(ctx).all().items())]}


@router.get("/pipelines/{name}", response_model=PipelineAnswer, responses=schemas.errors(404))
async def get_pipeline(ctx: CtxDep, name: PipelineName) -> dict[str, Any]:
    return _store(ctx).get(name).to_json()


@router.put("/pipelines/{name}", response_model=PipelineAnswer, responses=schemas.errors(400, 404, 409))
async def set_pipeline(ctx: CtxDep, name: PipelineName, body: PipelineBody) -> dict[str, Any]:
    """Create or change a pipeline: each stage's model must exist and be of the stage's kind."""
    store = _store(ctx)
    pipeline = await asyncio.to_thread(store.set, name, asr=body.asr, vad=body.vad, punc=body.punc, actor="admin")
    await asyncio.to_thread(ctx.models.discover)
    return pipeline.to_json()


@router.delete("/pipelines/{name}", response_model=PipelineAnswer, responses=schemas.errors(404))
async def remove_pipeline(ctx: CtxDep, name: PipelineName) -> dict[str, Any]:
    return (await asyncio.to_thread(_store(ctx).remove, name, actor="admin")).to_json()
