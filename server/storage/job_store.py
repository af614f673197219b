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

The bytes of job files are tallied as rows change (``job_disk``), so the data dir's budget is
checked at each submission without walking the folders.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import shutil
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from server.errors import Overloaded, TooManyPendingJobs
from server.storage import job_disk, job_spool
from server.storage.files import remove_orphaned_tmp, write_text_atomic
from server.storage.job_queue import QueueCounts
from server.storage.job_records import FINISHED, ID_RE, SCHEMA, Job, JobResult, NewJob, migrate_sqlite

log = logging.getLogger("voxswap.jobs")
STRAY_DIR_AGE_S = 3600.0  # a job folder with no row (a crash mid-submission) is removed after this


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

    def close(self) -> None:
        """Nothing to close: every call opens and closes its own connection."""

    def describe(self) -> str:
        return f"sqlite://{self.root.resolve()}"  # as VOXSWAP_JOBS_URL names it: the folder

    def ensure(self) -> JobStore:
        """Create the folders and schema; nothing is written to disk before the first use."""
        if self._ready:
            return self
        for path in (self.root, self.jobs_dir, self.owners_dir):
            path.mkdir(parents=True, exist_ok=True)
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(SCHEMA)
            migrate_sqlite(db)
            db.executescript(job_disk.SCHEMA)
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
        return job_spool.write(self.jobs_dir, filename, source, suffix, limit=limit)

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
            max_pending: int, owner_key: str | None = None, max_pending_per_key: int = 0,
            disk_budget: int = 0, model: str | None = None, hotwords: str | None = None) -> list[Job]:
        """One row per staged upload, all or none, owned by ``owner_key``, to run on ``model`` (a model,
        NAME@VERSION or pipeline name as submitted; None: the default model); refused when the queue is
        full, or when that key already has ``max_pending_per_key`` jobs waiting (0: no such limit)."""
        now = time.time()
        with self._transaction() as db:
            if max_pending_per_key and owner_key is not None:
                mine = int(db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'pending' AND owner_key = ?",
                                      (owner_key,)).fetchone()[0])
                if mine + len(staged) > max_pending_per_key:
                    raise TooManyPendingJobs(f"this API key has {mine} jobs waiting (at most {max_pending_per_key}); "
                                             "submit more once they have run", retry_after=30)
            pending = _count_pending(db)
            if pending + len(staged) > max_pending:
                raise Overloaded(f"{pending} jobs are waiting (at most {max_pending}); submit later",
                                 retry_after=30)
            incoming = sum(n.size_bytes for n in staged)
            job_disk.check(job_disk.used(db), incoming, disk_budget)  # again here: peers submit meanwhile
            job_disk.charge(db, incoming)
            db.executemany(
                "INSERT INTO jobs (id, filename, input_name, size_bytes, status, language, use_itn, webhook_url, "
                "webhook_status, created_at, owner_key, model, hotwords) "
                "VALUES (?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?)",
                [(n.id, n.filename, n.input_name, n.size_bytes, language, int(use_itn), webhook_url,
                  "pending" if webhook_url else None, now, owner_key, model, hotwords) for n in staged],
            )
            rows = db.execute(f"SELECT * FROM jobs WHERE id IN ({','.join('?' * len(staged))}) ORDER BY seq",
                              [n.id for n in staged]).fetchall()
        return [Job.from_row(r) for r in rows]

    def get(self, job_id: str, *, only_key: str | None = None) -> Job | None:
        """The job, or None; with ``only_key``, None as well when another key owns it."""
        if not ID_RE.fullmatch(job_id):
            return None
        with self._connect() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return Job.from_row(row) if row and _visible(row, only_key) else None

    def pending(self) -> int:
        with self._connect() as db:
            return _count_pending(db)

    def counts(self, owner: str) -> QueueCounts:
        with self._connect() as db:
            row = db.execute("SELECT COALESCE(SUM(status = 'pending'), 0), COALESCE(SUM(status = 'running'), 0), "
                             "COALESCE(SUM(status = 'running' AND owner = ?), 0) FROM jobs", (owner,)).fetchone()
        return QueueCounts(int(row[0]), int(row[1]), int(row[2]))

    def page(self, *, status: str | None, limit: int, offset: int,
             only_key: str | None = None) -> tuple[list[Job], int]:
        """Newest first; with ``only_key``, that key's jobs only."""
        filters = [("status = ?", status), ("owner_key = ?", only_key)]
        conditions, args = [c for c, v in filters if v is not None], [v for _, v in filters if v is not None]
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
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

    def complete(self, job: Job, owner: str, result: JobResult) -> Job | None:
        """Write the result, then flip to completed; None (and no result) if it was cancelled."""
        folder = self.job_dir(job.id)
        try:  # a locked temporary file renamed over result.json: one left by a crash is swept
            write_text_atomic(folder / "result.json", json.dumps(result.to_json(), ensure_ascii=False),
                              durable=False)
        except FileNotFoundError:  # the job was deleted under us
            return None
        with self._transaction() as db:
            row = db.execute(
                "UPDATE jobs SET status = 'completed', progress = 1, finished_at = ?, model_version = ?, "
                "duration_s = ?, processing_ms = ? WHERE id = ? AND owner = ? AND status = 'running' "
                "RETURNING *",
                (time.time(), result.model_version, round(result.duration_s, 3), result.processing_ms,
                 job.id, owner),
            ).fetchone()
            if row is not None:
                job_disk.charge(db, (folder / "result.json").stat().st_size)
        if row is None:
            (folder / "result.json").unlink(missing_ok=True)
            return None
        return Job.from_row(row)

    def fail(self, job: Job, owner: str, error: str) -> Job | None:
        """Failed for good, and its input deleted at once: nothing reads it again, and a client that
        sends undecodable files must not fill the disk for the whole retention."""
        with self._transaction() as db:
            row = db.execute(
                "UPDATE jobs SET status = 'failed', finished_at = ?, error = ? "
                "WHERE id = ? AND owner = ? AND status = 'running' RETURNING *",
                (time.time(), error, job.id, owner),
            ).fetchone()
            if row is not None:
                job_disk.charge(db, -row["size_bytes"])
        if row is None:
            return None
        self._drop_inputs([row])
        return Job.from_row(row)

    def check_space(self, incoming: int, budget: int) -> None:
        """507 when ``incoming`` more bytes would take the job files past ``budget`` (0: none)."""
        if budget:
            with self._connect() as db:
                job_disk.check(job_disk.used(db), incoming, budget)

    def _drop_inputs(self, rows: list[sqlite3.Row]) -> None:
        for row in rows:
            (self.job_dir(row["id"]) / row["input_name"]).unlink(missing_ok=True)

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

    def cancel_or_delete(self, job_id: str, *, only_key: str | None = None) -> tuple[str, Job | None]:
        """Cancel a pending or running job; delete a finished one (row, audio and result). With
        ``only_key``, another key's job is "missing", exactly like one that does not exist."""
        now = time.time()
        with self._transaction() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None or not _visible(row, only_key):
                return "missing", None
            if row["status"] in FINISHED:
                db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
                job_disk.charge(db, -job_disk.held(row, self.job_dir(job_id)))
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

    def owner_lock_held(self, handle: object) -> bool:
        return True  # a flock lasts as long as the process that holds it

    def drop_owner_lock(self, owner: str, handle: object) -> None:
        (self.owners_dir / f"{owner}.lock").unlink(missing_ok=True)
        if isinstance(handle, io.IOBase):
            handle.close()

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
                    "status = 'running' AND attempts >= ? RETURNING id, input_name, size_bytes",
                    (time.time(), f"the server stopped {max_attempts} times while running this job; gave up",
                     owner, max_attempts)).fetchall()
                job_disk.charge(db, -sum(r["size_bytes"] for r in failed))
                requeued += db.execute(
                    "UPDATE jobs SET status = 'pending', owner = NULL, started_at = NULL, progress = 0 "
                    "WHERE owner = ? AND status = 'running'", (owner,)).rowcount
                adopted += [r[0] for r in db.execute(
                    "UPDATE jobs SET owner = ?, webhook_status = 'pending' WHERE owner = ? AND "
                    "webhook_status IN ('pending', 'sending') AND status IN ('completed', 'failed') "
                    "RETURNING id", (me, owner))]
            if failed:
                self._drop_inputs(failed)
                log.warning("jobs failed after repeated crashes", extra={"event": "job_gave_up",
                                                                         "count": len(failed)})
        return requeued, adopted

    def sweep(self, retention_s: float) -> int:
        """Delete finished jobs past their retention, and job folders left by an interrupted upload."""
        cutoff = time.time() - retention_s
        with self._transaction() as db:
            old = db.execute(
                "DELETE FROM jobs WHERE status IN ('completed', 'failed', 'cancelled') AND finished_at < ? "
                "RETURNING id, status, size_bytes", (cutoff,)).fetchall()
            job_disk.charge(db, -sum(job_disk.held(r, self.job_dir(r["id"])) for r in old))
            known = {r[0] for r in db.execute("SELECT id FROM jobs")}
        for row in old:
            shutil.rmtree(self.job_dir(row["id"]), ignore_errors=True)
        stray_cutoff = time.time() - STRAY_DIR_AGE_S
        for folder in self.jobs_dir.iterdir():
            if ID_RE.fullmatch(folder.name) and folder.name not in known:
                with contextlib.suppress(FileNotFoundError):
                    if folder.stat().st_mtime < stray_cutoff:
                        shutil.rmtree(folder, ignore_errors=True)
            elif folder.name in known:
                remove_orphaned_tmp(folder)  # a result a dead worker never renamed into place
        return len(old)


def _visible(row: sqlite3.Row, only_key: str | None) -> bool:
    return only_key is None or row["owner_key"] == only_key


def _count_pending(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'pending'").fetchone()[0])
