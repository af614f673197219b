"""Batch jobs in PostgreSQL: one queue shared by every instance of a fleet.

Audio and results live in PostgreSQL itself (``job_blobs``, bytea), not on a shared directory:
a fleet that already runs PostgreSQL for its queue then needs nothing else shared (no NFS or RWX
volume with its own locking, permissions and backups), a job's row and its audio are written,
backed up and deleted in the same transactions, and a pod needs no job volume at all. The price is
memory and database size per job, so each recording is held to ``blob_limit`` bytes
(``VOXSWAP_JOBS_BLOB_LIMIT_BYTES``, 64 MiB by default, at most 1 GiB, bytea's own limit): past it
a submission gets 413, like a recording past ``max_upload_bytes``. Uploads are spooled to a local
file first (``spool_dir``) and inserted with their rows, all or none.

Claims are ``FOR UPDATE SKIP LOCKED``: instances never wait on each other's claims. An owner (one
process that runs jobs) holds a session advisory lock on its own connection for as long as it
lives; when its process dies, even by SIGKILL, PostgreSQL ends that session and the lock goes with
it, and any instance that can take the lock requeues the owner's running jobs (and adopts its
undelivered webhooks) in the same transaction, exactly as the SQLite store does with flock.
Completion is a compare-and-set on (status = 'running', owner = me), so a job completes once.

A connection error (PostgreSQL restarting, a failover) is retried for ``retry_s`` before the
caller sees :class:`JobStoreUnavailable` (503). A submission is not retried, as its commit may have
happened: the client gets 503 and submits again. The URL's password is never shown: errors, logs
and status name the store by :func:`redact`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import urlsplit

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from server.errors import NotReady, Overloaded, TooManyPendingJobs
from server.storage import job_disk
from server.storage import job_schema_pg as pgsql
from server.storage import job_spool as spool
from server.storage.job_queue import QueueCounts
from server.storage.job_records import FINISHED, ID_RE, Job, JobResult, NewJob
from server.storage.job_schema_pg import migrate, owner_lock_key, redact

log = logging.getLogger("voxswap.jobs")
T = TypeVar("T")
DEFAULT_BLOB_LIMIT = 64 * 1024**2
MAX_BLOB_LIMIT = 1024**3  # bytea's own limit


class JobStoreUnavailable(NotReady):
    """PostgreSQL did not answer within the retry window: 503, try again."""


class PgJobStore:
    """The queue in PostgreSQL. Every method blocks: call it from a thread, not the event loop."""

    def __init__(self, url: str, *, spool_dir: Path, blob_limit: int = DEFAULT_BLOB_LIMIT,
                 retry_s: float = 30.0, pool_size: int = 4):
        self._url = url
        self._password = urlsplit(url).password
        self.spool_dir = Path(spool_dir)
        self.blob_limit = min(blob_limit, MAX_BLOB_LIMIT)
        self.retry_s = retry_s
        self._pool = ConnectionPool(url, min_size=1, max_size=pool_size, open=False, timeout=5.0,
                                    check=ConnectionPool.check_connection, kwargs={"row_factory": dict_row},
                                    name="voxswap-jobs")
        self._ready = False

    def describe(self) -> str:
        return redact(self._url)

    def exists(self) -> bool:
        return True  # the database is there whether or not anyone submitted a job yet

    def ensure(self) -> PgJobStore:
        if self._ready:
            return self
        self.spool_dir.mkdir(parents=True, exist_ok=True)

        def setup() -> None:
            self._pool.open(wait=False)
            with self._pool.connection() as conn:
                migrate(conn)
        self._retry(setup)
        self._ready = True
        return self

    def close(self) -> None:
        self._pool.close()

    # -- connections and retries --------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        return text.replace(self._password, "***") if self._password else text

    def _retry(self, fn: Callable[[], T], *, retry: bool = True) -> T:
        """``fn`` again after a connection error, until ``retry_s``; then 503 naming no password."""
        deadline, delay = time.monotonic() + self.retry_s, 0.1
        while True:
            try:
                return fn()
            except psycopg.OperationalError as exc:
                if not retry or time.monotonic() + delay > deadline:
                    raise JobStoreUnavailable(f"the job store ({self.describe()}) is unavailable: "
                                              f"{self._scrub(str(exc).strip())[:300]}") from None
                log.warning("job store unavailable; retrying", extra={"event": "jobs_store_retry",
                                                                      "store": self.describe()})
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    @contextmanager
    def _tx(self) -> Iterator[psycopg.Connection[Any]]:
        with self._pool.connection() as conn, conn.transaction():
            yield conn

    def _one(self, sql: str, args: tuple[Any, ...] | list[Any] = (), *, lazy: bool = False,
             retry: bool = True) -> dict[str, Any] | None:
        """One statement in its own transaction. ``lazy``: a write that a database crash may lose
        harmlessly (progress; a claim, which then never happened) skips waiting for the WAL flush."""
        def run() -> dict[str, Any] | None:
            with self._tx() as db:
                if lazy:
                    db.execute("SET LOCAL synchronous_commit = off")
                row: dict[str, Any] | None = db.execute(sql, args).fetchone()  # type: ignore[assignment]
                return row
        return self._retry(run, retry=retry)

    # -- files --------------------------------------------------------------------------------

    def job_dir(self, job_id: str) -> Path:
        """Where an upload is spooled before its row exists (nothing else is on disk)."""
        return spool.folder(self.spool_dir, job_id)

    def stage(self, filename: str, source: IO[bytes], suffix: str, *, limit: int) -> NewJob:
        return spool.write(self.spool_dir, filename, source, suffix, limit=min(limit, self.blob_limit))

    def discard(self, staged: list[NewJob]) -> None:
        for new in staged:
            spool.remove(self.spool_dir, new.id)

    def _blob(self, job_id: str, kind: str) -> bytes:
        row = self._one("SELECT data FROM job_blobs WHERE job_id = %s AND kind = %s", (job_id, kind))
        if row is None:
            raise FileNotFoundError(f"job {job_id} has no {kind}")
        return bytes(row["data"])

    def read_input(self, job: Job) -> bytes:
        return self._blob(job.id, "input")

    def read_result(self, job: Job) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self._blob(job.id, "result").decode())
        return data

    def check_space(self, incoming: int, budget: int) -> None:
        if budget:
            row = self._one("SELECT bytes FROM disk_usage WHERE id = 1")
            job_disk.check(int(row["bytes"]) if row else 0, incoming, budget)

    # -- rows ---------------------------------------------------------------------------------

    def add(self, staged: list[NewJob], *, language: str, use_itn: bool, webhook_url: str | None,
            max_pending: int, owner_key: str | None = None, max_pending_per_key: int = 0,
            disk_budget: int = 0, model: str | None = None, hotwords: str | None = None) -> list[Job]:
        """One row and one audio blob per staged upload, all or none (see ``JobStore.add``)."""
        now = time.time()

        def run() -> list[Job]:
            with self._tx() as db:
                db.execute("SELECT bytes FROM disk_usage WHERE id = 1 FOR UPDATE")  # submissions in turn
                if max_pending_per_key and owner_key is not None:
                    mine = pgsql.count(db, "SELECT COUNT(*) AS n FROM jobs WHERE status = 'pending' AND owner_key = %s",
                                  (owner_key,))
                    if mine + len(staged) > max_pending_per_key:
                        raise TooManyPendingJobs(f"this API key has {mine} jobs waiting (at most "
                                                 f"{max_pending_per_key}); submit more once they have run",
                                                 retry_after=30)
                pending = pgsql.count(db, "SELECT COUNT(*) AS n FROM jobs WHERE status = 'pending'")
                if pending + len(staged) > max_pending:
                    raise Overloaded(f"{pending} jobs are waiting (at most {max_pending}); submit later",
                                     retry_after=30)
                incoming = sum(n.size_bytes for n in staged)
                job_disk.check(pgsql.count(db, "SELECT bytes AS n FROM disk_usage WHERE id = 1"), incoming, disk_budget)
                pgsql.charge(db, incoming)
                for n in staged:
                    db.execute(
                        "INSERT INTO jobs (id, filename, input_name, size_bytes, status, language, use_itn, "
                        "webhook_url, webhook_status, created_at, owner_key, model, hotwords) "
                        "VALUES (%s, %s, %s, %s, 'pending', %s, %s, %s, %s, %s, %s, %s, %s)",
                        (n.id, n.filename, n.input_name, n.size_bytes, language, use_itn, webhook_url,
                         "pending" if webhook_url else None, now, owner_key, model, hotwords))
                    data = (self.job_dir(n.id) / n.input_name).read_bytes()
                    db.execute("INSERT INTO job_blobs (job_id, kind, data) VALUES (%s, 'input', %s)", (n.id, data))
                rows = db.execute("SELECT * FROM jobs WHERE id = ANY(%s) ORDER BY seq", ([n.id for n in staged],))
                return [Job.from_row(r) for r in rows.fetchall()]  # type: ignore[arg-type]
        jobs = self._retry(run, retry=False)
        self.discard(staged)
        return jobs

    def get(self, job_id: str, *, only_key: str | None = None) -> Job | None:
        if not ID_RE.fullmatch(job_id):
            return None
        row = self._one("SELECT * FROM jobs WHERE id = %s", (job_id,))
        return Job.from_row(row) if row and (only_key is None or row["owner_key"] == only_key) else None

    def pending(self) -> int:
        row = self._one("SELECT COUNT(*) AS n FROM jobs WHERE status = 'pending'")
        return int(row["n"]) if row else 0

    def counts(self, owner: str) -> QueueCounts:
        row = self._one("SELECT COUNT(*) FILTER (WHERE status = 'pending') AS p, "
                        "COUNT(*) FILTER (WHERE status = 'running') AS r, "
                        "COUNT(*) FILTER (WHERE status = 'running' AND owner = %s) AS c FROM jobs", (owner,),
                        retry=False)  # a gauge skips a beat rather than wait
        assert row is not None
        return QueueCounts(int(row["p"]), int(row["r"]), int(row["c"]))

    def page(self, *, status: str | None, limit: int, offset: int,
             only_key: str | None = None) -> tuple[list[Job], int]:
        filters = [("status = %s", status), ("owner_key = %s", only_key)]
        conditions, args = [c for c, v in filters if v is not None], [v for _, v in filters if v is not None]
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""

        def run() -> tuple[list[Job], int]:
            with self._tx() as db:
                total = pgsql.count(db, f"SELECT COUNT(*) AS n FROM jobs {where}", args)
                rows = db.execute(f"SELECT * FROM jobs {where} ORDER BY seq DESC LIMIT %s OFFSET %s",
                                  [*args, limit, offset]).fetchall()
            return [Job.from_row(r) for r in rows], total  # type: ignore[arg-type]
        return self._retry(run)

    def claim(self, owner: str) -> Job | None:
        """The oldest pending job nobody else is claiming right now, running for ``owner``."""
        row = self._one(
            "UPDATE jobs SET status = 'running', owner = %s, started_at = %s, progress = 0, "
            "attempts = attempts + 1, error = NULL WHERE seq = (SELECT seq FROM jobs WHERE status = 'pending' "
            "ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED) AND status = 'pending' RETURNING *",
            (owner, time.time()), lazy=True)
        return Job.from_row(row) if row else None

    def progress(self, job_id: str, owner: str, fraction: float) -> bool:
        row = self._one("UPDATE jobs SET progress = %s WHERE id = %s AND owner = %s AND status = 'running' "
                        "RETURNING id", (fraction, job_id, owner), lazy=True)
        return row is not None

    def complete(self, job: Job, owner: str, result: JobResult) -> Job | None:
        """Result and status in one transaction, only while ``owner`` still runs the job."""
        data = json.dumps(result.to_json(), ensure_ascii=False).encode()

        def run() -> Job | None:
            with self._tx() as db:
                row = db.execute(
                    "UPDATE jobs SET status = 'completed', progress = 1, finished_at = %s, model_version = %s, "
                    "duration_s = %s, processing_ms = %s WHERE id = %s AND owner = %s AND status = 'running' "
                    "RETURNING *", (time.time(), result.model_version, round(result.duration_s, 3),
                                    result.processing_ms, job.id, owner)).fetchone()
                if row is None:
                    return None
                db.execute("INSERT INTO job_blobs (job_id, kind, data) VALUES (%s, 'result', %s) "
                           "ON CONFLICT (job_id, kind) DO UPDATE SET data = EXCLUDED.data", (job.id, data))
                pgsql.charge(db, len(data))
                return Job.from_row(row)  # type: ignore[arg-type]
        return self._retry(run)

    def fail(self, job: Job, owner: str, error: str) -> Job | None:
        """Failed for good, its audio deleted in the same transaction (see ``JobStore.fail``)."""
        def run() -> Job | None:
            with self._tx() as db:
                row = db.execute("UPDATE jobs SET status = 'failed', finished_at = %s, error = %s "
                                 "WHERE id = %s AND owner = %s AND status = 'running' RETURNING *",
                                 (time.time(), error, job.id, owner)).fetchone()
                if row is None:
                    return None
                pgsql.drop_inputs(db, [row])  # type: ignore[list-item]
                return Job.from_row(row)  # type: ignore[arg-type]
        return self._retry(run)

    def release(self, job: Job, owner: str) -> None:
        self._one("UPDATE jobs SET status = 'pending', owner = NULL, started_at = NULL, progress = 0, "
                  "attempts = GREATEST(0, attempts - 1) WHERE id = %s AND owner = %s AND status = 'running' "
                  "RETURNING id", (job.id, owner))

    def release_owner(self, owner: str) -> int:
        def run() -> int:
            with self._tx() as db:
                return db.execute("UPDATE jobs SET status = 'pending', owner = NULL, started_at = NULL, "
                                  "progress = 0, attempts = GREATEST(0, attempts - 1) "
                                  "WHERE owner = %s AND status = 'running'", (owner,)).rowcount
        return self._retry(run)

    def cancel_or_delete(self, job_id: str, *, only_key: str | None = None) -> tuple[str, Job | None]:
        def run() -> tuple[str, Job | None]:
            with self._tx() as db:
                row = db.execute("SELECT * FROM jobs WHERE id = %s FOR UPDATE", (job_id,)).fetchone()
                if row is None or (only_key is not None and row["owner_key"] != only_key):  # type: ignore[call-overload]
                    return "missing", None
                if row["status"] in FINISHED:  # type: ignore[call-overload]
                    pgsql.charge(db, -pgsql.held(db, [job_id]))
                    db.execute("DELETE FROM jobs WHERE id = %s", (job_id,))
                    return "deleted", Job.from_row(row)  # type: ignore[arg-type]
                row = db.execute("UPDATE jobs SET status = 'cancelled', finished_at = %s, webhook_status = NULL "
                                 "WHERE id = %s RETURNING *", (time.time(), job_id)).fetchone()
                return "cancelled", Job.from_row(row)  # type: ignore[arg-type]
        return self._retry(run)

    def record_webhook(self, job_id: str, status: str, attempts: int, error: str | None) -> None:
        self._one("UPDATE jobs SET webhook_status = %s, webhook_attempts = %s, webhook_error = %s WHERE id = %s "
                  "RETURNING id", (status, attempts, error, job_id))

    # -- owners -------------------------------------------------------------------------------

    def hold_owner_lock(self, owner: str) -> object:
        """A connection of its own holding ``owner``'s session advisory lock: PostgreSQL ends the
        session, and drops the lock, when this process dies (TCP keepalives catch a lost host)."""
        def take() -> psycopg.Connection[Any]:
            conn = psycopg.connect(self._url, autocommit=True, keepalives=1, keepalives_idle=10,
                                   keepalives_interval=5, keepalives_count=3,
                                   application_name=f"voxswap-owner-{owner}"[:63])
            got = conn.execute("SELECT pg_try_advisory_lock(%s)", (owner_lock_key(owner),)).fetchone()
            if not got or not got[0]:
                conn.close()
                raise RuntimeError(f"owner {owner} is already held")
            return conn
        return self._retry(take)

    def owner_lock_held(self, handle: object) -> bool:
        if not isinstance(handle, psycopg.Connection) or handle.closed:
            return False
        try:
            handle.execute("SELECT 1")
        except psycopg.Error:
            return False
        return True

    def drop_owner_lock(self, owner: str, handle: object) -> None:
        if isinstance(handle, psycopg.Connection):
            handle.close()  # the session ends, and its lock with it

    def recover(self, me: str, *, max_attempts: int) -> tuple[int, list[str]]:
        """Requeue the running jobs of owners whose lock is free, and adopt their webhooks; the lock
        is taken for the transaction, so two instances never recover one owner together."""
        rows = self._retry(lambda: self._rows(
            "SELECT DISTINCT owner FROM jobs WHERE owner IS NOT NULL AND owner != %s AND "
            "(status = 'running' OR webhook_status IN ('pending', 'sending'))", (me,)))
        requeued, adopted = 0, []
        for owner in (r["owner"] for r in rows):
            def run(owner: str = owner) -> tuple[int, list[str], int]:
                with self._tx() as db:
                    free = db.execute("SELECT pg_try_advisory_xact_lock(%s) AS free",
                                      (owner_lock_key(owner),)).fetchone()
                    if not free or not free["free"]:  # type: ignore[call-overload]
                        return 0, [], 0
                    failed = db.execute(
                        "UPDATE jobs SET status = 'failed', finished_at = %s, error = %s WHERE owner = %s AND "
                        "status = 'running' AND attempts >= %s RETURNING id, status, size_bytes",
                        (time.time(), f"the server stopped {max_attempts} times while running this job; gave up",
                         owner, max_attempts)).fetchall()
                    pgsql.drop_inputs(db, failed)  # type: ignore[arg-type]
                    back = db.execute("UPDATE jobs SET status = 'pending', owner = NULL, started_at = NULL, "
                                      "progress = 0 WHERE owner = %s AND status = 'running'", (owner,)).rowcount
                    ids = [r["id"] for r in db.execute(  # type: ignore[call-overload]
                        "UPDATE jobs SET owner = %s, webhook_status = 'pending' WHERE owner = %s AND "
                        "webhook_status IN ('pending', 'sending') AND status IN ('completed', 'failed') "
                        "RETURNING id", (me, owner)).fetchall()]
                    return back, ids, len(failed)
            back, ids, gave_up = self._retry(run)
            requeued += back
            adopted += ids
            if gave_up:
                log.warning("jobs failed after repeated crashes", extra={"event": "job_gave_up", "count": gave_up})
        return requeued, adopted

    def _rows(self, sql: str, args: tuple[Any, ...]) -> list[dict[str, Any]]:
        with self._tx() as db:
            return db.execute(sql, args).fetchall()  # type: ignore[return-value]

    def sweep(self, retention_s: float) -> int:
        """Delete finished jobs past their retention (their blobs go with them), and old spool files."""
        cutoff = time.time() - retention_s

        def run() -> int:
            with self._tx() as db:
                old = [r["id"] for r in db.execute(  # type: ignore[call-overload]
                    "SELECT id FROM jobs WHERE status IN ('completed', 'failed', 'cancelled') AND finished_at < %s "
                    "FOR UPDATE SKIP LOCKED", (cutoff,)).fetchall()]
                if old:
                    pgsql.charge(db, -pgsql.held(db, old))
                    db.execute("DELETE FROM jobs WHERE id = ANY(%s)", (old,))
                return len(old)
        swept = self._retry(run)
        spool.sweep(self.spool_dir)
        return swept
