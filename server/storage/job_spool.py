"""Uploads on their way into a job store: written to a local folder while they arrive
(checked against the size limit as they stream, never held whole in memory while a client is slow),
then (PostgreSQL) inserted with their rows and removed, or (SQLite) kept as the job's folder. A
crash mid-submission leaves a folder that :func:`sweep` removes once it is older than
``SPOOL_AGE_S``.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from pathlib import Path
from typing import IO

from server.errors import PayloadTooLarge
from server.storage.job_records import ID_RE, NewJob

SPOOL_AGE_S = 3600.0


def folder(root: Path, job_id: str) -> Path:
    if not ID_RE.fullmatch(job_id):
        raise ValueError(f"not a job id: {job_id!r}")
    return root / job_id


def write(root: Path, filename: str, source: IO[bytes], suffix: str, *, limit: int) -> NewJob:
    """Copy one upload into a new folder under ``root``; 413 past ``limit`` bytes."""
    job_id = uuid.uuid4().hex
    into = folder(root, job_id)
    into.mkdir(parents=True)
    size = 0
    try:
        with (into / f"input{suffix}").open("wb") as out:
            while chunk := source.read(1 << 20):
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"{filename!r} is larger than {limit} bytes", param="files")
                out.write(chunk)
    except BaseException:
        remove(root, job_id)
        raise
    return NewJob(job_id, filename, f"input{suffix}", size)


def remove(root: Path, job_id: str) -> None:
    into = folder(root, job_id)
    for path in into.glob("*"):
        path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        into.rmdir()


def sweep(root: Path) -> None:
    stale = time.time() - SPOOL_AGE_S
    for entry in root.iterdir() if root.exists() else ():
        with contextlib.suppress(FileNotFoundError):
            if ID_RE.fullmatch(entry.name) and os.stat(entry).st_mtime < stale:
                remove(root, entry.name)
