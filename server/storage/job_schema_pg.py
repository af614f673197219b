"""The PostgreSQL job store's schema (numbered migrations applied on start) and its SQL helpers.

Several instances of a fleet start at once (a Deployment rolled out, a node restarted), so the
migrations run inside one transaction under a transaction-level advisory lock: the first instance
applies what is missing and records each version in ``voxswap_schema_migrations``; the others wait
for its commit, then find nothing left to do. A migration is only ever appended, never edited.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg

log = logging.getLogger("voxswap.jobs")

MIGRATION_LOCK = 0x766F_7873_7761_7001  # "voxswap" + 1: the advisory lock key of migrations
OWNER_LOCK_SPACE = 0x766F_78  # owner locks live in this key space (high 32 bits), see owner_key()

MIGRATIONS: list[tuple[int, str]] = [
    (1, """
CREATE TABLE jobs (
    seq BIGSERIAL PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    filename TEXT NOT NULL,
    input_name TEXT NOT NULL,
    size_bytes BIGINT NOT NULL,
    status TEXT NOT NULL,
    language TEXT NOT NULL,
    use_itn BOOLEAN NOT NULL,
    webhook_url TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    started_at DOUBLE PRECISION,
    finished_at DOUBLE PRECISION,
    progress DOUBLE PRECISION NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    model_version TEXT,
    duration_s DOUBLE PRECISION,
    processing_ms DOUBLE PRECISION,
    error TEXT,
    webhook_status TEXT,
    webhook_attempts INTEGER NOT NULL DEFAULT 0,
    webhook_error TEXT,
    owner_key TEXT
);
CREATE INDEX jobs_status ON jobs (status, seq);
CREATE INDEX jobs_owner ON jobs (owner) WHERE owner IS NOT NULL;
CREATE INDEX jobs_owner_key ON jobs (owner_key, status, seq) WHERE owner_key IS NOT NULL;
-- audio ('input') and transcripts ('result'), apart from the rows a claim scans
CREATE TABLE job_blobs (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    kind TEXT NOT NULL CHECK (kind IN ('input', 'result')),
    data BYTEA NOT NULL,
    PRIMARY KEY (job_id, kind)
);
CREATE TABLE disk_usage (id INTEGER PRIMARY KEY CHECK (id = 1), bytes BIGINT NOT NULL);
INSERT INTO disk_usage (id, bytes) VALUES (1, 0);
"""),
    # the model (or pipeline) a job asked for, and its hotwords; NULL: the default model, as before
    (2, """
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS model TEXT;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS hotwords TEXT;
"""),
]


def migrate(conn: Any) -> list[int]:
    """Apply the missing migrations (``conn``: a psycopg connection); returns the versions applied."""
    applied: list[int] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
        conn.execute("CREATE TABLE IF NOT EXISTS voxswap_schema_migrations "
                     "(version INTEGER PRIMARY KEY, applied_at DOUBLE PRECISION NOT NULL)")
        done = {row["version"] for row in conn.execute("SELECT version FROM voxswap_schema_migrations")}
        for version, sql in MIGRATIONS:
            if version in done:
                continue
            conn.execute(sql)
            conn.execute("INSERT INTO voxswap_schema_migrations (version, applied_at) VALUES (%s, %s)",
                         (version, time.time()))
            applied.append(version)
            log.info("jobs schema migrated", extra={"event": "jobs_migrated", "version": version})
    return applied


def redact(url: str) -> str:
    """The URL with its password replaced by ``***``: what logs, errors and status may show."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.netloc.rpartition('@')[2]}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def owner_lock_key(owner: str) -> int:
    """The advisory lock key of an owner: 32 bits of key space, 32 bits of its name's hash."""
    low = int.from_bytes(hashlib.sha256(owner.encode()).digest()[:4], "big")
    return ((OWNER_LOCK_SPACE << 32) | low) - (1 << 63)  # into bigint's signed range


def count(db: psycopg.Connection[Any], sql: str, args: tuple[Any, ...] | list[Any] = ()) -> int:
    row = db.execute(sql, args).fetchone()
    return int(row["n"]) if row else 0  # type: ignore[call-overload]


def charge(db: psycopg.Connection[Any], nbytes: int) -> None:
    if nbytes:
        db.execute("UPDATE disk_usage SET bytes = GREATEST(0, bytes + %s) WHERE id = 1", (nbytes,))


def held(db: psycopg.Connection[Any], ids: list[str]) -> int:
    """What these jobs count in the tally: the blobs they still hold."""
    return count(db, "SELECT COALESCE(SUM(octet_length(data)), 0) AS n FROM job_blobs WHERE job_id = ANY(%s)",
                  (ids,))


def drop_inputs(db: psycopg.Connection[Any], rows: list[dict[str, Any]]) -> None:
    """A failed job's audio, deleted with its status change: nothing reads it again."""
    ids = [r["id"] for r in rows]
    if ids:
        freed = count(db, "SELECT COALESCE(SUM(octet_length(data)), 0) AS n FROM job_blobs "
                           "WHERE job_id = ANY(%s) AND kind = 'input'", (ids,))
        db.execute("DELETE FROM job_blobs WHERE job_id = ANY(%s) AND kind = 'input'", (ids,))
        charge(db, -freed)
