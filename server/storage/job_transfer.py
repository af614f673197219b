"""``voxswap jobs migrate``: move the jobs of an SQLite store into a PostgreSQL one.

For the day a single machine becomes a fleet: every row keeps its id (so clients' job URLs still
answer), status, times, owner key, model, hotwords and webhook state; audio and results move into the database.
Run it with the old instance stopped. A job that was running goes back to pending (its process is
gone); an undelivered webhook is handed to an owner nobody holds, so the first instance's recovery
adopts and delivers it. Copying is idempotent: a job already in the destination is skipped, so an
interrupted run is simply run again.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from server.storage.job_records import Job
from server.storage.job_schema_pg import charge
from server.storage.job_store import JobStore
from server.storage.job_store_pg import PgJobStore
from server.storage.jobs_url import parse

COLUMNS = ("id", "filename", "input_name", "size_bytes", "status", "language", "use_itn", "webhook_url",
           "created_at", "started_at", "finished_at", "progress", "attempts", "owner", "model_version",
           "duration_s", "processing_ms", "error", "webhook_status", "webhook_attempts", "webhook_error",
           "owner_key", "model", "hotwords")


@dataclass(frozen=True)
class Moved:
    copied: int
    skipped: int  # already in the destination (a second run)
    requeued: int  # were running: now pending


def _row(job: Job, orphan_owner: str) -> tuple[Any, ...]:
    data = {name: getattr(job, name) for name in COLUMNS}
    if job.status == "running":
        data.update(status="pending", owner=None, started_at=None, progress=0.0)
    elif job.webhook_status in ("pending", "sending"):
        data["owner"] = orphan_owner
    return tuple(data[name] for name in COLUMNS)


def move_jobs(source_url: str, dest_url: str, *, spool_dir: Path) -> Moved:
    """Copy every job of the SQLite store ``source_url`` into the PostgreSQL store ``dest_url``."""
    src_kind, src_path = parse(source_url)
    dst_kind, dst = parse(dest_url)
    if src_kind != "sqlite" or dst_kind != "postgresql":
        raise ValueError("jobs migrate copies from sqlite:///... to postgresql://...")
    source = JobStore(Path(src_path))
    if not source.exists():
        raise ValueError(f"no jobs database in {src_path}")
    target = PgJobStore(dst, spool_dir=spool_dir).ensure()  # creates or migrates the schema
    target.close()
    jobs: list[Job] = []
    while batch := source.page(status=None, limit=1000, offset=len(jobs))[0]:
        jobs += batch
    jobs.reverse()  # oldest first: the queue keeps its order
    orphan = f"migrated-{uuid.uuid4().hex[:8]}-{int(time.time())}"
    copied = skipped = requeued = 0
    with psycopg.connect(dst) as db:
        for job in jobs:
            with db.transaction():
                inserted = db.execute(
                    f"INSERT INTO jobs ({', '.join(COLUMNS)}) VALUES ({', '.join(['%s'] * len(COLUMNS))}) "
                    "ON CONFLICT (id) DO NOTHING RETURNING id", _row(job, orphan)).fetchone()
                if inserted is None:
                    skipped += 1
                    continue
                folder = source.job_dir(job.id)
                for kind, path in (("input", folder / job.input_name), ("result", folder / "result.json")):
                    if path.exists() and (kind == "input" or job.status == "completed"):
                        data = path.read_bytes()
                        db.execute("INSERT INTO job_blobs (job_id, kind, data) VALUES (%s, %s, %s)",
                                   (job.id, kind, data))
                        charge(db, len(data))
                copied += 1
                requeued += job.status == "running"
    return Moved(copied, skipped, requeued)
