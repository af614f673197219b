"""Which job store ``VOXSWAP_JOBS_URL`` names: ``sqlite:///path/to/dir`` (or unset: SQLite under the
data dir, one machine) or ``postgresql://user:pass@host/db`` (a fleet sharing one queue).

For SQLite the path is the folder that holds ``jobs.sqlite3`` and the job files (what
``VOXSWAP_DATA_DIR`` is when the URL is unset), so ``sqlite:///var/lib/voxswap/data`` and the default
name the same store.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

from server.storage.job_queue import JobQueue
from server.storage.job_store import JobStore

SCHEMES = ("sqlite", "postgresql", "postgres")


def parse(url: str) -> tuple[str, str]:
    """(``sqlite`` or ``postgresql``, the path or URL); ValueError, naming no password, if neither."""
    scheme = urlsplit(url).scheme.lower()
    if scheme == "sqlite":
        path = unquote(urlsplit(url).path)
        if not path:
            raise ValueError("a sqlite jobs URL names a folder: sqlite:///path/to/data")
        return "sqlite", path
    if scheme in ("postgresql", "postgres"):
        return "postgresql", url
    raise ValueError(f"jobs URL must start with sqlite:/// or postgresql:// (got {scheme or 'no'} scheme)")


def open_job_store(url: str | None, data_dir: Path, *, blob_limit: int | None = None) -> JobQueue:
    """The store ``url`` names (None: SQLite in ``data_dir``); nothing is connected or created yet."""
    if not url:
        return JobStore(data_dir)
    kind, target = parse(url)
    if kind == "sqlite":
        return JobStore(Path(target))
    from server.storage.job_store_pg import DEFAULT_BLOB_LIMIT, PgJobStore  # psycopg only when used

    return PgJobStore(target, spool_dir=Path(data_dir) / "spool", blob_limit=blob_limit or DEFAULT_BLOB_LIMIT)
