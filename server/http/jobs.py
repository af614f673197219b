"""Batch job routes: submit recordings (or zips of them), follow them, fetch results, cancel."""

from __future__ import annotations

import asyncio
import zipfile
import zlib
from pathlib import PurePosixPath
from typing import IO, Annotated, Any, Literal
from urllib.parse import quote

import httpx
from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from server.errors import EmptyAudio, InvalidRequest, JobNotFinished, NotFound, NotReady, PayloadTooLarge
from server.http import job_schemas, schemas
from server.http.deps import CtxDep
from server.service.context import AppContext
from server.service.jobs import JobRunner
from server.speech.formats import cues, to_srt, to_vtt
from server.storage.job_records import Job, NewJob
from server.storage.job_store import JobStore
from server.vocab import AUDIO_SUFFIXES, JobStatus, Language

router = APIRouter(prefix="/api/jobs", tags=["jobs"])
ResultFormat = Literal["txt", "text", "json", "srt", "vtt"]
MAX_ZIP_MEMBERS = 1000
ZIP_EXPANSION = 4  # a zip may unpack to this many times max_upload_bytes in all


def _runner(ctx: AppContext) -> JobRunner:
    runner = ctx.jobs
    if runner is None:
        raise NotReady("batch jobs are not available in this process")
    return runner


async def _store(ctx: AppContext) -> JobStore:
    return await asyncio.to_thread(_runner(ctx).store.ensure)


async def _existing_store(ctx: AppContext) -> JobStore | None:
    """Reads never create the data dir: a server nobody sent a job has nothing on disk."""
    store = _runner(ctx).store
    return await asyncio.to_thread(store.ensure) if store.exists() else None


async def _job(store: JobStore | None, job_id: str) -> Job:
    job = await asyncio.to_thread(store.get, job_id) if store is not None else None
    if job is None:
        raise NotFound(f"no job {job_id!r}", param="id")
    return job


def _suffix(name: str) -> str:
    suffix = PurePosixPath(name).suffix.lower()
    return suffix if suffix in AUDIO_SUFFIXES else ".bin"


def _is_zip(name: str, fh: IO[bytes]) -> bool:
    head = fh.read(4)
    fh.seek(0)
    return head == b"PK\x03\x04" or name.lower().endswith(".zip")


def _stage(store: JobStore, name: str, fh: IO[bytes], limit: int) -> tuple[list[NewJob], list[str]]:
    """One upload as staged jobs: itself, or each audio file in it if it is a zip. Blocking."""
    if not _is_zip(name, fh):
        single = store.stage(name, fh, _suffix(name), limit=limit)
        if single.size_bytes == 0:
            store.discard([single])
            raise EmptyAudio(f"{name!r} is empty (0 bytes)", param="files")
        return [single], []
    try:
        archive = zipfile.ZipFile(fh)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InvalidRequest(f"{name!r} is not a readable zip file", param="files") from exc
    staged: list[NewJob] = []
    skipped: list[str] = []
    budget = limit * ZIP_EXPANSION
    try:
        with archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            if len(members) > MAX_ZIP_MEMBERS:
                raise PayloadTooLarge(f"{name!r} holds {len(members)} files; at most {MAX_ZIP_MEMBERS}",
                                      param="files")
            for member in members:
                base = PurePosixPath(member.filename).name
                if (member.filename.startswith("__MACOSX/") or base.startswith(".")
                        or _suffix(base) == ".bin" or member.file_size == 0):
                    skipped.append(member.filename)
                    continue
                budget -= member.file_size
                if budget < 0:
                    raise PayloadTooLarge(f"{name!r} unpacks to more than {limit * ZIP_EXPANSION} bytes",
                                          param="files")
                with archive.open(member) as source:  # sizes are enforced again while copying
                    staged.append(store.stage(member.filename, source, _suffix(base), limit=limit))
    except (zipfile.BadZipFile, NotImplementedError, RuntimeError, EOFError, zlib.error) as exc:
        store.discard(staged)
        raise InvalidRequest(f"{name!r} could not be unpacked: {exc}", param="files") from exc
    except BaseException:
        store.discard(staged)
        raise
    return staged, skipped


def _webhook(url: str | None) -> str | None:
    """Parsed here as the delivery will parse it: a URL httpx refuses later would never be called."""
    if not url:
        return None
    try:
        parsed = httpx.URL(url)
        ok = (parsed.scheme in ("http", "https") and bool(parsed.host) and len(url) <= 2000
              and (parsed.port is None or 0 < parsed.port < 65536))
    except (httpx.InvalidURL, ValueError, TypeError):
        ok = False
    if not ok:
        raise InvalidRequest("webhook_url must be a valid http:// or https:// URL", param="webhook_url")
    return url


@router.post("", status_code=202, response_model=job_schemas.JobsSubmitted, responses=schemas.errors(400, 413, 503))
async def submit(
    ctx: CtxDep,
    files: Annotated[list[UploadFile], File(description="Audio files, or zips of audio files")],
    language: Annotated[Language, Form()] = "auto",
    use_itn: Annotated[bool, Form()] = False,
    webhook_url: Annotated[str | None, Form()] = None,
) -> dict[str, Any]:
    """Queue one job per recording; the answer comes at once, the transcripts later."""
    hook = _webhook(webhook_url)
    store = await _store(ctx)
    limit = ctx.settings.max_upload_bytes
    staged: list[NewJob] = []
    skipped: list[str] = []
    try:
        for upload in files:
            name = upload.filename or "upload"
            new, left = await asyncio.to_thread(_stage, store, name, upload.file, limit)
            staged += new
            skipped += left
        if not staged:
            raise InvalidRequest("the upload holds no audio files" + (f" (skipped: {', '.join(skipped[:10])})"
                                                                     if skipped else ""), param="files")
        jobs = await asyncio.to_thread(store.add, staged, language=language, use_itn=use_itn, webhook_url=hook,
                                       max_pending=ctx.settings.max_pending_jobs)
    except BaseException:
        await asyncio.to_thread(store.discard, staged)
        raise
    _runner(ctx).wake()
    return {"jobs": [job.to_json() for job in jobs], "skipped": skipped}


@router.get("", response_model=job_schemas.JobPage, responses=schemas.errors(400, 503))
async def list_jobs(
    ctx: CtxDep,
    status: Annotated[JobStatus | None, Query()] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Annotated[int, Query(ge=0, le=2**62)] = 0,
) -> dict[str, Any]:
    """Newest first."""
    store = await _existing_store(ctx)
    jobs, total = (await asyncio.to_thread(store.page, status=status, limit=limit, offset=offset)
                   if store is not None else ([], 0))
    return {"jobs": [job.to_json() for job in jobs], "total": total, "limit": limit, "offset": offset}


@router.get("/{job_id}", response_model=job_schemas.Job, responses=schemas.errors(404, 503))
async def get_job(ctx: CtxDep, job_id: str) -> dict[str, Any]:
    return (await _job(await _existing_store(ctx), job_id)).to_json()


@router.get(
    "/{job_id}/result", response_model=job_schemas.JobResult,
    response_description="format=json; txt (or text) and srt as text/plain, vtt as text/vtt",
    responses={200: {"headers": {**schemas.VERSION_HEADER, "Content-Disposition": {
                         "description": "inline, named after the recording", "schema": {"type": "string"}}},
                     "content": schemas.TEXT_BODIES},
               **schemas.errors(400, 404, 409, 503)},
)
async def get_result(ctx: CtxDep, job_id: str,
                     fmt: Annotated[ResultFormat, Query(alias="format")] = "json") -> Response:
    """The transcript as txt (or ``text``), json (with segments and tags), srt or vtt."""
    store = await _existing_store(ctx)
    job = await _job(store, job_id)
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
async def cancel_or_delete(ctx: CtxDep, job_id: str) -> dict[str, Any]:
    """Cancel a pending or running job (it keeps its row, as cancelled); delete a finished one."""
    store = await _existing_store(ctx)
    await _job(store, job_id)  # 404 for ids that are not even well formed
    assert store is not None
    action, job = await asyncio.to_thread(store.cancel_or_delete, job_id)
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
