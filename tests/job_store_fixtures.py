"""Fixtures for running job tests against both stores: SQLite (fast, default) and a real PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.storage.job_queue import JobQueue
from server.storage.job_store import JobStore
from testkit import postgres as pgkit

STORES = ["sqlite", pytest.param("postgresql", marks=pytest.mark.e2e)]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[pgkit.PostgresServer]:
    if not pgkit.available():
        pytest.skip("Debian's postgresql package is not installed (scripts/install-system-deps.sh)")
    with pgkit.postgres() as server:
        yield server


def fresh_pg_url(pg_server: pgkit.PostgresServer) -> str:
    return pg_server.create_database(f"t{uuid.uuid4().hex[:12]}")


def open_store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> JobQueue:
    if kind == "sqlite":
        return JobStore(tmp_path / "data").ensure()
    from server.storage.job_store_pg import PgJobStore

    url = fresh_pg_url(request.getfixturevalue("pg_server"))
    store = PgJobStore(url, spool_dir=tmp_path / "spool", retry_s=5.0).ensure()
    request.addfinalizer(store.close)
    return store
