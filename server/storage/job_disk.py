"""The bytes batch jobs keep in the data dir, tallied in one SQLite row instead of walked on disk.

Each change of a job's files is counted in the same transaction as the change of its row: inputs
when jobs are added, a result when one completes, the input when a job fails (it is deleted then),
everything a job still holds when it is deleted or expires. A submission is checked against the
budget in ``add``'s transaction, so processes sharing the data dir cannot overshoot it together.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

from server.errors import InsufficientStorage

SCHEMA = """
CREATE TABLE IF NOT EXISTS disk_usage (id INTEGER PRIMARY KEY CHECK (id = 1), bytes INTEGER NOT NULL);
INSERT OR IGNORE INTO disk_usage (id, bytes) SELECT 1, COALESCE(SUM(size_bytes), 0) FROM jobs WHERE status != 'failed';
"""  # a data dir from before the tally starts from its inputs (results are small next to them)


def used(db: sqlite3.Connection) -> int:
    return int(db.execute("SELECT bytes FROM disk_usage WHERE id = 1").fetchone()[0])


def charge(db: sqlite3.Connection, nbytes: int) -> None:
    """Count ``nbytes`` more (or, negative, fewer) of job files, in the caller's transaction."""
    if nbytes:
        db.execute("UPDATE disk_usage SET bytes = MAX(0, bytes + ?) WHERE id = 1", (nbytes,))


def check(used_bytes: int, incoming: int, budget: int) -> None:
    """507 when ``incoming`` more bytes would take the job files past ``budget`` (0: no budget)."""
    if budget and used_bytes + incoming > budget:
        raise InsufficientStorage(
            f"the server's storage for jobs is full ({used_bytes} of {budget} bytes in use; this "
            f"submission needs {incoming} more); delete finished jobs or try again later")


def held(row: sqlite3.Row, folder: Path) -> int:
    """What a job counts in the tally: its input unless it failed, its result once completed."""
    size = 0 if row["status"] == "failed" else int(row["size_bytes"])
    if row["status"] == "completed":
        with contextlib.suppress(FileNotFoundError):
            size += (folder / "result.json").stat().st_size
    return size
