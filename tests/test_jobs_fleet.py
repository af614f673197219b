"""A fleet sharing one PostgreSQL job queue: two real voxswap servers, a SIGKILL, a database restart.

What an operator of several instances relies on: jobs submitted to one instance are worked by all;
an instance killed mid-job leaves the others to finish everything, each job completed once with the
right transcript; any instance answers for any job; PostgreSQL restarting mid-run loses nothing;
and the URL's password shows nowhere.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import psycopg
import pytest

from server.storage.job_schema_pg import MIGRATIONS
from server.storage.job_store_pg import JobStoreUnavailable, PgJobStore
from server.storage.registry import Registry
from server.testing import synth
from testkit import postgres as pgkit
from testkit.harness import wait_until
from tests.conftest import TEXT_A
from tests.job_store_fixtures import fresh_pg_url, pg_server  # noqa: F401 (a fixture)
from tests.jobs_helpers import ServerProcess, WebhookReceiver, submit, wait_for_jobs

pytestmark = pytest.mark.e2e
SLOW_MS = 40.0


@pytest.fixture
def slow_registry(tmp_path: Path, model_dir: Callable[..., Path]) -> Registry:
    reg = Registry(tmp_path / "slow-registry").ensure()
    reg.add(model_dir(TEXT_A, compute_ms=SLOW_MS), "a")
    reg.promote("a")
    return reg


def _running_for(url: str, pid: int) -> int:
    with psycopg.connect(url) as db:
        row = db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'running' AND owner LIKE %s",
                         (f"%-{pid}-%",)).fetchone()
    return int(row[0]) if row else 0


def _done_events(*logs: Path) -> Counter[str]:
    """How many times each job was recorded as finished, across every instance's log."""
    found: Counter[str] = Counter()
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            if '"job_done"' in line and (m := re.search(r'"job": "([0-9a-f]{32})"', line)):
                found[m[1]] += 1
    return found


def test_two_instances_share_the_queue_survive_a_sigkill_and_a_database_restart(
        pg_server: pgkit.PostgresServer, slow_registry: Registry, tmp_path: Path) -> None:  # noqa: F811
    url = fresh_pg_url(pg_server)
    env = {"VOXSWAP_JOBS_URL": url, "VOXSWAP_JOB_POLL_S": "0.05", "VOXSWAP_SEGMENT_WINDOW_S": "5",
           "VOXSWAP_SEGMENT_BATCH_SIZE": "1", "VOXSWAP_SHUTDOWN_DELAY_S": "0", "VOXSWAP_LOG_FORMAT": "json",
           "VOXSWAP_WEBHOOK_SECRET": "s" * 32, "VOXSWAP_WEBHOOK_ALLOW_NETWORKS": "127.0.0.1/32",
           "VOXSWAP_WEBHOOK_BACKOFF_S": "0.05"}
    a = ServerProcess(slow_registry.root, tmp_path / "a-data", tmp_path / "a.log", **env).start()
    b = ServerProcess(slow_registry.root, tmp_path / "b-data", tmp_path / "b.log", **env).start()
    hook = WebhookReceiver().__enter__()
    try:
        clip = synth.wav_bytes(synth.speech_like(10.0))  # two 5 s segments: a job is seen mid-way
        with httpx.Client(base_url=a.url, timeout=30) as ca, httpx.Client(base_url=b.url, timeout=30) as cb:
            ids = [j["id"] for j in submit(ca, [(f"{n:02}.wav", clip) for n in range(30)], webhook_url=hook.url)]
            assert b.proc is not None and a.proc is not None
            wait_until(lambda: min(len(_done_events(tmp_path / n)) for n in ("a.log", "b.log")) >= 3,
                       timeout_s=60, message="both instances to finish jobs submitted to A")
            wait_until(lambda: _running_for(url, a.proc.pid) > 0, timeout_s=60,  # type: ignore[union-attr]
                       interval_s=0.01, message="instance A to be mid-job")
            a.kill()
            wait_until(lambda: sum(cb.get(f"/api/jobs/{i}").json()["status"] == "completed" for i in ids) >= 20,
                       timeout_s=120, message="B to get on with the queue")
            pg_server.restart()  # every session ends: B's claims, its owner lock, its pool
            jobs = wait_for_jobs(cb, ids, timeout_s=180)
            assert [j["status"] for j in jobs] == ["completed"] * 30
            for job in jobs:
                text = cb.get(f"/api/jobs/{job['id']}/result", params={"format": "txt"}).text
                assert text == " ".join([TEXT_A] * 2) + "\n"
            assert cb.get("/api/jobs").json()["total"] == 30
            assert max(j["attempts"] for j in jobs) >= 2  # A's interrupted job ran again, on B
            done = _done_events(tmp_path / "a.log", tmp_path / "b.log")
            assert set(done) == set(ids) and set(done.values()) == {1}, done  # each completed once
            # every webhook delivered (at least once), each under its job's stable Idempotency-Key
            wait_until(lambda: all(cb.get(f"/api/jobs/{i}").json()["webhook"]["status"] == "delivered" for i in ids),
                       timeout_s=60, message="every webhook to be delivered")
            keys = {r.headers["Idempotency-Key"]: r.json()["job"]["id"] for r in list(hook.received)}
            assert keys == {f"{i}:job.completed": i for i in ids}
            metrics = cb.get("/metrics").text
            assert 'voxswap_jobs_pending{queue="postgresql://' in metrics and "voxswap_jobs_claimed" in metrics
            status = cb.get("/api/system/status")
            assert status.json()["jobs"]["store"].startswith(f"postgresql://{pgkit.USER}:***@127.0.0.1:")
            assert pgkit.PASSWORD not in status.text
            wait_until(lambda: cb.get("/api/system/status").json()["jobs"]["pending"] == 0, timeout_s=10,
                       message="the status to count the queue")
            # a restarted A answers for jobs B ran
            a2 = ServerProcess(slow_registry.root, tmp_path / "a-data", tmp_path / "a2.log", **env).start()
            try:
                with httpx.Client(base_url=a2.url, timeout=30) as ca2:
                    assert ca2.get(f"/api/jobs/{ids[-1]}").json()["status"] == "completed"
                    assert ca2.get(f"/api/jobs/{ids[-1]}/result").json()["text"] == " ".join([TEXT_A] * 2)
                    assert pgkit.PASSWORD not in ca2.get("/metrics").text
            finally:
                a2.stop()
    finally:
        a.kill()
        b.stop()
        hook.__exit__(None, None, None)
    for log in tmp_path.glob("*.log"):
        assert pgkit.PASSWORD not in log.read_text(errors="replace"), log


def test_the_password_never_shows_in_errors(pg_server: pgkit.PostgresServer, tmp_path: Path,  # noqa: F811
                                            caplog: pytest.LogCaptureFixture) -> None:
    wrong = pg_server.url("postgres", password="wrong-" + pgkit.PASSWORD)
    store = PgJobStore(wrong, spool_dir=tmp_path / "spool", retry_s=0.3)
    with pytest.raises(JobStoreUnavailable) as err:
        store.ensure()
    assert "wrong-" not in err.value.message and pgkit.PASSWORD not in err.value.message
    assert ":***@127.0.0.1" in err.value.message
    assert "password authentication failed" in caplog.text and pgkit.PASSWORD not in caplog.text
    assert pgkit.PASSWORD not in store.describe()


def test_jobs_migrate_moves_an_sqlite_queue_into_postgresql(pg_server: pgkit.PostgresServer,  # noqa: F811
                                                            tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import io

    from server.storage.job_store import JobStore
    from server.tools.cli import main
    from tests.test_job_store_contract import Result

    old = JobStore(tmp_path / "old").ensure()
    staged = [old.stage(f"{n}.wav", io.BytesIO(f"audio-{n}".encode()), ".wav", limit=1024) for n in range(4)]
    ids = [j.id for j in old.add(staged, language="en", use_itn=True, webhook_url=None, max_pending=10,
                                 owner_key="team-a")]
    done, broken, running = old.claim("old"), old.claim("old"), old.claim("old")
    assert done and broken and running
    old.complete(done, "old", Result(text="the transcript"))
    old.fail(broken, "old", "not audio")
    url = fresh_pg_url(pg_server)
    argv = ["jobs", "migrate", "--from", f"sqlite://{tmp_path / 'old'}", "--to", url]
    assert main(argv) == 0
    assert "copied 4 jobs (1 were running: now pending)" in capsys.readouterr().out
    assert main(argv) == 0 and "4 were already there" in capsys.readouterr().out

    new = PgJobStore(url, spool_dir=tmp_path / "spool").ensure()
    try:
        statuses = [j.status if j else None for j in (new.get(i, only_key="team-a") for i in ids)]
        assert statuses == ["completed", "failed", "pending", "pending"]
        first = new.get(ids[0])
        assert first is not None and new.read_result(first)["text"] == "the transcript"
        assert (first.language, first.use_itn, first.model_version) == ("en", True, "a")
        requeued = new.claim("new")  # the oldest pending: the one that was running, keeping its order
        assert requeued is not None and requeued.id == ids[2] and new.read_input(requeued) == b"audio-2"
        assert new.counts("new").pending == 1
    finally:
        new.close()


def test_instances_starting_together_migrate_the_schema_once(pg_server: pgkit.PostgresServer,  # noqa: F811
                                                             tmp_path: Path) -> None:
    import threading

    url = fresh_pg_url(pg_server)
    stores = [PgJobStore(url, spool_dir=tmp_path / f"spool{n}") for n in range(6)]
    errors: list[BaseException] = []
    gate = threading.Barrier(len(stores))

    def start(store: PgJobStore) -> None:
        gate.wait()
        try:
            store.ensure()
        except BaseException as exc:  # reported below, with the others
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert errors == []
        with psycopg.connect(url) as db:
            applied = db.execute("SELECT version FROM voxswap_schema_migrations ORDER BY version").fetchall()
            assert applied == [(version,) for version, _ in MIGRATIONS]
        assert all(s.pending() == 0 for s in stores)
    finally:
        for s in stores:
            s.close()
