"""Batch jobs: recordings transcribed in the background, one row each in SQLite, surviving restarts.

Layout under ``data_dir``::

    jobs.sqlite3            the queue (WAL), shared by every process that uses this data dir
    jobs/<id>/input.<ext>   the uploaded audio
    jobs/<id>/result.json   the transcription, once completed
    owners/<owner>.lock     held (flock) by each process that runs jobs, for as long as it lives

Several processes (gunicorn workers) share one data dir. A job is claimed with a single
``UPDATE ... WHERE status = 'pending' RETURNING`` inside ``BEGIN IMMEDIATE``, so exactly one process
runs it. A process that dies (even by SIGKILL) loses its flock with it; whoever can take a dead
owner's lock puts that owner's running jobs back to pending, so no timeout guesses whether a slow
job is dead. Completion is a compare-and-set on (status = 'running', owner = me): a job cancelled,
deleted or re-claimed meanwhile is never completed twice.

Jobs share the inference pool with interactive requests and yield to them: a job worker starts a
batch of segments only when an inference thread is free and nobody is waiting for one. Every batch
of one file is pinned to the version its first batch leased; if a swap retires that version, the
job starts over on the live one, so a result is always the work of the one version it records and
a swap never waits for a long job.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import socket
import sqlite3
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx
import numpy as np
from numpy.typing import NDArray

from server.errors import NotReady, Overloaded, PayloadTooLarge, VersionNotLoaded, VoxswapError
from server.lifecycle.policy import ModelLoader
from server.service.inference import InferencePool
from server.service.transcription import Transcription, TranscriptionService
from server.settings import Settings
from server.speech import audio, segmenter

log = logging.getLogger("voxswap.jobs")

STATUSES = ("pending", "running", "completed", "failed", "cancelled")
FINISHED = ("completed", "failed", "cancelled")
ID_RE = re.compile(r"^[0-9a-f]{32}$")
RECOVER_EVERY_S = 2.0  # how often an idle worker looks for jobs of dead processes
SWEEP_EVERY_S = 600.0  # how often finished jobs past their retention are deleted
STRAY_DIR_AGE_S = 3600.0  # a job folder with no row (a crash mid-submission) is removed after this
MAX_RESTARTS = 3  # times a job starts over because its version was swapped out under it

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    filename TEXT NOT NULL,
    input_name TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    status TEXT NOT NULL,
    language TEXT NOT NULL,
    use_itn INTEGER NOT NULL,
    webhook_url TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    progress REAL NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    model_version TEXT,
    duration_s REAL,
    processing_ms REAL,
    error TEXT,
    webhook_status TEXT,
    webhook_attempts INTEGER NOT NULL DEFAULT 0,
    webhook_error TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner) WHERE owner IS NOT NULL;
"""


class JobCancelled(Exception):
    """The job was cancelled or deleted while it ran; its work is thrown away."""


@dataclass(frozen=True)
class Job:
    id: str
    filename: str
    input_name: str
    size_bytes: int
    status: str
    language: str
    use_itn: bool
    webhook_url: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    progress: float
    attempts: int
    owner: str | None
    model_version: str | None
    duration_s: float | None
    processing_ms: float | None
    error: str | None
    webhook_status: str | None
    webhook_attempts: int
    webhook_error: str | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        data = {k: row[k] for k in row.keys() if k != "seq"}  # noqa: SIM118 (a Row is no mapping)
        data["use_itn"] = bool(data["use_itn"])
        return cls(**data)

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    def to_json(self) -> dict[str, Any]:
        queued_until = self.started_at or self.finished_at
        return {
            "id": self.id,
            "status": self.status,
            "filename": self.filename,
            "size_bytes": self.size_bytes,
            "language": self.language,
            "use_itn": self.use_itn,
            "progress": round(self.progress, 4),
            "attempts": self.attempts,
            "model_version": self.model_version,
            "duration_s": self.duration_s,
            "processing_ms": None if self.processing_ms is None else round(self.processing_ms, 2),
            "created_at": self.created_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "timings": {
                "queued_s": None if queued_until is None else round(queued_until - self.created_at, 3),
                "running_s": (round(self.finished_at - self.started_at, 3)
                              if self.finished_at and self.started_at else None),
            },
            "error": self.error,
            "webhook": None if not self.webhook_url else {
                "url": self.webhook_url, "status": self.webhook_status, "attempts": self.webhook_attempts,
                "error": self.webhook_error,
            },
            "result_url": f"/api/jobs/{self.id}/result",
        }


@dataclass(frozen=True)
class NewJob:
    """An upload already written to its job folder, waiting for its row."""

    id: str
    filename: str
    input_name: str
    size_bytes: int


class JobStore:
    """The queue on disk. Every method is blocking: call it from a thread, not the event loop."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.db_path = self.root / "jobs.sqlite3"
        self.jobs_dir = self.root / "jobs"
        self.owners_dir = self.root / "owners"
        self._ready = False

    def exists(self) -> bool:
        return self.db_path.exists()

    def ensure(self) -> JobStore:
        """Create the folders and schema; nothing is written to disk before the first use."""
        if self._ready:
            return self
        for path in (self.root, self.jobs_dir, self.owners_dir):
            path.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
        self._ready = True
        return self

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None)
        try:
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA synchronous=NORMAL")  # WAL: a process crash loses no commit; a power
            # loss may lose the last few, which FULL would keep at an fsync per commit
            yield db
        finally:
            db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE``: take the write lock first, so a read-then-write cannot interleave."""
        with self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    # -- files --------------------------------------------------------------------------------

    def job_dir(self, job_id: str) -> Path:
        if not ID_RE.fullmatch(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return self.jobs_dir / job_id

    def stage(self, filename: str, source: IO[bytes], suffix: str, *, limit: int) -> NewJob:
        """Copy one upload into a new job folder; 413 past ``limit`` bytes."""
        job_id = uuid.uuid4().hex
        folder = self.job_dir(job_id)
        folder.mkdir(parents=True)
        input_name = f"input{suffix}"
        size = 0
        try:
            with (folder / input_name).open("wb") as out:
                while chunk := source.read(1 << 20):
                    size += len(chunk)
                    if size > limit:
                        raise PayloadTooLarge(f"{filename!r} is larger than {limit} bytes", param="files")
                    out.write(chunk)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return NewJob(job_id, filename, input_name, size)

    def discard(self, staged: list[NewJob]) -> None:
        for new in staged:
            shutil.rmtree(self.job_dir(new.id), ignore_errors=True)

    def read_input(self, job: Job) -> bytes:
        return (self.job_dir(job.id) / job.input_name).read_bytes()

    def read_result(self, job: Job) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.job_dir(job.id) / "result.json").read_text())
        return data

    # -- rows ---------------------------------------------------------------------------------

    def add(self, staged: list[NewJob], *, language: str, use_itn: bool, webhook_url: str | None,
            max_pending: int) -> list[Job]:
        """One row per staged upload, all or none; refused when the queue is full."""
        now = time.time()
        with self._transaction() as db:
            pending = _count_pending(db)
            if pending + len(staged) > max_pending:
                raise Overloaded(f"{pending} jobs are waiting (at most {max_pending}); submit later",
                                 retry_after=30)
            db.executemany(
                "INSERT INTO jobs (id, filename, input_name, size_bytes, status, language, use_itn, "
                "webhook_url, webhook_status, created_at) VALUES (?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?)",
                [(n.id, n.filename, n.input_name, n.size_bytes, language, int(use_itn), webhook_url,
                  "pending" if webhook_url else None, now) for n in staged],
            )
            rows = db.execute(f"SELECT * FROM jobs WHERE id IN ({','.join('?' * len(staged))}) ORDER BY seq",
                              [n.id for n in staged]).fetchall()
        return [Job.from_row(r) for r in rows]

    def get(self, job_id: str) -> Job | None:
        if not ID_RE.fullmatch(job_id):
            return None
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job.from_row(row) if row else None

    def pending(self) -> int:
        with self._connect() as db:
            return _count_pending(db)

    def page(self, *, status: str | None, limit: int, offset: int) -> tuple[list[Job], int]:
        """Newest first."""
        where, args = ("WHERE status = ?", [status]) if status else ("", [])
        with self._connect() as db:
            total = db.execute(f"SELECT COUNT(*) FROM jobs {where}", args).fetchone()[0]
            rows = db.execute(f"SELECT * FROM jobs {where} ORDER BY seq DESC LIMIT ? OFFSET ?",
                              [*args, limit, offset]).fetchall()
        return [Job.from_row(r) for r in rows], int(total)

    def claim(self, owner: str) -> Job | None:
        """The oldest pending job, now running for ``owner``; None when nothing is pending."""
        now = time.time()
        with self._transaction() as db:
            row = db.execute(
                "UPDATE jobs SET status = 'running', owner = ?, started_at = ?, progress = 0, "
                "attempts = attempts + 1, error = NULL "
                "WHERE seq = (SELECT seq FROM jobs WHERE status = 'pending' ORDER BY seq LIMIT 1) "
                "AND status = 'pending' RETURNING *",
                (owner, now),
            ).fetchone()
        return Job.from_row(row) if row else None

    def progress(self, job_id: str, owner: str, fraction: float) -> bool:
        """Record progress; False when the job is no longer running for ``owner`` (cancelled)."""
        with self._connect() as db:
            cur = db.execute("UPDATE jobs SET progress = ? WHERE id = ? AND owner = ? AND status = 'running'",
                             (fraction, job_id, owner))
        return cur.rowcount == 1

    def complete(self, job: Job, owner: str, result: Transcription) -> Job | None:
        """Write the result, then flip to completed; None (and no result) if it was cancelled."""
        folder = self.job_dir(job.id)
        tmp = folder / f".result.{uuid.uuid4().hex}.tmp"
        try:
            tmp.write_text(json.dumps(result.to_json(), ensure_ascii=False))
            os.replace(tmp, folder / "result.json")
        except FileNotFoundError:  # the job was deleted under us
            return None
        with self._connect() as db:
            row = db.execute(
                "UPDATE jobs SET status = 'completed', progress = 1, finished_at = ?, model_version = ?, "
                "duration_s = ?, processing_ms = ? WHERE id = ? AND owner = ? AND status = 'running' "
                "RETURNING *",
                (time.time(), result.model_version, round(result.duration_s, 3), result.processing_ms,
                 job.id, owner),
            ).fetchone()
        if row is None:
            (folder / "result.json").unlink(missing_ok=True)
            return None
        return Job.from_row(row)

    def fail(self, job: Job, owner: str, error: str) -> Job | None:
        with self._connect() as db:
            row = db.execute(
                "UPDATE jobs SET status = 'failed', finished_at = ?, error = ? "
                "WHERE id = ? AND owner = ? AND status = 'running' RETURNING *",
                (time.time(), error, job.id, owner),
            ).fetchone()
        return Job.from_row(row) if row else None

    def release(self, job: Job, owner: str) -> None:
        """Back to pending without counting the attempt (no model loaded, or a clean shutdown)."""
        with self._connect() as db:
            db.execute("UPDATE jobs SET status = 'pending', owner = NULL, started_at = NULL, progress = 0, "
                       "attempts = MAX(0, attempts - 1) WHERE id = ? AND owner = ? AND status = 'running'",
                       (job.id, owner))

    def release_owner(self, owner: str) -> int:
        with self._connect() as db:
            cur = db.execute("UPDATE jobs SET status = 'pending', owner = NULL, started_at = NULL, progress = 0, "
                             "attempts = MAX(0, attempts - 1) WHERE owner = ? AND status = 'running'", (owner,))
        return cur.rowcount

    def cancel_or_delete(self, job_id: str) -> tuple[str, Job | None]:
        """Cancel a pending or running job; delete a finished one (row, audio and result)."""
        now = time.time()
        with self._transaction() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return "missing", None
            if row["status"] in FINISHED:
                db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
                action = "deleted"
            else:
                row = db.execute("UPDATE jobs SET status = 'cancelled', finished_at = ?, "
                                 "webhook_status = NULL WHERE id = ? RETURNING *", (now, job_id)).fetchone()
                action = "cancelled"
        if action == "deleted":
            shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
        return action, Job.from_row(row)

    def record_webhook(self, job_id: str, status: str, attempts: int, error: str | None) -> None:
        with self._connect() as db:
            db.execute("UPDATE jobs SET webhook_status = ?, webhook_attempts = ?, webhook_error = ? WHERE id = ?",
                       (status, attempts, error, job_id))

    # -- owners -------------------------------------------------------------------------------

    def hold_owner_lock(self, owner: str) -> IO[bytes]:
        """The lock this process holds for as long as it lives; the kernel drops it on any death."""
        fh = (self.owners_dir / f"{owner}.lock").open("ab")
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fh

    def drop_owner_lock(self, owner: str, fh: IO[bytes]) -> None:
        (self.owners_dir / f"{owner}.lock").unlink(missing_ok=True)
        fh.close()

    def _owner_is_dead(self, owner: str) -> bool:
        path = self.owners_dir / f"{owner}.lock"
        try:
            fh = path.open("rb")
        except FileNotFoundError:
            return True
        with fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            path.unlink(missing_ok=True)  # still holding its lock: nobody can mistake it for alive
            return True

    def recover(self, me: str, *, max_attempts: int) -> tuple[int, list[str]]:
        """Requeue the running jobs of dead owners (or fail those that used up their attempts) and
        adopt their undelivered webhooks. Returns (jobs requeued, job ids whose webhook is now ours)."""
        with self._connect() as db:
            owners = [r[0] for r in db.execute(
                "SELECT DISTINCT owner FROM jobs WHERE owner IS NOT NULL AND owner != ? AND "
                "(status = 'running' OR webhook_status IN ('pending', 'sending'))", (me,))]
        requeued, adopted = 0, []
        for owner in owners:
            if not self._owner_is_dead(owner):
                continue
            with self._transaction() as db:
                failed = db.execute(
                    "UPDATE jobs SET status = 'failed', finished_at = ?, error = ? WHERE owner = ? AND "
                    "status = 'running' AND attempts >= ?",
                    (time.time(), f"the server stopped {max_attempts} times while running this job; gave up",
                     owner, max_attempts)).rowcount
                requeued += db.execute(
                    "UPDATE jobs SET status = 'pending', owner = NULL, started_at = NULL, progress = 0 "
                    "WHERE owner = ? AND status = 'running'", (owner,)).rowcount
                adopted += [r[0] for r in db.execute(
                    "UPDATE jobs SET owner = ?, webhook_status = 'pending' WHERE owner = ? AND "
                    "webhook_status IN ('pending', 'sending') AND status IN ('completed', 'failed') "
                    "RETURNING id", (me, owner))]
            if failed:
                log.warning("jobs failed after repeated crashes", extra={"event": "job_gave_up", "count": failed})
        return requeued, adopted

    def sweep(self, retention_s: float) -> int:
        """Delete finished jobs past their retention, and job folders left by an interrupted upload."""
        cutoff = time.time() - retention_s
        with self._connect() as db:
            old = [r[0] for r in db.execute(
                "DELETE FROM jobs WHERE status IN ('completed', 'failed', 'cancelled') AND finished_at < ? "
                "RETURNING id", (cutoff,))]
            known = {r[0] for r in db.execute("SELECT id FROM jobs")}
        for job_id in old:
            shutil.rmtree(self.job_dir(job_id), ignore_errors=True)
        stray_cutoff = time.time() - STRAY_DIR_AGE_S
        for folder in self.jobs_dir.iterdir():
            if ID_RE.fullmatch(folder.name) and folder.name not in known:
                with contextlib.suppress(FileNotFoundError):
                    if folder.stat().st_mtime < stray_cutoff:
                        shutil.rmtree(folder, ignore_errors=True)
        return len(old)


def _count_pending(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'pending'").fetchone()[0])


class JobRunner:
    """This process's job workers: claim, transcribe through the shared pool, record, notify."""

    def __init__(self, store: JobStore, service: TranscriptionService, pool: InferencePool, loader: ModelLoader,
                 settings: Settings):
        self.store = store
        self.service = service
        self.pool = pool
        self.loader = loader
        self.settings = settings
        self.owner = ""  # named when the lock is taken, in the process that runs jobs (after any fork)
        self.jobs_run = 0  # jobs this runner finished (completed or failed)
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._webhooks: set[asyncio.Task[None]] = set()
        self._lock_fh: IO[bytes] | None = None
        self._last_recover = 0.0
        self._last_sweep = 0.0
        self._recover_lock = asyncio.Lock()

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        for n in range(self.settings.job_workers):
            self._tasks.append(asyncio.create_task(self._worker(), name=f"voxswap-job-worker-{n}"))

    async def stop(self) -> None:
        """Stop taking jobs; a job cut short goes back to pending for whoever runs next."""
        for task in [*self._tasks, *self._webhooks]:
            task.cancel()
        for task in [*self._tasks, *self._webhooks]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._lock_fh is not None:
            released = await asyncio.to_thread(self.store.release_owner, self.owner)
            if released:
                log.info("running jobs put back to pending", extra={"event": "jobs_released", "count": released})
            self.store.drop_owner_lock(self.owner, self._lock_fh)
            self._lock_fh = None

    def wake(self) -> None:
        """A job was submitted here: look now instead of at the next poll."""
        self._wake.set()

    # -- the worker loop ----------------------------------------------------------------------

    def _our_turn(self) -> bool:
        """A free inference thread and no interactive request waiting for one, and a model to use."""
        pool = self.pool
        return self.loader.live is not None and pool.queued == 0 and pool.admitted < pool.workers

    async def _wait_for_turn(self) -> None:
        while not self._our_turn():
            await asyncio.sleep(0.05)

    async def _idle(self) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self.settings.job_poll_s)

    async def _worker(self) -> None:
        while True:
            try:
                await self._wait_for_turn()
                if not self.store.exists():
                    await self._idle()
                    continue
                await self._housekeeping()
                job = await asyncio.to_thread(self.store.claim, self.owner)
                if job is None:
                    await self._idle()
                    continue
                await self._run(job)
            except asyncio.CancelledError:
                raise
            except Exception:  # a worker must outlive any one job or a broken disk moment
                log.exception("job worker error", extra={"event": "job_worker_error"})
                await asyncio.sleep(self.settings.job_poll_s)

    async def _housekeeping(self) -> None:
        async with self._recover_lock:
            now = time.monotonic()
            if self._lock_fh is None:
                await asyncio.to_thread(self.store.ensure)
                host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:40]
                self.owner = f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                self._lock_fh = await asyncio.to_thread(self.store.hold_owner_lock, self.owner)
            if now - self._last_recover >= RECOVER_EVERY_S:
                self._last_recover = now
                requeued, adopted = await asyncio.to_thread(
                    self.store.recover, self.owner, max_attempts=self.settings.job_max_attempts)
                if requeued:
                    log.warning("jobs of a stopped process put back to pending",
                                extra={"event": "jobs_recovered", "count": requeued})
                for job_id in adopted:
                    job = await asyncio.to_thread(self.store.get, job_id)
                    if job is not None:
                        self._notify(job)
            if now - self._last_sweep >= SWEEP_EVERY_S:
                self._last_sweep = now
                await asyncio.to_thread(self.store.sweep, self.settings.job_retention_s)

    async def _run(self, job: Job) -> None:
        log.info("job started", extra={"event": "job_start", "job": job.id, "attempt": job.attempts})
        try:
            data = await asyncio.to_thread(self.store.read_input, job)
            decoded = await asyncio.to_thread(audio.decode, data, max_seconds=self.settings.max_audio_seconds)
            del data
            result = await self._transcribe(job, decoded.samples)
            finished = await asyncio.to_thread(self.store.complete, job, self.owner, result)
        except JobCancelled:
            finished = None
        except NotReady:
            await asyncio.to_thread(self.store.release, job, self.owner)  # no model: wait for one
            return
        except (VoxswapError, FileNotFoundError) as exc:
            reason = exc.message if isinstance(exc, VoxswapError) else "the job's audio is gone from the data dir"
            finished = await asyncio.to_thread(self.store.fail, job, self.owner, reason)
        except asyncio.CancelledError:
            raise  # stop() puts it back to pending
        except Exception:
            log.exception("job failed", extra={"event": "job_error", "job": job.id})
            finished = await asyncio.to_thread(self.store.fail, job, self.owner,
                                               "internal error while transcribing (see the server log)")
        if finished is None:
            log.info("job cancelled", extra={"event": "job_cancelled", "job": job.id})
            return
        self.jobs_run += 1
        self.service.metrics.jobs_finished.labels(finished.status).inc()
        log.info("job finished", extra={"event": "job_done", "job": job.id, "status": finished.status,
                                        "version": finished.model_version})
        self._notify(finished)

    async def _transcribe(self, job: Job, samples: NDArray[np.float32]) -> Transcription:
        """Segment batches through the shared pool, each when it is our turn, all on one version.

        A lease is held per batch, not per file, so a swap never waits for a long job to drain: when
        the version a job started on is gone, the job starts over on the live one, and a result is
        always the work of the one version it records.
        """
        spans = segmenter.split(samples, window_s=self.settings.segment_window_s)
        batches = segmenter.batches(spans, self.settings.segment_batch_size)
        for restart in range(MAX_RESTARTS + 1):
            version: str | None = None
            raws: list[str] = []
            elapsed = 0.0
            try:
                for done, batch in enumerate(batches, 1):
                    await self._wait_for_turn()
                    started = time.perf_counter()
                    with self.loader.lease(version) as model:
                        version = model.version
                        raws += await self.pool.run(self.service.run_batch, model, samples, batch,
                                                    job.language, job.use_itn)
                    elapsed += time.perf_counter() - started
                    if not await asyncio.to_thread(self.store.progress, job.id, self.owner, done / len(batches)):
                        raise JobCancelled(job.id)
            except VersionNotLoaded:
                if restart == MAX_RESTARTS:
                    raise
                log.info("the job's version was swapped out; starting over on the live one",
                         extra={"event": "job_restart", "job": job.id, "version": version})
                continue
            assert version is not None
            return self.service.assemble(version, samples, spans, raws, elapsed)
        raise AssertionError("unreachable")

    # -- webhooks -----------------------------------------------------------------------------

    def _notify(self, job: Job) -> None:
        if job.webhook_url and job.status in ("completed", "failed"):
            task = asyncio.create_task(self._deliver(job), name=f"voxswap-webhook-{job.id}")
            self._webhooks.add(task)
            task.add_done_callback(self._webhooks.discard)

    async def _deliver(self, job: Job) -> None:
        """POST the job as JSON until a 2xx, with doubling waits; the outcome is kept on the job."""
        assert job.webhook_url
        payload: dict[str, Any] = {"event": f"job.{job.status}", "job": job.to_json()}
        if job.status == "completed":
            with contextlib.suppress(OSError, ValueError):
                payload["text"] = (await asyncio.to_thread(self.store.read_result, job)).get("text")
        await asyncio.to_thread(self.store.record_webhook, job.id, "sending", 0, None)
        delay, error = self.settings.webhook_backoff_s, None
        async with httpx.AsyncClient(timeout=self.settings.webhook_timeout_s, follow_redirects=False) as client:
            for attempt in range(1, self.settings.webhook_attempts + 1):
                try:
                    response = await client.post(job.webhook_url, json=payload,
                                                 headers={"User-Agent": "voxswap-webhook", "X-Voxswap-Job": job.id})
                    if response.is_success:
                        await asyncio.to_thread(self.store.record_webhook, job.id, "delivered", attempt, None)
                        self.service.metrics.webhooks.labels("delivered").inc()
                        log.info("webhook delivered", extra={"event": "webhook_done", "job": job.id,
                                                             "attempt": attempt})
                        return
                    error = f"HTTP {response.status_code}"
                except Exception as exc:  # whatever fails an attempt (InvalidURL is no HTTPError) is retried
                    # and recorded, never left as a delivery "sending" forever
                    error = f"{type(exc).__name__}: {exc}"[:200]
                await asyncio.to_thread(self.store.record_webhook, job.id, "sending", attempt, error)
                if attempt < self.settings.webhook_attempts:
                    await asyncio.sleep(delay)
                    delay *= 2
        await asyncio.to_thread(self.store.record_webhook, job.id, "failed", self.settings.webhook_attempts, error)
        self.service.metrics.webhooks.labels("failed").inc()
        log.warning("webhook gave up", extra={"event": "webhook_failed", "job": job.id, "reason": error})
