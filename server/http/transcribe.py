"""Public routes: transcription (voxswap and OpenAI-style), health, status and metrics."""

from __future__ import annotations

import os
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Header, Request, Response, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse

from server.errors import InvalidRequest, NotFound, RegistryError
from server.http import schemas
from server.http.deps import CtxDep, bearer_token, is_admin_token
from server.service.context import AppContext
from server.service.transcription import Transcription
from server.speech.formats import to_srt, to_vtt
from server.vocab import LANGUAGES, Language

router = APIRouter()
ResponseFormat = Literal["json", "text", "srt", "vtt", "verbose_json"]
LIVE_ALIASES = {"", "whisper-1", "voxswap", "default"}
TRANSCRIPTION_ERRORS = schemas.errors(400, 404, 409, 413, 415, 503, 504)


def _pinned(ctx: AppContext, requested: str | None) -> str | None:
    """A version named by the client, checked against the registry; None means the live one."""
    name = (requested or "").strip()
    if name in LIVE_ALIASES:
        return None
    try:
        ctx.registry.version_dir(name)  # a name that is not a version name is simply not found
    except (NotFound, RegistryError):
        raise NotFound(f"no model version {name[:80]!r}; GET /v1/models lists them", param="model") from None
    return name


def _headers(result: Transcription) -> dict[str, str]:
    return {"X-Model-Version": result.model_version}


@router.post("/api/transcribe", tags=["transcription"], response_model=schemas.Transcription,
             responses={200: {"headers": schemas.VERSION_HEADER}, **TRANSCRIPTION_ERRORS})
async def transcribe(
    ctx: CtxDep,
    file: Annotated[UploadFile, File(description="Audio: wav, flac, ogg/opus, mp3, m4a, webm")],
    language: Annotated[Language, Form()] = "auto",
    use_itn: Annotated[bool, Form()] = False,
    x_model_version: Annotated[str | None, Header()] = None,
) -> JSONResponse:
    result = await ctx.service.transcribe(await file.read(), language=language, use_itn=use_itn,
                                          version=_pinned(ctx, x_model_version))
    return JSONResponse(result.to_json(), headers=_headers(result))


@router.post(
    "/v1/audio/transcriptions", tags=["openai"],
    response_model=schemas.OpenAITranscription | schemas.OpenAIVerboseTranscription,
    response_description="json or verbose_json; text and srt as text/plain, vtt as text/vtt",
    responses={200: {"headers": schemas.VERSION_HEADER, "content": schemas.TEXT_BODIES}, **TRANSCRIPTION_ERRORS},
)
async def openai_transcriptions(
    ctx: CtxDep,
    file: Annotated[UploadFile, File()],
    model: Annotated[str, Form()] = "",
    language: Annotated[str | None, Form()] = None,
    prompt: Annotated[str | None, Form()] = None,
    response_format: Annotated[ResponseFormat, Form()] = "json",
    temperature: Annotated[float | None, Form()] = None,
    timestamp_granularities: Annotated[list[str] | None, Form(alias="timestamp_granularities[]")] = None,
    x_model_version: Annotated[str | None, Header()] = None,
) -> Response:
    """OpenAI's transcription API; ``prompt`` and ``temperature`` are accepted and ignored."""
    lang = (language or "auto").lower()
    if lang not in LANGUAGES:
        raise InvalidRequest(f"language must be one of {', '.join(LANGUAGES)}", param="language")
    version = _pinned(ctx, x_model_version or model)
    result = await ctx.service.transcribe(await file.read(), language=lang, version=version)
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
            "model_version": result.model_version,
        }, headers=headers)
    return JSONResponse({"text": result.text}, headers=headers)


@router.get("/v1/models", tags=["openai"], response_model=schemas.ModelList, responses=schemas.errors())
async def list_models(ctx: CtxDep) -> dict[str, Any]:
    loaded = set(ctx.lifecycle.loaded_versions())
    return {
        "object": "list",
        "data": [{"id": m.name, "object": "model", "created": int(m.created_at), "owned_by": "voxswap",
                  "loaded": m.name in loaded, "live": m.name == ctx.lifecycle.live_version}
                 for m in ctx.registry.versions()],
    }


def _readiness(ctx: AppContext) -> tuple[bool, str]:
    if ctx.shutting_down:
        return False, "shutting down"
    if ctx.lifecycle.live is None:
        return False, ctx.lifecycle.not_ready_reason()
    lagging = ctx.lifecycle.convergence_problem()
    if lagging:
        return False, lagging
    return True, "serving"


def _health_response(ctx: AppContext) -> JSONResponse:
    ready, reason = _readiness(ctx)
    body = {"status": "healthy" if ready else "unavailable", "model_version": ctx.lifecycle.live_version,
            "state": ctx.lifecycle.state.value}
    if not ready:
        body["reason"] = reason
    return JSONResponse(body, status_code=200 if ready else 503,
                        headers=None if ready else {"Retry-After": "1"})


HEALTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    503: {"model": schemas.HealthUnavailable, "headers": {"Retry-After": {"schema": {"type": "string"}}},
          "description": "Not serving: no model, loading, shutting down, or a worker on another version"},
    **schemas.errors(),
}


@router.get("/health", tags=["health"], response_model=schemas.Health, responses=HEALTH_RESPONSES)
async def health(ctx: CtxDep) -> JSONResponse:
    return _health_response(ctx)


@router.get("/health/ready", tags=["health"], response_model=schemas.Health, responses=HEALTH_RESPONSES)
async def ready(ctx: CtxDep) -> JSONResponse:
    return _health_response(ctx)


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


@router.get("/api/system/status", tags=["status"], response_model=schemas.SystemStatus,
            responses={**schemas.errors(), 404: {"model": schemas.ErrorEnvelope, "description":
                       "The status is private (VOXSWAP_PUBLIC_STATUS=false) and no admin token was sent"}})
async def status(ctx: CtxDep, request: Request) -> dict[str, Any]:
    """What this process serves and how; with ``public_status`` off, for the admin token only."""
    if not ctx.settings.public_status:
        _admin_or_absent(ctx, request)
    lifecycle = ctx.lifecycle
    live = lifecycle.live
    state = ctx.registry.state()
    ready, reason = _readiness(ctx)
    return {
        "ready": ready,
        "reason": reason,
        "state": "shutting_down" if ctx.shutting_down else lifecycle.state.value,
        "model_loaded": live is not None,
        "model_version": live.version if live else None,
        "model_path": str(live.path) if live else None,
        "model_file": live.engine.model_file if live else None,
        "device": live.engine.device if live else ctx.settings.device,
        "providers": live.engine.providers if live else [],
        "model_memory_bytes": live.memory_bytes if live else 0,
        "smoke": live.smoke.to_json() if live else None,
        "previous_version": state.previous,
        "registry_current": state.current,
        "registry_generation": state.generation,
        "swapping": lifecycle.swapping,
        "last_error": lifecycle.last_error,
        "in_flight": lifecycle.in_flight(),
        "queued": ctx.pool.queued,
        "resident_memory_bytes": ctx.metrics.refresh_process(),
        "pid": os.getpid(),
        "uptime_s": round(time.time() - ctx.started_at, 3),
        "registry": str(ctx.registry.root),
        "workers": [w.to_json() for w in ctx.lifecycle.board.workers()],
        "rollout": rollout.to_json() if (rollout := ctx.lifecycle.board.rollout()) else None,
        "watch": ctx.lifecycle.watch.current(),
        "jobs": None if ctx.jobs is None else {"store": ctx.jobs.store.describe(), **ctx.jobs.queue_counts()},
    }
