"""A batch job as stored: its row, its JSON shape for the API, and the schema of the table."""

from __future__ import annotations

import logging
import re
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from server.vocab import FINISHED_JOB_STATUSES

log = logging.getLogger("voxswap.jobs")
FINISHED = FINISHED_JOB_STATUSES
ID_RE = re.compile(r"^[0-9a-f]{32}$")

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
    webhook_error TEXT,
    owner_key TEXT,
    model TEXT,
    hotwords TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs (owner) WHERE owner IS NOT NULL;
"""
# Columns added since the first release: ``JobStore.ensure`` adds the ones an existing database
# lacks (ALTER TABLE ADD COLUMN, instant in SQLite), then creates the indexes that use them.
ADDED_COLUMNS = {"owner_key": "TEXT", "model": "TEXT", "hotwords": "TEXT"}
ADDED_INDEXES = "CREATE INDEX IF NOT EXISTS jobs_owner_key ON jobs (owner_key, status, seq) WHERE owner_key IS NOT NULL"


class JobResult(Protocol):
    """What completing a job stores: any transcription with these fields (the service's own)."""

    model_version: str
    duration_s: float
    processing_ms: float

    def to_json(self) -> dict[str, Any]: ...


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
    owner_key: str | None = None  # the client API key that submitted it (None: no keys configured)
    model: str | None = None  # as submitted: a model, NAME@VERSION or a pipeline (None: the default model)
    hotwords: str | None = None  # for a model that takes them (None: none)

    @classmethod
    def from_row(cls, row: sqlite3.Row | Mapping[str, Any]) -> Job:
        """From an SQLite row or a PostgreSQL one (a dict); ``seq`` is only the queue's order, and a
        column a later release added is ignored, so a database it migrated still reads here."""
        data = {k: row[k] for k in row.keys() if k in _FIELDS}  # noqa: SIM118 (a Row is no mapping)
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
            "model": self.model,
            "hotwords": self.hotwords,
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
                "url": public_url(self.webhook_url), "status": self.webhook_status, "attempts": self.webhook_attempts,
                "error": self.webhook_error,
            },
            "result_url": f"/api/jobs/{self.id}/result",
            "owner_key": self.owner_key,
        }


_FIELDS = frozenset(f.name for f in fields(Job))


def public_url(url: str) -> str:
    """``scheme://host[:port]/path`` of a webhook URL, as job listings show it: a query string or
    userinfo often carries the token the receiver checks, and listings are read by others."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


@dataclass(frozen=True)
class NewJob:
    """An upload already written to its job folder, waiting for its row."""

    id: str
    filename: str
    input_name: str
    size_bytes: int


def migrate_sqlite(db: sqlite3.Connection) -> None:
    """Bring a database made by an older release up to the schema: the missing columns are added
    under the write lock (processes starting together add each once), then their indexes."""
    db.execute("BEGIN IMMEDIATE")
    try:
        have = {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}
        for column, kind in ADDED_COLUMNS.items():
            if column not in have:
                db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
                log.info("jobs table upgraded", extra={"event": "jobs_migrated", "column": column})
        db.execute(ADDED_INDEXES)
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
