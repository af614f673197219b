"""Jobs belong to the client API key that submitted them (issue 18, finding D).

The probe found no tenancy: any client listed every job (file names, webhook URLs with their query
secrets), read any result and deleted any job. With ``VOXSWAP_API_KEYS_FILE`` set, each job now
records its key; another key's job answers 404 as if it did not exist, the admin token sees them
all, and a key may have only so many jobs waiting. These tests use real keys through the guard
(``server/http/guard.py``) and ``Authorization: Bearer`` headers, as the CLI and openai client send.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings
from server.storage.job_records import NewJob
from server.storage.job_store import JobStore
from server.testing import synth
from tests.conftest import AUTH
from tests.jobs_helpers import submit, wait_for_jobs

ALICE = {"Authorization": "Bearer alice-key-0123456789"}
BOB = {"Authorization": "Bearer bob-key-9876543210"}


def key_id(headers: dict[str, str]) -> str:
    return hashlib.sha256(headers["Authorization"].removeprefix("Bearer ").encode()).hexdigest()[:16]


@pytest.fixture(scope="module")
def clip() -> bytes:
    return synth.wav_bytes(synth.speech_like(1.5, seed=4))


@pytest.fixture
def app(make_settings: Callable[..., Settings], tmp_path: Path) -> Callable[..., TestClient]:
    keys = tmp_path / "keys.txt"
    keys.write_text(f"{ALICE['Authorization'][7:]} alice\n"
                    f"sha256:{hashlib.sha256(BOB['Authorization'][7:].encode()).hexdigest()} bob\n")

    def build(**overrides: Any) -> TestClient:
        base: dict[str, Any] = dict(data_dir=tmp_path / "data", job_poll_s=0.05, api_keys_file=keys)
        return TestClient(create_app(make_settings(**{**base, **overrides})))

    return build


def test_two_keys_cannot_see_read_or_delete_each_others_jobs(app: Callable[..., TestClient],
                                                             clip: bytes) -> None:
    with app() as c:
        c.headers.update(ALICE)
        [alices] = submit(c, [("alice-board-meeting.wav", clip)])
        c.headers.update(BOB)
        [bobs] = submit(c, [("bob-salary-review.wav", clip)])
        assert alices["owner_key"] == key_id(ALICE) and bobs["owner_key"] == key_id(BOB)
        wait_for_jobs(c, [bobs["id"]])

        c.headers.update(ALICE)
        listing = c.get("/api/jobs")
        assert [j["id"] for j in listing.json()["jobs"]] == [alices["id"]] and listing.json()["total"] == 1
        assert "bob-salary-review" not in listing.text
        for method, path in (("GET", f"/api/jobs/{bobs['id']}"), ("GET", f"/api/jobs/{bobs['id']}/result"),
                             ("DELETE", f"/api/jobs/{bobs['id']}")):
            r = c.request(method, path)
            assert r.status_code == 404, (method, path, r.text)  # not 403: nothing says it exists
            assert r.json()["error"]["message"] == f"no job {bobs['id']!r}"
        missing = c.get("/api/jobs/" + "0" * 32).json()["error"]
        assert missing["code"] == "not_found" and missing["message"] == "no job '" + "0" * 32 + "'"

        c.headers.update(BOB)  # Bob's job survived Alice's delete
        assert c.get(f"/api/jobs/{bobs['id']}").json()["status"] == "completed"
        assert c.get(f"/api/jobs/{bobs['id']}/result").status_code == 200
        assert c.get("/api/jobs").json()["total"] == 1
        assert c.delete(f"/api/jobs/{alices['id']}").status_code == 404

        c.headers.update(AUTH)  # the admin token sees and manages every key's jobs
        everything = c.get("/api/jobs").json()
        assert {j["id"] for j in everything["jobs"]} == {alices["id"], bobs["id"]} and everything["total"] == 2
        assert c.get(f"/api/jobs/{alices['id']}").status_code == 200
        wait_for_jobs(c, [alices["id"]])
        assert c.delete(f"/api/jobs/{bobs['id']}").json()["action"] == "deleted"

        del c.headers["Authorization"]
        assert c.get("/api/jobs").status_code == 401  # with keys configured, no key, no jobs


def test_a_key_may_have_only_so_many_jobs_waiting(app: Callable[..., TestClient], clip: bytes) -> None:
    with app(job_workers=0, max_pending_jobs_per_key=2) as c:
        c.headers.update(ALICE)
        submit(c, [("1.wav", clip), ("2.wav", clip)])
        r = c.post("/api/jobs", files=[("files", ("3.wav", clip))])
        assert r.status_code == 429, r.text
        assert r.json()["error"]["code"] == "too_many_pending_jobs" and int(r.headers["retry-after"]) > 0
        assert "2 jobs waiting" in r.json()["error"]["message"]
        c.headers.update(BOB)  # another key is not held back by Alice's queue
        submit(c, [("b.wav", clip)])
        c.headers.update(AUTH)
        assert c.get("/api/jobs").json()["total"] == 3  # the refused upload left nothing behind


def test_without_keys_every_client_shares_the_jobs_as_before(make_settings: Callable[..., Settings],
                                                             tmp_path: Path, clip: bytes) -> None:
    with TestClient(create_app(make_settings(data_dir=tmp_path / "data", job_workers=0,
                                             max_pending_jobs_per_key=1))) as c:
        job, _ = submit(c, [("a.wav", clip), ("b.wav", clip)])  # no key: no per-key limit either
        assert job["owner_key"] is None
        assert c.get("/api/jobs").json()["total"] == 2
        assert c.get(f"/api/jobs/{job['id']}", headers={"Authorization": "Bearer anything"}).status_code == 200


OLD_SCHEMA = """
CREATE TABLE jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, filename TEXT NOT NULL,
    input_name TEXT NOT NULL, size_bytes INTEGER NOT NULL, status TEXT NOT NULL, language TEXT NOT NULL,
    use_itn INTEGER NOT NULL, webhook_url TEXT, created_at REAL NOT NULL, started_at REAL, finished_at REAL,
    progress REAL NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0, owner TEXT, model_version TEXT,
    duration_s REAL, processing_ms REAL, error TEXT, webhook_status TEXT,
    webhook_attempts INTEGER NOT NULL DEFAULT 0, webhook_error TEXT
);
CREATE INDEX jobs_status ON jobs (status, seq);
CREATE INDEX jobs_owner ON jobs (owner) WHERE owner IS NOT NULL;
"""


def test_a_jobs_database_of_the_previous_release_is_upgraded_in_place(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    with sqlite3.connect(root / "jobs.sqlite3") as db:  # as the release before owner keys left it
        db.executescript(OLD_SCHEMA)
        db.execute("INSERT INTO jobs (id, filename, input_name, size_bytes, status, language, use_itn, created_at) "
                   "VALUES (?, 'old.wav', 'input.wav', 10, 'pending', 'auto', 0, 1.0)", ("a" * 32,))
    db.close()

    store = JobStore(root).ensure()
    old = store.get("a" * 32)
    assert old is not None and old.filename == "old.wav" and old.owner_key is None
    assert store.get("a" * 32, only_key="k1") is None  # a job from before keys belongs to no key
    [new] = store.add([NewJob("b" * 32, "new.wav", "input.wav", 1)], language="auto", use_itn=False,
                      webhook_url=None, max_pending=10, owner_key="k1")
    assert new.owner_key == "k1"
    assert [j.id for j in store.page(status=None, limit=10, offset=0, only_key="k1")[0]] == ["b" * 32]
    assert JobStore(root).ensure().page(status=None, limit=10, offset=0)[1] == 2  # a second start: no-op
    with sqlite3.connect(root / "jobs.sqlite3") as db:
        columns = [row[1] for row in db.execute("PRAGMA table_info(jobs)")]
        indexes = {row[1] for row in db.execute("PRAGMA index_list(jobs)")}
    db.close()
    assert columns.count("owner_key") == 1 and "jobs_owner_key" in indexes
