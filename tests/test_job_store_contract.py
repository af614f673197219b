"""One job-store suite, run against both stores: what the runner and the routes rely on.

SQLite runs in the default (fast) selection; PostgreSQL needs the real server from testkit and is
marked e2e. The same promises hold for both: one claim per job under contention, completion only
while still owning the job, a dead owner's jobs requeued (or failed after too many deaths),
retention, the disk budget and per-key visibility.
"""

from __future__ import annotations

import io
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from server.errors import InsufficientStorage, Overloaded, PayloadTooLarge
from server.storage.job_queue import JobQueue
from server.storage.job_records import NewJob
from server.storage.job_schema_pg import MIGRATIONS
from server.storage.job_store import JobStore
from tests.job_store_fixtures import STORES, fresh_pg_url, open_store, pg_server  # noqa: F401 (a fixture)


@pytest.fixture(params=STORES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> JobQueue:
    return open_store(request.param, tmp_path, request)


@dataclass
class Result:
    """A transcription as the runner hands it to ``complete``."""

    text: str
    model_version: str = "a"
    duration_s: float = 1.5
    processing_ms: float = 12.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"text": self.text, "model_version": self.model_version, **self.extra}


def add(store: JobQueue, n: int, *, data: bytes = b"RIFF-audio", **kw: Any) -> list[str]:
    staged = [store.stage(f"rec{i}.wav", io.BytesIO(data), ".wav", limit=1 << 20) for i in range(n)]
    options: dict[str, Any] = dict(language="auto", use_itn=False, webhook_url=None, max_pending=10_000)
    return [job.id for job in store.add(staged, **{**options, **kw})]


def test_each_job_is_claimed_once_under_contention(store: JobQueue) -> None:
    ids = add(store, 40)
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        while (job := store.claim(f"owner-{n}")) is not None:
            assert store.complete(job, f"owner-{n}", Result(text=job.filename)) is not None
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(claimed) == sorted(ids)
    for job_id in ids:
        job = store.get(job_id)
        assert job is not None and (job.status, job.attempts) == ("completed", 1)
        assert store.read_result(job)["text"] == job.filename
    assert store.counts("owner-0").pending == 0


def test_audio_reaches_the_worker_and_the_oldest_job_runs_first(store: JobQueue) -> None:
    first, second = add(store, 2, data=b"\x00\x01voice")
    job = store.claim("me")
    assert job is not None and job.id == first and store.read_input(job) == b"\x00\x01voice"
    assert store.counts("me") == store.counts("me").__class__(pending=1, running=1, claimed=1)
    assert store.counts("someone-else").claimed == 0
    assert store.get(second) is not None


def test_completion_needs_the_job_still_running_for_its_owner(store: JobQueue) -> None:
    [job_id] = add(store, 1)
    job = store.claim("me")
    assert job is not None
    assert store.complete(job, "not-me", Result(text="x")) is None
    assert store.progress(job_id, "me", 0.5) is True
    assert store.cancel_or_delete(job_id)[0] == "cancelled"
    assert store.progress(job_id, "me", 0.6) is False
    assert store.complete(job, "me", Result(text="late")) is None
    cancelled = store.get(job_id)
    assert cancelled is not None and cancelled.status == "cancelled"
    assert store.cancel_or_delete(job_id)[0] == "deleted" and store.get(job_id) is None


def test_a_dead_owners_job_is_requeued_and_completed_exactly_once(store: JobQueue) -> None:
    [job_id] = add(store, 1)
    lock_a = store.hold_owner_lock("a")
    lock_b = store.hold_owner_lock("b")
    job = store.claim("a")
    assert job is not None
    assert store.recover("b", max_attempts=3) == (0, [])  # a is alive: its job stays its own
    store.drop_owner_lock("a", lock_a)  # a dies (what its process's death does to the lock)
    assert store.recover("b", max_attempts=3)[0] == 1
    again = store.claim("b")
    assert again is not None and again.id == job_id and again.attempts == 2
    assert store.complete(job, "a", Result(text="from the dead")) is None
    done = store.complete(again, "b", Result(text="from b"))
    assert done is not None and store.read_result(done)["text"] == "from b"
    assert store.owner_lock_held(lock_b)
    store.drop_owner_lock("b", lock_b)


def test_a_job_whose_owner_keeps_dying_is_failed_and_its_audio_dropped(store: JobQueue) -> None:
    [job_id] = add(store, 1)
    for attempt in range(3):
        lock = store.hold_owner_lock(f"crashed-{attempt}")
        assert store.claim(f"crashed-{attempt}") is not None
        store.drop_owner_lock(f"crashed-{attempt}", lock)
        requeued, _ = store.recover("survivor", max_attempts=3)
        assert requeued == (1 if attempt < 2 else 0)
    job = store.get(job_id)
    assert job is not None and job.status == "failed" and "gave up" in (job.error or "")
    with pytest.raises(FileNotFoundError):
        store.read_input(job)


def test_the_queue_limit_the_disk_budget_and_failures_give_bytes_back(store: JobQueue) -> None:
    add(store, 2, data=b"x" * 1000, disk_budget=3000)
    with pytest.raises(InsufficientStorage):
        add(store, 2, data=b"x" * 1000, disk_budget=3000)
    with pytest.raises(Overloaded):
        add(store, 1, max_pending=2)
    job = store.claim("me")
    assert job is not None and store.fail(job, "me", "not audio") is not None
    add(store, 1, data=b"x" * 1000, disk_budget=3000)  # the failed job's input was given back
    with pytest.raises(PayloadTooLarge):
        store.stage("big.wav", io.BytesIO(b"y" * 2048), ".wav", limit=1024)


def test_finished_jobs_expire_after_their_retention(store: JobQueue) -> None:
    [job_id] = add(store, 1)
    assert store.cancel_or_delete(job_id)[0] == "cancelled"
    assert store.sweep(retention_s=3600) == 0 and store.get(job_id) is not None
    assert store.sweep(retention_s=1e-9) == 1 and store.get(job_id) is None


def test_a_key_sees_only_its_own_jobs(store: JobQueue) -> None:
    mine = add(store, 2, owner_key="k1")
    theirs = add(store, 1, owner_key="k2")
    jobs, total = store.page(status=None, limit=10, offset=0, only_key="k1")
    assert total == 2 and [j.id for j in jobs] == mine[::-1]
    assert store.get(theirs[0], only_key="k1") is None
    assert store.cancel_or_delete(theirs[0], only_key="k1") == ("missing", None)
    assert store.page(status="pending", limit=10, offset=0)[1] == 3


def test_a_graceful_stop_puts_running_jobs_back_without_counting_them(store: JobQueue) -> None:
    add(store, 2)
    assert store.claim("me") is not None and store.claim("me") is not None
    assert store.release_owner("me") == 2
    job = store.claim("next")
    assert job is not None and job.attempts == 1


def test_staged_uploads_that_are_discarded_leave_nothing(store: JobQueue) -> None:
    staged = store.stage("a.wav", io.BytesIO(b"abc"), ".wav", limit=1024)
    assert isinstance(staged, NewJob) and staged.size_bytes == 3
    store.discard([staged])
    assert store.get(staged.id) is None and store.pending() == 0


def test_a_job_keeps_the_model_and_hotwords_it_was_submitted_with(store: JobQueue) -> None:
    [pinned] = add(store, 1, model="meeting@m1")
    [hot] = add(store, 1, model="hot", hotwords="voxswap blue")
    [plain] = add(store, 1)
    for job_id, model, hotwords in ((pinned, "meeting@m1", None), (hot, "hot", "voxswap blue"), (plain, None, None)):
        job = store.get(job_id)
        assert job is not None and (job.model, job.hotwords) == (model, hotwords)
        assert (job.to_json()["model"], job.to_json()["hotwords"]) == (model, hotwords)
    claimed = store.claim("me")
    assert claimed is not None and (claimed.id, claimed.model) == (pinned, "meeting@m1")  # the runner resolves it
    done = store.complete(claimed, "me", Result(text="x", model_version="m1"))
    assert done is not None and (done.model, done.model_version) == ("meeting@m1", "m1")
    failed = store.claim("me")
    assert failed is not None and (failed.model, failed.hotwords) == ("hot", "voxswap blue")
    failed = store.fail(failed, "me", "the job's model 'hot' cannot run it now: no model 'hot'")
    assert failed is not None and failed.model == "hot"
    listed = {j.id: j.model for j in store.page(status=None, limit=10, offset=0)[0]}
    assert listed == {pinned: "meeting@m1", hot: "hot", plain: None}


# The jobs table as the release before job models left it, in SQLite (PostgreSQL's is its migration 1,
# since migrations are only ever appended): no ``model`` or ``hotwords`` column.
PREVIOUS_SQLITE_SCHEMA = """
CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, filename TEXT NOT NULL,
    input_name TEXT NOT NULL, size_bytes INTEGER NOT NULL, status TEXT NOT NULL, language TEXT NOT NULL,
    use_itn INTEGER NOT NULL, webhook_url TEXT, created_at REAL NOT NULL, started_at REAL, finished_at REAL,
    progress REAL NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0, owner TEXT, model_version TEXT,
    duration_s REAL, processing_ms REAL, error TEXT, webhook_status TEXT,
    webhook_attempts INTEGER NOT NULL DEFAULT 0, webhook_error TEXT, owner_key TEXT
);
CREATE INDEX jobs_status ON jobs (status, seq);
CREATE INDEX jobs_owner ON jobs (owner) WHERE owner IS NOT NULL;
CREATE INDEX jobs_owner_key ON jobs (owner_key, status, seq) WHERE owner_key IS NOT NULL;
CREATE TABLE disk_usage (id INTEGER PRIMARY KEY CHECK (id = 1), bytes INTEGER NOT NULL);
"""
OLD_ID = "a" * 32
OLD_AUDIO = b"RIFF-old-audio"


def previous_release_store(kind: str, tmp_path: Path,
                           request: pytest.FixtureRequest) -> tuple[JobQueue, Callable[[], JobQueue]]:
    """A store whose database the previous release made, one job pending in it, opened by this
    release; and a function that opens it again (a second start)."""
    if kind == "sqlite":
        root = tmp_path / "data"
        (root / "jobs" / OLD_ID).mkdir(parents=True)
        (root / "jobs" / OLD_ID / "input.wav").write_bytes(OLD_AUDIO)
        with sqlite3.connect(root / "jobs.sqlite3") as db:
            db.executescript(PREVIOUS_SQLITE_SCHEMA)
            db.execute("INSERT INTO jobs (id, filename, input_name, size_bytes, status, language, use_itn, "
                       "created_at) VALUES (?, 'old.wav', 'input.wav', ?, 'pending', 'auto', 0, 1.0)",
                       (OLD_ID, len(OLD_AUDIO)))
            db.execute("INSERT INTO disk_usage (id, bytes) VALUES (1, ?)", (len(OLD_AUDIO),))
        db.close()
        return JobStore(root).ensure(), lambda: JobStore(root).ensure()
    import psycopg

    from server.storage.job_store_pg import PgJobStore

    url = fresh_pg_url(request.getfixturevalue("pg_server"))
    version, first = MIGRATIONS[0]
    with psycopg.connect(url, autocommit=True) as pg:
        pg.execute("CREATE TABLE voxswap_schema_migrations (version INTEGER PRIMARY KEY, "
                   "applied_at DOUBLE PRECISION NOT NULL)")
        pg.execute(first)
        pg.execute("INSERT INTO voxswap_schema_migrations (version, applied_at) VALUES (%s, 1.0)", (version,))
        pg.execute("INSERT INTO jobs (id, filename, input_name, size_bytes, status, language, use_itn, created_at) "
                   "VALUES (%s, 'old.wav', 'input.wav', %s, 'pending', 'auto', false, 1.0)", (OLD_ID, len(OLD_AUDIO)))
        pg.execute("INSERT INTO job_blobs (job_id, kind, data) VALUES (%s, 'input', %s)", (OLD_ID, OLD_AUDIO))
        pg.execute("UPDATE disk_usage SET bytes = %s WHERE id = 1", (len(OLD_AUDIO),))

    def reopen() -> JobQueue:
        store = PgJobStore(url, spool_dir=tmp_path / "spool", retry_s=5.0).ensure()
        request.addfinalizer(store.close)
        return store

    return reopen(), reopen


@pytest.mark.parametrize("kind", STORES)
def test_jobs_of_the_previous_release_read_and_run_on_the_default_model(
        kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    store, reopen = previous_release_store(kind, tmp_path, request)
    old = store.get(OLD_ID)
    assert old is not None and (old.filename, old.model, old.hotwords) == ("old.wav", None, None)
    assert old.to_json()["model"] is None
    [new] = add(store, 1, model="meeting")
    assert [(j.id, j.model) for j in store.page(status=None, limit=10, offset=0)[0]] == [(new, "meeting"),
                                                                                       (OLD_ID, None)]
    job = store.claim("me")
    assert job is not None and job.id == OLD_ID and store.read_input(job) == OLD_AUDIO
    done = store.complete(job, "me", Result(text="old"))
    assert done is not None and store.read_result(done)["text"] == "old" and done.model is None
    again = reopen()  # a second start: nothing to migrate
    assert [(j.id, j.model) for j in again.page(status=None, limit=10, offset=0)[0]] == [(new, "meeting"),
                                                                                       (OLD_ID, None)]
