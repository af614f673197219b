"""Batch jobs as a team with a folder of meetings uses them: submit, follow, fetch, cancel, restart."""

from __future__ import annotations

import io
import re
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.storage.job_records import NewJob
from server.storage.job_store import JobStore
from server.storage.registry import Registry
from server.testing import synth
from testkit.harness import wait_until
from tests.conftest import AUTH, TEXT_A, TEXT_B
from tests.jobs_helpers import WebhookReceiver, server_process, submit, wait_for_jobs, zip_of

SLOW_MS = 40.0  # CPU ms per audio second for the "slow" test models


@pytest.fixture(scope="module")
def clip() -> bytes:
    return synth.wav_bytes(synth.speech_like(1.5, seed=2))


@pytest.fixture
def slow_registry(tmp_path: Path, model_dir: Callable[..., Path]) -> Registry:
    """Versions ``a`` (current) and ``b`` whose inference costs SLOW_MS per audio second."""
    reg = Registry(tmp_path / "slow-registry").ensure()
    reg.add(model_dir(TEXT_A, compute_ms=SLOW_MS), "a")
    reg.add(model_dir(TEXT_B, compute_ms=SLOW_MS), "b")
    reg.promote("a")
    return reg



def _segment_by_segment(make_settings: Callable[..., Any], registry: Registry, data_dir: Path) -> Any:
    """5 s segments one at a time on the slow model: a long job stays running long enough to act on."""
    return make_settings(registry=registry.root, data_dir=data_dir, job_poll_s=0.05,
                         segment_window_s=5.0, segment_batch_size=1)


def _start_long_job(client: TestClient, name: str, seconds: float) -> dict[str, Any]:
    [job] = submit(client, [(name, synth.wav_bytes(synth.speech_like(seconds)))])
    wait_until(lambda: client.get(f"/api/jobs/{job['id']}").json()["progress"] > 0, timeout_s=60,
               message=f"{name} to make progress")
    return job

def test_files_and_a_zip_become_jobs_that_complete_with_text_and_version(jobs_client: TestClient,
                                                                        clip: bytes) -> None:
    archive = zip_of({"day1/standup.wav": clip, "day1/retro.flac": synth.wav_bytes(synth.speech_like(2.0)),
                      "day1/notes.txt": b"agenda", "__MACOSX/day1/._standup.wav": b"junk"})
    r = jobs_client.post("/api/jobs", files=[("files", ("one.wav", clip)), ("files", ("two.wav", clip)),
                                             ("files", ("meetings.zip", archive))])
    assert r.status_code == 202, r.text
    body = r.json()
    assert [j["filename"] for j in body["jobs"]] == ["one.wav", "two.wav", "day1/standup.wav", "day1/retro.flac"]
    assert {j["status"] for j in body["jobs"]} <= {"pending", "running"}
    assert sorted(body["skipped"]) == ["__MACOSX/day1/._standup.wav", "day1/notes.txt"]
    jobs = wait_for_jobs(jobs_client, [j["id"] for j in body["jobs"]])
    for job in jobs:
        assert (job["status"], job["model_version"], job["progress"], job["attempts"]) == ("completed", "a", 1, 1)
        assert job["error"] is None and job["processing_ms"] > 0
        assert job["timings"]["queued_s"] >= 0 and job["timings"]["running_s"] >= 0
        result = jobs_client.get(f"/api/jobs/{job['id']}/result").json()
        assert result["text"] == TEXT_A and result["model_version"] == "a"
    assert [j["duration_s"] for j in jobs] == [1.5, 1.5, 1.5, 2.0]
    metrics = jobs_client.get("/metrics").text
    assert 'voxswap_jobs_finished_total{outcome="completed"} 4.0' in metrics
    assert 'voxswap_jobs_finished_total{outcome="failed"} 0.0' in metrics


def test_nothing_is_written_to_the_data_dir_until_a_job_is_submitted(jobs_client: TestClient,
                                                                     data_dir: Path) -> None:
    assert jobs_client.get("/api/jobs").json() == {"jobs": [], "total": 0, "limit": 50, "offset": 0}
    assert jobs_client.get("/api/jobs/0123456789abcdef0123456789abcdef").status_code == 404
    assert jobs_client.delete("/api/jobs/0123456789abcdef0123456789abcdef").status_code == 404
    assert not data_dir.exists()


def test_results_in_every_format(jobs_app: Callable[..., TestClient]) -> None:
    long_clip = synth.wav_bytes(synth.islands([("speech", 4), ("silence", 1), ("speech", 4)]))
    with jobs_app(segment_window_s=5.0) as c:
        [job] = submit(c, [("board meeting.wav", long_clip)])
        wait_for_jobs(c, [job["id"]])
        url = f"/api/jobs/{job['id']}/result"
        for fmt in ("txt", "text"):
            r = c.get(url, params={"format": fmt})
            assert r.text == f"{TEXT_A} {TEXT_A}\n" and r.headers["content-type"].startswith("text/plain")
        assert r.headers["content-disposition"] == 'inline; filename="board_meeting.txt"'
        assert r.headers["x-model-version"] == "a"
        data = c.get(url, params={"format": "json"}).json()
        assert data["filename"] == "board meeting.wav" and data["job_id"] == job["id"]
        assert [s["text"] for s in data["segments"]] == [TEXT_A, TEXT_A]
        assert 4.0 <= data["segments"][0]["end"] <= data["segments"][1]["start"] <= 5.0  # cut in the pause
        srt = c.get(url, params={"format": "srt"}).text
        assert srt.startswith("1\n00:00:00,000 --> 00:00:04,") and "\n\n2\n00:00:0" in srt
        vtt = c.get(url, params={"format": "vtt"}).text
        assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> ") and vtt.count(TEXT_A) == 2
        assert c.get(url, params={"format": "docx"}).status_code == 400


def test_language_and_itn_apply_to_the_job(jobs_client: TestClient, clip: bytes) -> None:
    [job] = submit(jobs_client, [("a.wav", clip)], language="ja", use_itn="true")
    [done] = wait_for_jobs(jobs_client, [job["id"]])
    assert (done["language"], done["use_itn"]) == ("ja", True)
    result = jobs_client.get(f"/api/jobs/{job['id']}/result").json()
    assert result["text"] == "Model a says hello." and result["language"] == "ja"


def test_pagination_filter_cancel_and_delete(jobs_app: Callable[..., TestClient], clip: bytes,
                                             data_dir: Path) -> None:
    with jobs_app(job_workers=0) as c:  # a process that only accepts jobs: they stay pending
        ids = [j["id"] for j in submit(c, [(f"{n}.wav", clip) for n in range(5)])]
        page = c.get("/api/jobs", params={"limit": 2}).json()
        assert (page["total"], page["limit"], page["offset"]) == (5, 2, 0)
        assert [j["filename"] for j in page["jobs"]] == ["4.wav", "3.wav"]  # newest first
        assert [j["filename"] for j in c.get("/api/jobs", params={"limit": 2, "offset": 4}).json()["jobs"]] == ["0.wav"]

        r = c.delete(f"/api/jobs/{ids[0]}")
        assert r.json() == {"id": ids[0], "action": "cancelled", "status": "cancelled"}
        assert c.get("/api/jobs", params={"status": "pending"}).json()["total"] == 4
        [cancelled] = c.get("/api/jobs", params={"status": "cancelled"}).json()["jobs"]
        assert cancelled["id"] == ids[0] and cancelled["finished_at"] is not None
        r = c.get(f"/api/jobs/{ids[0]}/result")
        assert r.status_code == 409 and r.json()["error"]["code"] == "job_not_finished"
        assert c.get("/api/jobs", params={"status": "bogus"}).status_code == 400

        assert (data_dir / "jobs" / ids[0]).is_dir()
        r = c.delete(f"/api/jobs/{ids[0]}")  # a finished job: deleted with its files
        assert r.json() == {"id": ids[0], "action": "deleted", "status": "deleted"}
        assert c.get(f"/api/jobs/{ids[0]}").status_code == 404
        assert not (data_dir / "jobs" / ids[0]).exists()
        assert c.get("/api/jobs").json()["total"] == 4
        pending = re.compile(r'voxswap_jobs_pending\{queue="[^"]+"\} 4.0')
        wait_until(lambda: pending.search(c.get("/metrics").text), timeout_s=10,
                   message="the heartbeat to count the pending jobs")
        # cancelling is an outcome; deleting a finished job is not another one
        assert 'voxswap_jobs_finished_total{outcome="cancelled"} 1.0' in c.get("/metrics").text


def test_pending_jobs_left_by_an_accepting_process_are_run_by_a_worker(jobs_app: Callable[..., TestClient],
                                                                      clip: bytes) -> None:
    with jobs_app(job_workers=0) as c:
        ids = [j["id"] for j in submit(c, [("x.wav", clip), ("y.wav", clip)])]
    with jobs_app() as c:
        assert {j["status"] for j in wait_for_jobs(c, ids)} == {"completed"}


def test_bad_submissions_get_a_4xx_with_a_reason(jobs_client: TestClient, clip: bytes) -> None:
    def error(r: httpx.Response, status: int) -> dict[str, Any]:
        assert r.status_code == status, r.text
        err: dict[str, Any] = r.json()["error"]
        return err

    assert error(jobs_client.post("/api/jobs", data={"language": "en"}), 400)["param"] == "files"
    assert error(jobs_client.post("/api/jobs", files=[("files", ("e.wav", b""))]), 400)["code"] == "empty_audio"
    err = error(jobs_client.post("/api/jobs", files=[("files", ("n.zip", zip_of({"a.txt": b"x"})))]), 400)
    assert "no audio" in err["message"] and "a.txt" in err["message"]
    err = error(jobs_client.post("/api/jobs", files=[("files", ("broken.zip", b"PK\x03\x04 not really"))]), 400)
    assert "zip" in err["message"]
    err = error(jobs_client.post("/api/jobs", files=[("files", ("corrupt.zip", _corrupt_deflate_zip(clip)))]), 400)
    assert "corrupt.zip" in err["message"]
    for hook in ("file:///etc/passwd", "http://127.0.0.1:99999/hook", "http://[::1/hook"):
        err = error(jobs_client.post("/api/jobs", files=[("files", ("a.wav", clip))], data={"webhook_url": hook}), 400)
        assert err["param"] == "webhook_url", hook
    assert error(jobs_client.get("/api/jobs", params={"offset": 10**20}), 400)["param"] == "offset"
    assert error(jobs_client.post("/api/jobs", files=[("files", ("a.wav", clip))], data={"language": "xx"}),
                 400)["param"] == "language"
    assert error(jobs_client.get("/api/jobs/0123456789abcdef0123456789abcdef"), 404)["code"] == "not_found"
    assert error(jobs_client.get("/api/jobs/../../etc"), 404)
    assert error(jobs_client.delete("/api/jobs/not-an-id"), 404)["code"] == "not_found"
    assert jobs_client.get("/api/jobs").json()["total"] == 0  # nothing half-submitted was kept


def _corrupt_deflate_zip(clip: bytes) -> bytes:
    """A zip whose directory is fine but whose compressed data is garbage (a damaged download)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a.wav", clip)
    data = bytearray(buf.getvalue())
    for i in range(40, 80):  # inside the first member's deflate stream, after its 35-byte header
        data[i] ^= 0xFF
    return bytes(data)


def test_a_result_named_in_chinese_downloads_with_its_name(jobs_client: TestClient, clip: bytes) -> None:
    [job] = submit(jobs_client, [("会议录音 1.wav", clip)])
    wait_for_jobs(jobs_client, [job["id"]])
    r = jobs_client.get(f"/api/jobs/{job['id']}/result", params={"format": "srt"})
    assert r.status_code == 200 and TEXT_A in r.text
    assert r.headers["content-disposition"] == (
        "inline; filename=\"1.srt\"; filename*=UTF-8''%E4%BC%9A%E8%AE%AE%E5%BD%95%E9%9F%B3%201.srt")


def test_a_file_that_is_not_audio_fails_with_the_reason(jobs_client: TestClient) -> None:
    [job] = submit(jobs_client, [("notes.wav", b"these are meeting notes, not a recording" * 10)])
    [done] = wait_for_jobs(jobs_client, [job["id"]])
    assert done["status"] == "failed" and "not audio" in done["error"]
    assert done["model_version"] is None
    r = jobs_client.get(f"/api/jobs/{job['id']}/result")
    assert r.status_code == 409 and "not audio" in r.json()["error"]["message"]


def test_a_running_job_can_be_cancelled_and_the_worker_moves_on(make_settings: Callable[..., Any],
                                                                slow_registry: Registry, data_dir: Path,
                                                                clip: bytes) -> None:
    settings = _segment_by_segment(make_settings, slow_registry, data_dir)
    with TestClient(create_app(settings)) as c:
        long_job = _start_long_job(c, "long.wav", 60.0)
        assert c.delete(f"/api/jobs/{long_job['id']}").json()["status"] == "cancelled"
        [short_job] = submit(c, [("short.wav", clip)])
        [done] = wait_for_jobs(c, [short_job["id"]])
        assert done["status"] == "completed"
        cancelled = c.get(f"/api/jobs/{long_job['id']}").json()
        assert cancelled["status"] == "cancelled" and cancelled["progress"] < 1
        assert not (data_dir / "jobs" / long_job["id"] / "result.json").exists()


def test_jobs_yield_to_interactive_requests(make_settings: Callable[..., Any], slow_registry: Registry,
                                            data_dir: Path, clip: bytes) -> None:
    settings = _segment_by_segment(make_settings, slow_registry, data_dir)
    with TestClient(create_app(settings)) as c:
        job = _start_long_job(c, "long.wav", 30.0)
        # an interactive request waits for one 5 s segment at most, not for the whole file
        r = c.post("/api/transcribe", files={"file": ("now.wav", clip)})
        assert r.status_code == 200 and r.json()["text"] == TEXT_A
        assert c.get(f"/api/jobs/{job['id']}").json()["status"] == "running"
        assert wait_for_jobs(c, [job["id"]])[0]["status"] == "completed"


def test_a_swap_does_not_wait_for_a_running_job_which_then_records_the_version_that_served_it(
        make_settings: Callable[..., Any], slow_registry: Registry, data_dir: Path) -> None:
    settings = _segment_by_segment(make_settings, slow_registry, data_dir)
    with TestClient(create_app(settings)) as c:
        job = _start_long_job(c, "meeting.wav", 30.0)
        r = c.post("/admin/model/update", json={"version": "b"}, headers=AUTH)
        assert r.status_code == 200, r.text
        assert r.json()["drained"] is True  # the job held a only for the segment it was on
        [done] = wait_for_jobs(c, [job["id"]])
        assert done["status"] == "completed"
        texts = {"a": TEXT_A, "b": TEXT_B}
        result = c.get(f"/api/jobs/{job['id']}/result").json()
        # all six segments by the recorded version: it started over on b rather than mix versions
        assert done["model_version"] == result["model_version"] == "b"
        assert [s["text"] for s in result["segments"]] == [texts[done["model_version"]]] * 6


def test_jobs_survive_a_sigkill_of_the_server_and_run_exactly_once(slow_registry: Registry, tmp_path: Path,
                                                                  data_dir: Path) -> None:
    env = {"VOXSWAP_JOB_POLL_S": "0.05", "VOXSWAP_SEGMENT_WINDOW_S": "5", "VOXSWAP_SEGMENT_BATCH_SIZE": "1",
           "VOXSWAP_SHUTDOWN_DELAY_S": "0"}
    clip20 = synth.wav_bytes(synth.speech_like(20.0))  # four 5 s segments: progress shows mid-job
    with server_process(slow_registry.root, data_dir, tmp_path / "server.log", **env) as server, \
            httpx.Client(base_url=server.url, timeout=30) as c:
        ids = [j["id"] for j in submit(c, [("first.wav", clip20), ("second.wav", clip20),
                                           ("third.wav", clip20)])]
        wait_until(lambda: c.get(f"/api/jobs/{ids[0]}").json()["progress"] > 0, timeout_s=60,
                   message="the first job to be part done")
        server.kill()
    with server_process(slow_registry.root, data_dir, tmp_path / "server.log", **env) as server, \
            httpx.Client(base_url=server.url, timeout=30) as c:
        jobs = wait_for_jobs(c, ids, timeout_s=90)
        assert [j["status"] for j in jobs] == ["completed"] * 3
        assert [j["attempts"] for j in jobs] == [2, 1, 1]  # only the interrupted one ran again
        for job in jobs:
            text = c.get(f"/api/jobs/{job['id']}/result", params={"format": "txt"}).text
            assert text == " ".join([TEXT_A] * 4) + "\n"
        assert c.get("/api/jobs").json()["total"] == 3


def test_two_processes_sharing_a_data_dir_never_run_a_job_twice(jobs_app: Callable[..., TestClient],
                                                                clip: bytes) -> None:
    with jobs_app() as one, jobs_app() as two:
        ids = [j["id"] for j in submit(one, [(f"{n}.wav", clip) for n in range(6)])]
        ids += [j["id"] for j in submit(two, [(f"{n}.wav", clip) for n in range(6, 12)])]
        jobs = wait_for_jobs(one, ids)
        assert {j["status"] for j in jobs} == {"completed"}
        assert {j["attempts"] for j in jobs} == {1}
        runners = [c.app.state.ctx.jobs for c in (one, two)]  # type: ignore[attr-defined]
        assert sum(r.jobs_run for r in runners) == 12


def test_a_claim_is_atomic_under_contention(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "data").ensure()
    staged = [NewJob(f"{n:032x}", f"{n}.wav", "input.wav", 1) for n in range(60)]
    store.add(staged, language="auto", use_itn=False, webhook_url=None, max_pending=1000)
    claimed: list[str] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        while (job := store.claim(f"owner-{n}")) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(claimed) == sorted(s.id for s in staged)  # each exactly once


def test_the_webhook_is_delivered_and_retried_after_a_500(jobs_client: TestClient, clip: bytes) -> None:
    with WebhookReceiver(statuses=[500, 200]) as hook:
        [job] = submit(jobs_client, [("call.wav", clip)], webhook_url=hook.url)
        wait_until(lambda: jobs_client.get(f"/api/jobs/{job['id']}").json()["webhook"]["status"] == "delivered",
                   timeout_s=30, message="the webhook to be delivered")
        assert hook.count() == 2  # the first answer was 500: tried again
        first, second = (got.json() for got in hook.received)
        assert first == second
        assert second["event"] == "job.completed" and second["text"] == TEXT_A
        assert second["job"]["id"] == job["id"] and second["job"]["status"] == "completed"
        assert second["job"]["model_version"] == "a"
        assert hook.received[1].headers["X-Voxswap-Job"] == job["id"]
        webhook = jobs_client.get(f"/api/jobs/{job['id']}").json()["webhook"]
        assert webhook == {"url": hook.url, "status": "delivered", "attempts": 2, "error": None}
        assert 'voxswap_job_webhooks_total{outcome="delivered"} 1.0' in jobs_client.get("/metrics").text


def test_a_webhook_that_never_succeeds_is_given_up_and_recorded(jobs_app: Callable[..., TestClient],
                                                                clip: bytes) -> None:
    with WebhookReceiver(statuses=[503]) as hook, jobs_app(webhook_attempts=3) as c:
        [job] = submit(c, [("call.wav", clip)], webhook_url=hook.url)
        wait_until(lambda: c.get(f"/api/jobs/{job['id']}").json()["webhook"]["status"] == "failed",
                   timeout_s=30, message="the webhook to be given up")
        assert hook.count() == 3
        assert c.get(f"/api/jobs/{job['id']}").json()["webhook"]["error"] == "HTTP 503"


def test_a_full_queue_and_oversized_zips_are_refused(jobs_app: Callable[..., TestClient], clip: bytes) -> None:
    with jobs_app(job_workers=0, max_pending_jobs=2, max_upload_bytes=256 * 1024) as c:
        r = c.post("/api/jobs", files=[("files", (f"{n}.wav", clip)) for n in range(3)])
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded" and r.headers["retry-after"]
        submit(c, [("0.wav", clip), ("1.wav", clip)])
        r = c.post("/api/jobs", files=[("files", ("2.wav", clip))])
        assert r.status_code == 503
        # a 4 MB member squeezed into a few kB: refused while unpacking, not written out
        bomb = zip_of({"silence.wav": synth.wav_bytes(synth.silence(130.0))})
        assert len(bomb) < 256 * 1024
        r = c.post("/api/jobs", files=[("files", ("bomb.zip", bomb))])
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
        assert c.get("/api/jobs").json()["total"] == 2


def test_a_graceful_stop_puts_a_running_job_back_without_counting_it(make_settings: Callable[..., Any],
                                                                     slow_registry: Registry,
                                                                     data_dir: Path) -> None:
    settings = _segment_by_segment(make_settings, slow_registry, data_dir)
    with TestClient(create_app(settings)) as c:
        job = _start_long_job(c, "long.wav", 60.0)
    stored = JobStore(data_dir).ensure().get(job["id"])
    assert stored is not None and (stored.status, stored.attempts, stored.owner) == ("pending", 0, None)
    assert not list((data_dir / "owners").iterdir())  # the stopped process let go of its lock


def test_a_job_whose_process_keeps_dying_is_failed_not_retried_forever(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "data").ensure()
    store.add([NewJob("f" * 32, "poison.wav", "input.wav", 1)], language="auto", use_itn=False,
              webhook_url=None, max_pending=10)
    for attempt in range(1, 4):  # three processes each die while running it (no lock file left)
        job = store.claim(f"crashed-{attempt}")
        assert job is not None and job.attempts == attempt
        requeued, _ = store.recover("survivor", max_attempts=3)
        assert requeued == (1 if attempt < 3 else 0)
    job = store.get("f" * 32)
    assert job is not None and job.status == "failed" and "3 times" in (job.error or "")


def test_finished_jobs_are_deleted_after_their_retention(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "data").ensure()
    staged = store.stage("old.wav", io.BytesIO(b"RIFF"), ".wav", limit=1024)
    store.add([staged], language="auto", use_itn=False, webhook_url=None, max_pending=10)
    assert store.cancel_or_delete(staged.id)[0] == "cancelled"
    assert store.sweep(retention_s=3600) == 0 and store.get(staged.id) is not None
    assert store.sweep(retention_s=1e-9) == 1
    assert store.get(staged.id) is None and not store.job_dir(staged.id).exists()
