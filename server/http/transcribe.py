"""Public routes: transcription (voxswap and OpenAI-style), health, status and metrics."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Header, Query, Request, Response, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse

from server.errors import InvalidRequest, NotFound
from server.http import schemas, sse
from server.http.deps import CtxDep, bearer_token, canary_key, is_admin_token
from server.http.status_schemas import ModelList, SystemStatus
from server.service import routing
from server.service.context import AppContext
from server.service.status import model_status, readiness
from server.service.transcription import Transcription
from server.speech.formats import to_srt, to_vtt
from server.vocab import LANGUAGES, Language, ModelKind, pinned_name

router = APIRouter()
ResponseFormat = Literal["json", "text", "srt", "vtt", "verbose_json"]
TRANSCRIPTION_ERRORS = schemas.errors(400, 404, 409, 413, 415, 503, 504)
HOTWORDS_MAX_LENGTH = 1100  # 100 hotwords of 10 characters, spaced


def _headers(result: Transcription) -> dict[str, str]:
    return {"X-Model": result.model, "X-Model-Version": result.model_version}


@router.post("/api/transcribe", tags=["transcription"], response_model=schemas.Transcription,
             responses={200: {"headers": schemas.VERSION_HEADER}, **TRANSCRIPTION_ERRORS})
async def transcribe(
    ctx: CtxDep,
    request: Request,
    file: Annotated[UploadFile, File(description="Audio: wav, flac, ogg/opus, mp3, m4a, webm")],
    language: Annotated[Language, Form()] = "auto",
    use_itn: Annotated[bool, Form()] = False,
    model: Annotated[str, Form(description="A model name, NAME@VERSION, or nothing for the default model",
                               )] = "",
    hotwords: Annotated[str, Form(max_length=HOTWORDS_MAX_LENGTH, description=(
        "Space-separated words (up to 10 characters each) to bias a seaco-paraformer or "
        "contextual-paraformer model towards; a 400 for a model that cannot use them"))] = "",
    timestamps: Annotated[bool, Form(description="Also answer `words`: each word with its start and end "
                                                 "(a 400 for a model whose graph gives none)")] = False,
    x_model_version: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    """Speech recognition models only: a punctuation or voice activity model is a 400."""
    target = routing.resolve(ctx.models, model, x_model_version, ctx.pipelines)
    result = await ctx.service.transcribe(await file.read(), language=language, use_itn=use_itn,
                                          model=target.model, version=target.version,
                                          client_key=canary_key(request), hotwords=hotwords, stages=target.stages,
                                          timestamps=timestamps)
    return JSONResponse(result.to_json(), headers=_headers(result))


@router.post(
    "/v1/audio/transcriptions", tags=["openai"],
    response_model=schemas.OpenAITranscription | schemas.OpenAIVerboseTranscription,
    response_description="json or verbose_json; text and srt as text/plain, vtt as text/vtt",
    responses={200: {"headers": schemas.VERSION_HEADER, "content": schemas.TEXT_BODIES}, **TRANSCRIPTION_ERRORS},
)
async def openai_transcriptions(
    ctx: CtxDep,
    request: Request,
    file: Annotated[UploadFile, File()],
    model: Annotated[str, Form()] = "",
    language: Annotated[str | None, Form()] = None,
    prompt: Annotated[str | None, Form()] = None,
    response_format: Annotated[ResponseFormat, Form()] = "json",
    temperature: Annotated[float | None, Form()] = None,
    timestamp_granularities: Annotated[list[str] | None, Form(alias="timestamp_granularities[]")] = None,
    stream: Annotated[bool, Form(description="Answer text/event-stream: a transcript.text.delta per finished "
                                             "segment, then transcript.text.done (json or text only)")] = False,
    x_model_version: Annotated[str | None, Header()] = None,
) -> Response:
    """OpenAI's transcription API. ``prompt`` is a seaco or contextual Paraformer's hotwords (its
    words of up to 10 characters) and ignored for other models; ``temperature`` is ignored.
    ``timestamp_granularities[]``: ``segment`` (always given) and ``word`` (``words``, as OpenAI),
    with ``verbose_json`` only, as OpenAI's API. ``stream``: server-sent events, as OpenAI's
    ``gpt-4o-transcribe`` answers them (see ``server.http.sse``)."""
    lang = (language or "auto").lower()
    if lang not in LANGUAGES:
        raise InvalidRequest(f"language must be one of {', '.join(LANGUAGES)}", param="language")
    granularities = set(timestamp_granularities or [])
    if granularities - {"word", "segment"}:
        raise InvalidRequest("timestamp_granularities[] takes word and segment", param="timestamp_granularities")
    if granularities and response_format != "verbose_json":
        raise InvalidRequest("timestamp_granularities[] needs response_format=verbose_json",
                             param="timestamp_granularities")
    if stream and (response_format not in ("json", "text") or granularities):
        raise InvalidRequest("stream=true answers text events: response_format json or text, no "
                             "timestamp_granularities[]", param="stream")
    target = routing.resolve(ctx.models, model, x_model_version, ctx.pipelines)
    hotwords = ctx.service.prompt_hotwords(target.model, prompt)
    if stream:
        return await sse.transcription_events(ctx, await file.read(), target, language=lang, hotwords=hotwords,
                                              client_key=canary_key(request))
    result = await ctx.service.transcribe(await file.read(), language=lang, model=target.model,
                                          version=target.version, client_key=canary_key(request),
                                          hotwords=hotwords, stages=target.stages, timestamps="word" in granularities)
    headers = _headers(result)
    if response_format == "text":
        return PlainTextResponse(result.text + "\n", headers=headers)
    if response_format == "srt":
        return PlainTextResponse(to_srt(result.segments), headers=headers)
    if response_format == "vtt":
        return PlainTextResponse(to_vtt(result.segments), headers=headers, media_type="text/vtt")
    if response_format == "verbose_json":
        return JSONResponse({
            "task": "transcribe",
            "language": result.language,
            "duration": round(result.duration_s, 3),
            "text": result.text,
            "segments": [{"id": s.id, "start": s.start, "end": s.end, "text": s.text,
                          "language": s.language, "emotion": s.emotion, "events": s.events}
                         for s in result.segments],
            "emotion": result.emotion,
            "events": result.events,
            "model": result.model,
            "model_version": result.model_version,
            **({"pipeline": result.pipeline, "model_versions": result.model_versions} if result.pipeline else {}),
            **({"words": result.words} if result.words is not None else {}),
        }, headers=headers)
    return JSONResponse({"text": result.text}, headers=headers)


@router.get("/v1/models", tags=["openai"], response_model=ModelList, responses=schemas.errors())
async def list_models(ctx: CtxDep) -> dict[str, Any]:
    """Every model name, every loaded ``NAME@VERSION``, and the default model's bare version ids."""
    return {"object": "list", "data": await asyncio.to_thread(_model_cards, ctx)}


def _model_cards(ctx: AppContext) -> list[dict[str, Any]]:
    ctx.models.discover()
    cards: list[dict[str, Any]] = []
    bare: list[dict[str, Any]] = []
    for lifecycle in ctx.models:
        kind = lifecycle.registry.kind()
        base = {"object": "model", "owned_by": "voxswap", "model": lifecycle.name,
                "kind": kind.value if kind else ModelKind.SENSEVOICE.value}
        live = lifecycle.live_version
        manifests = {m.name: m for m in lifecycle.registry.versions()}
        created = manifests[live].created_at if live in manifests else min(
            (m.created_at for m in manifests.values()), default=0)
        cards.append({**base, "id": lifecycle.name, "created": int(created), "loaded": live is not None,
                      "live": True, "version": live})
        loaded = lifecycle.loaded_versions()
        for version in loaded:
            made = manifests[version].created_at if version in manifests else 0
            cards.append({**base, "id": pinned_name(lifecycle.name, version), "created": int(made),
                          "loaded": True, "live": version == live, "version": version})
        if lifecycle is ctx.models.default:
            bare = [{**base, "id": m.name, "created": int(m.created_at), "loaded": m.name in loaded,
                     "live": m.name == live, "version": m.name} for m in manifests.values()]
    return cards + bare


def _health_response(ctx: AppContext, model: str | None = None) -> JSONResponse:
    answer = readiness(ctx, model)
    default = ctx.models.default
    body: dict[str, Any] = {"status": "healthy" if answer.ready else "unavailable",
                            "model_version": default.live_version, "state": default.state.value,
                            "models": answer.models}
    if not answer.ready:
        body["reason"] = answer.reason
    return JSONResponse(body, status_code=200 if answer.ready else 503,
                        headers=None if answer.ready else {"Retry-After": "1"})


HEALTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    503: {"model": schemas.HealthUnavailable, "headers": {"Retry-After": {"schema": {"type": "string"}}},
          "description": "Not serving: no model, loading, shutting down, or a worker on another version"},
    **schemas.errors(),
}


@router.get("/health", tags=["health"], response_model=schemas.Health, responses=HEALTH_RESPONSES)
async def health(ctx: CtxDep) -> JSONResponse:
    return _health_response(ctx)


@router.get("/health/ready", tags=["health"], response_model=schemas.Health,
            responses={**HEALTH_RESPONSES, **schemas.errors(404)})
async def ready(ctx: CtxDep, model: Annotated[str | None, Query(max_length=64)] = None) -> JSONResponse:
    """Ready when the required models serve (VOXSWAP_READY_MODELS; ``model``: that one only)."""
    return _health_response(ctx, model)


@router.get("/health/live", tags=["health"], response_model=schemas.Liveness, responses=schemas.errors())
async def live() -> dict[str, str]:
    """Answers while the event loop runs; a loaded model is not required to be alive."""
    return {"status": "alive"}


@router.get("/metrics", tags=["health"], response_class=PlainTextResponse,
            response_description="Prometheus text exposition format")
async def metrics(ctx: CtxDep) -> Response:
    body, content_type = ctx.metrics.render()
    return Response(body, media_type=content_type)


def _admin_or_absent(ctx: AppContext, request: Request) -> None:
    """A private route does not exist without the admin token: 404 as for any unknown path, so the
    port does not even tell a scanner that it is there."""
    if not is_admin_token(ctx.settings, bearer_token(request.headers.get("authorization", ""))):
        raise NotFound("Not Found")


@router.get("/api/system/status", tags=["status"], response_model=SystemStatus,
            responses={**schemas.errors(), 404: {"model": schemas.ErrorEnvelope, "description":
                       "The status is private (VOXSWAP_PUBLIC_STATUS=false) and no admin token was sent"}})
async def status(ctx: CtxDep, request: Request) -> dict[str, Any]:
    """What this process serves and how; with ``public_status`` off, for the admin token only."""
    if not ctx.settings.public_status:
        _admin_or_absent(ctx, request)
    answer = readiness(ctx)
    models = [model_status(ctx, lifecycle) for lifecycle in ctx.models]
    default = models[0]
    return {
        "ready": answer.ready,
        "reason": answer.reason,
        "state": "shutting_down" if ctx.shutting_down else default["state"],
        "model_loaded": default["live_version"] is not None,
        "model_version": default["live_version"],
        **{key: default[key] for key in ("model_path", "model_file", "device", "providers", "model_memory_bytes",
                                         "smoke", "previous_version", "registry_current", "registry_generation",
                                         "swapping", "last_error", "in_flight", "workers", "rollout", "watch")},
        "queued": ctx.pool.queued,
        "resident_memory_bytes": ctx.metrics.refresh_process(),
        "pid": os.getpid(),
        "uptime_s": round(time.time() - ctx.started_at, 3),
        "registry": str(ctx.registry.root),
        "jobs": None if ctx.jobs is None else {"store": ctx.jobs.store.describe(), **ctx.jobs.queue_counts()},
        "model": ctx.models.default.name,
        "models": models,
        "models_memory_bytes": ctx.models.memory_bytes(),
    }
