"""Batch job routes: submit recordings (or zips of them), follow them, fetch results, cancel."""

from __future__ import annotations

import asyncio
import zipfile
import zlib
from pathlib import PurePosixPath
from typing import IO, Annotated, Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from server.engines.base import HotwordsError, normalise_hotwords
from server.errors import EmptyAudio, InvalidRequest, JobNotFinished, NotFound, NotReady
from server.http import job_schemas, schemas
from server.http.deps import Client, ClientDep, CtxDep
from server.http.transcribe import HOTWORDS_MAX_LENGTH
from server.service import routing, webhooks
from server.service.archives import Submission, ZipLimits, ZipPlan
from server.service.context import AppContext
from server.service.jobs import JobRunner
from server.settings import Settings
from server.speech.formats import cues, to_srt, to_vtt
from server.storage.job_queue import JobQueue
from server.storage.job_records import Job, NewJob
from server.vocab import AUDIO_SUFFIXES, JobStatus, Language

router = APIRouter(prefix="/api/jobs", tags=["jobs"])
ResultFormat = Literal["txt", "text", "json", "srt", "vtt"]


def _runner(ctx: AppContext) -> JobRunner:
    runner = ctx.jobs
    if runner is None:
        raise NotReady("batch jobs are not available in this process")
    return runner


async def _store(ctx: AppContext) -> JobQueue:
    return await asyncio.to_thread(_runner(ctx).store.ensure)


async def _existing_store(ctx: AppContext) -> JobQueue | None:
    """Reads never create the data dir: a server nobody sent a job has nothing on disk."""
    store = _runner(ctx).store
    return await asyncio.to_thread(store.ensure) if store.exists() else None


def _only_key(client: Client) -> str | None:
    """Whose jobs this client may see: its own key's; every job for the admin, and for everyone
    when no client keys are configured (key_id None: all clients are one client)."""
    return None if client.admin or client.key_id is None else client.key_id


async def _job(store: JobQueue | None, job_id: str, client: Client) -> Job:
    """The job, or 404 alike for one that does not exist and one another key owns."""
    job = await asyncio.to_thread(store.get, job_id, only_key=_only_key(client)) if store is not None else None
    if job is None:
        raise NotFound(f"no job {job_id!r}", param="id")
    return job


def _suffix(name: str) -> str:
    suffix = PurePosixPath(name).suffix.lower()
    return suffix if suffix in AUDIO_SUFFIXES else ".bin"


def _stage(store: JobQueue, name: str, fh: IO[bytes], limit: int,
           plan: ZipPlan | None) -> tuple[list[NewJob], list[str]]:
    """One upload as staged jobs: itself, or the recordings its zip's plan names. Blocking."""
    if plan is None:
        single = store.stage(name, fh, _suffix(name), limit=limit)
        if single.size_bytes == 0:
            store.discard([single])
            raise EmptyAudio(f"{name!r} is empty (0 bytes)", param="files")
        return [single], []
    staged: list[NewJob] = []
    try:
        with zipfile.ZipFile(fh) as archive:
            for member in plan.members:
                with archive.open(member) as source:  # never inflated past the size the plan checked
                    staged.append(store.stage(member.filename, source, _suffix(member.filename), limit=limit))
    except (zipfile.BadZipFile, NotImplementedError, RuntimeError, EOFError, zlib.error) as exc:
        store.discard(staged)
        raise InvalidRequest(f"{name!r} could not be unpacked: {exc}", param="files") from exc
    except BaseException:
        store.discard(staged)
        raise
    return staged, list(plan.skipped)


async def _webhook(url: str | None, settings: Settings) -> str | None:
    """Checked now as every delivery will check it: a URL that could never be delivered, or that
    points inside the network (loopback, private, metadata...), is a 400 with the reason."""
    if not url:
        return None
    await webhooks.resolve(url, settings.webhook_allow_networks, timeout_s=settings.webhook_timeout_s)
    return url


def _model(ctx: AppContext, model: str, hotwords: str) -> tuple[str | None, str | None]:
    """Blocking: the job's model as asked (None: the default model) and its hotwords, checked now as
    a request's are: 404 for a name that is no model, pipeline or version, 400 for a model that does
    not transcribe or takes no hotwords, or hotwords it could not take. Resolved again when it runs."""
    target = routing.resolve(ctx.models, model, None, ctx.pipelines)
    ctx.service.check_request(target.model, hotwords=hotwords)
    try:
        words = normalise_hotwords(hotwords)
    except HotwordsError as exc:
        raise InvalidRequest(str(exc), param="hotwords") from exc
    return model.strip() or None, words or None


@router.post("", status_code=202, response_model=job_schemas.JobsSubmitted,
             responses={**schemas.errors(400, 404, 413, 503), 429: {
                 "model": schemas.ErrorEnvelope, "description": "This key has its most jobs waiting; see Retry-After"},
                 507: {"model": schemas.ErrorEnvelope, "description": "The server's storage for jobs is full"}})
async def submit(
    ctx: CtxDep,
    client: ClientDep,
    files: Annotated[list[UploadFile], File(description="Audio files, or zips of audio files")],
    language: Annotated[Language, Form()] = "auto",
    use_itn: Annotated[bool, Form()] = False,
    webhook_url: Annotated[str | None, Form()] = None,
    model: Annotated[str, Form(description="A model name, NAME@VERSION, a pipeline name, or nothing for the "
                                           "default model; checked now (404, 400) and again when the job runs")] = "",
    hotwords: Annotated[str, Form(max_length=HOTWORDS_MAX_LENGTH, description=(
        "Space-separated words (up to 10 characters each) to bias a seaco-paraformer or "
        "contextual-paraformer model towards; a 400 for a model that cannot use them"))] = "",
) -> dict[str, Any]:
    """Queue one job per recording, owned by the client's API key; the answer comes at once, the
    transcripts later."""
    asked, words = await asyncio.to_thread(_model, ctx, model, hotwords)
    hook = await _webhook(webhook_url, ctx.settings)
    submission = Submission(ZipLimits.of(ctx.settings))  # every zip judged before anything is written
    plans = [await asyncio.to_thread(submission.survey, upload.filename or "upload", upload.file) for upload in files]
    store = await _store(ctx)
    budget = ctx.settings.data_dir_budget_bytes
    await asyncio.to_thread(store.check_space, submission.bytes, budget)
    limit = ctx.settings.max_upload_bytes
    staged: list[NewJob] = []
    skipped: list[str] = []
    try:
        for upload, plan in zip(files, plans, strict=True):
            name = upload.filename or "upload"
            new, left = await asyncio.to_thread(_stage, store, name, upload.file, limit, plan)
            staged += new
            skipped += left
        if not staged:
            raise InvalidRequest("the upload holds no audio files" + (f" (skipped: {', '.join(skipped[:10])})"
                                                                     if skipped else ""), param="files")
        jobs = await asyncio.to_thread(store.add, staged, language=language, use_itn=use_itn, webhook_url=hook,
                                       max_pending=ctx.settings.max_pending_jobs, owner_key=client.key_id,
                                       max_pending_per_key=ctx.settings.max_pending_jobs_per_key,
                                       disk_budget=budget, model=asked, hotwords=words)
    except BaseException:
        await asyncio.to_thread(store.discard, staged)
        raise
    _runner(ctx).wake()
    return {"jobs": [job.to_json() for job in jobs], "skipped": skipped}


@router.get("", response_model=job_schemas.JobPage, responses=schemas.errors(400, 503))
async def list_jobs(
    ctx: CtxDep,
    client: ClientDep,
    status: Annotated[JobStatus | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
) -> dict[str, Any]:
    """Newest first: this client's jobs (every job for the admin, or when no keys are configured)."""
    store = await _existing_store(ctx)
    jobs, total = (await asyncio.to_thread(store.page, status=status, limit=limit, offset=offset,
                                           only_key=_only_key(client))
                   if store is not None else ([], 0))
    return {"jobs": [job.to_json() for job in jobs], "total": total, "limit": limit, "offset": offset}


@router.get("/{job_id}", response_model=job_schemas.Job, responses=schemas.errors(404, 503))
async def get_job(ctx: CtxDep, client: ClientDep, job_id: str) -> dict[str, Any]:
    return (await _job(await _existing_store(ctx), job_id, client)).to_json()


@router.get(
    "/{job_id}/result", response_model=job_schemas.JobResult,
    response_description="format=json; txt (or text) and srt as text/plain, vtt as text/vtt",
    responses={200: {"headers": {**schemas.VERSION_HEADER, "Content-Disposition": {
                         "description": "inline, named after the recording", "schema": {"type": "string"}}},
                     "content": schemas.TEXT_BODIES},
               **schemas.errors(400, 404, 409, 503)},
)
async def get_result(ctx: CtxDep, client: ClientDep, job_id: str,
                     fmt: Annotated[ResultFormat, Query(alias="format")] = "json") -> Response:
    """The transcript as txt (or ``text``), json (with segments and tags), srt or vtt."""
    store = await _existing_store(ctx)
    job = await _job(store, job_id, client)
    assert store is not None
    if job.status != "completed":
        detail = f": {job.error}" if job.error else ""
        raise JobNotFinished(f"job {job_id} is {job.status}{detail}; results exist once it is completed")
    result = await asyncio.to_thread(store.read_result, job)
    ext = "txt" if fmt == "text" else fmt
    headers = {"Content-Disposition": _disposition(PurePosixPath(job.filename).stem, job.id, ext)}
    if job.model_version:
        headers["X-Model-Version"] = job.model_version
    if ext == "json":
        return JSONResponse({**result, "job_id": job.id, "filename": job.filename}, headers=headers)
    if ext == "srt":
        return PlainTextResponse(to_srt(cues(result["segments"])), headers=headers)
    if ext == "vtt":
        return PlainTextResponse(to_vtt(cues(result["segments"])), headers=headers, media_type="text/vtt")
    return PlainTextResponse(result["text"] + "\n", headers=headers)


@router.delete("/{job_id}", response_model=job_schemas.JobRemoved, responses=schemas.errors(404, 503))
async def cancel_or_delete(ctx: CtxDep, client: ClientDep, job_id: str) -> dict[str, Any]:
    """Cancel a pending or running job (it keeps its row, as cancelled); delete a finished one."""
    store = await _existing_store(ctx)
    await _job(store, job_id, client)  # 404 for ids that are not even well formed, or not this key's
    assert store is not None
    action, job = await asyncio.to_thread(store.cancel_or_delete, job_id, only_key=_only_key(client))
    if job is None:
        raise NotFound(f"no job {job_id!r}", param="id")
    if action == "cancelled":
        ctx.metrics.jobs_finished.labels("cancelled").inc()
    return {"id": job_id, "action": action, "status": job.status if action == "cancelled" else "deleted"}


def _disposition(stem: str, job_id: str, ext: str) -> str:
    """An ASCII ``filename`` for old clients plus RFC 6266's UTF-8 ``filename*``: headers are Latin-1,
    and a recording named in Chinese must not turn every result request into an error."""
    plain = "".join(c if c.isascii() and (c.isalnum() or c in "._-") else "_" for c in stem)[:100].strip("_")
    value = f'inline; filename="{plain or job_id}.{ext}"'
    if stem and not stem.isascii():
        value += f"; filename*=UTF-8''{quote(f'{stem[:100]}.{ext}', safe='')}"
    return value
