"""Batch jobs cannot fill the disk (issue 18, finding E).

The probe's zip: 204 kB holding four deflated 50 MB WAVs of silence, which the server unpacked into
the data dir (200 MB per request); a job that failed kept its input for the whole 7-day retention;
and nothing bounded the data dir but 10,000 pending jobs. Zips are now judged from their directory
before a byte is unpacked, a failed job's input goes at once, and the data dir has a budget (507).
"""

from __future__ import annotations

import io
import wave
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.testing import synth
from tests.jobs_helpers import submit, wait_for_jobs, zip_of

BOMB_MEMBER_BYTES = 50_000_000


def _zip_bomb(members: int = 4, nbytes: int = BOMB_MEMBER_BYTES) -> bytes:
    """``members`` WAVs of ``nbytes`` of digital silence each, deflated, written in 1 MB chunks."""
    buf = io.BytesIO()
    chunk = bytes(1 << 20)
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for n in range(members):
            with zf.open(f"meeting-{n}.wav", "w") as member, wave.open(member, "wb") as wav:
                wav.setnchannels(1)
                wav.setsampwidth(2)
                wav.setframerate(16_000)
                wav.setnframes(nbytes // 2)  # the header is right from the start: no seek back
                left = nbytes
                while left:
                    wav.writeframesraw(chunk[:min(left, len(chunk))])
                    left -= min(left, len(chunk))
    return buf.getvalue()


def _files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.fixture(scope="module")
def clip() -> bytes:
    return synth.wav_bytes(synth.speech_like(1.5, seed=2))


def test_the_zip_bomb_is_refused_before_anything_is_unpacked(jobs_client: TestClient, data_dir: Path) -> None:
    bomb = _zip_bomb()
    assert len(bomb) < 300_000  # the probe's was 204 kB, each member within max_upload_bytes
    r = jobs_client.post("/api/jobs", files=[("files", ("meetings.zip", bomb))], headers={"X-Request-Id": "bomb-1"})
    assert r.status_code == 413, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"], error["request_id"]) == ("payload_too_large", "files", "bomb-1")
    assert "'meetings.zip' unpacks to 200000176 bytes" in error["message"]
    assert "at most 20:1" in error["message"]
    assert _files_under(data_dir) == []  # not a byte of it, not even the queue's database
    assert jobs_client.get("/api/jobs").json()["total"] == 0


def test_zips_are_held_to_limits_on_entries_and_unpacked_bytes_per_submission(
        jobs_app: Callable[..., TestClient], data_dir: Path, clip: bytes) -> None:
    with jobs_app(zip_max_entries=10, zip_max_unpacked_bytes=4 * len(clip)) as c:
        many = zip_of({f"{n}.wav": clip for n in range(11)})
        r = c.post("/api/jobs", files=[("files", ("many.zip", many))])
        assert r.status_code == 413 and "'many.zip' holds 11 entries" in r.json()["error"]["message"]
        # two zips of 3 recordings: each fits, together they unpack past the submission's bytes
        three = zip_of({f"{n}.wav": clip for n in range(3)})
        r = c.post("/api/jobs", files=[("files", ("a.zip", three)), ("files", ("b.zip", three))])
        assert r.status_code == 413, r.text
        assert f"the zips of this submission unpack to {6 * len(clip)} bytes" in r.json()["error"]["message"]
        assert _files_under(data_dir / "jobs") == []
        assert [j["filename"] for j in submit(c, [("a.zip", three)])] == ["0.wav", "1.wav", "2.wav"]


def test_a_zip_whose_end_record_claims_a_huge_directory_is_refused_unread(jobs_client: TestClient) -> None:
    """The directory is what ``zipfile`` turns into an object per entry (400,000 empty entries in
    37 MB of upload cost it 213 MB): its size is read from the end record and refused first."""
    honest = bytearray(zip_of({"a.wav": synth.wav_bytes(synth.speech_like(0.5))}))
    end = honest.rfind(b"PK\x05\x06")
    honest[end + 12:end + 16] = (50_000_000).to_bytes(4, "little")  # the directory's stated size
    r = jobs_client.post("/api/jobs", files=[("files", ("huge.zip", bytes(honest)))])
    assert r.status_code == 413 and "has a directory of 50000000 bytes" in r.json()["error"]["message"]


def test_a_failed_jobs_input_is_deleted_at_once(jobs_client: TestClient, data_dir: Path) -> None:
    [job] = submit(jobs_client, [("notes.wav", b"these are meeting notes, not a recording" * 1000)])
    assert _files_under(data_dir / "jobs" / job["id"]) == [data_dir / "jobs" / job["id"] / "input.wav"]
    [done] = wait_for_jobs(jobs_client, [job["id"]])
    assert done["status"] == "failed" and "not audio" in done["error"]
    assert _files_under(data_dir / "jobs" / job["id"]) == []  # not kept for the 7-day retention
    assert jobs_client.get(f"/api/jobs/{job['id']}").json()["error"] == done["error"]  # the row stays


def test_a_submission_past_the_disk_budget_is_507_and_deleting_jobs_frees_it(
        jobs_app: Callable[..., TestClient], data_dir: Path, clip: bytes) -> None:
    with jobs_app(job_workers=0, data_dir_budget_bytes=3 * len(clip)) as c:  # nothing runs: jobs stay
        first = submit(c, [("0.wav", clip), ("1.wav", clip)])
        on_disk = _files_under(data_dir / "jobs")
        r = c.post("/api/jobs", files=[("files", ("2.wav", clip)), ("files", ("3.zip", zip_of({"3.wav": clip})))],
                   headers={"X-Request-Id": "full-1"})
        assert r.status_code == 507, r.text
        error = r.json()["error"]
        assert (error["code"], error["type"], error["request_id"]) == ("insufficient_storage", "server_error", "full-1")
        assert "storage for jobs is full" in error["message"] and str(2 * len(clip)) in error["message"]
        assert _files_under(data_dir / "jobs") == on_disk  # refused before a byte was written
        assert c.get("/api/jobs").json()["total"] == 2
        # a cancelled job still holds its audio; deleting it gives the bytes back
        assert c.delete(f"/api/jobs/{first[0]['id']}").json()["action"] == "cancelled"
        assert c.post("/api/jobs", files=[("files", ("2.wav", clip)), ("files", ("3.wav", clip))]).status_code == 507
        assert c.delete(f"/api/jobs/{first[0]['id']}").json()["action"] == "deleted"
        assert [j["filename"] for j in submit(c, [("2.wav", clip)])] == ["2.wav"]  # 2 of 3 clips' worth
        assert c.post("/api/jobs", files=[("files", ("3.wav", clip)), ("files", ("4.wav", clip))]).status_code == 507


def test_failed_and_deleted_jobs_give_their_bytes_back(jobs_app: Callable[..., TestClient], clip: bytes) -> None:
    broken = b"not a recording" * (len(clip) // 15)
    with jobs_app(data_dir_budget_bytes=2 * len(clip)) as c:
        jobs = submit(c, [("0.wav", broken), ("1.wav", broken)])
        assert {j["status"] for j in wait_for_jobs(c, [j["id"] for j in jobs])} == {"failed"}
        done = submit(c, [("2.wav", clip), ("3.wav", clip)])  # the failed inputs no longer count
        assert {j["status"] for j in wait_for_jobs(c, [j["id"] for j in done])} == {"completed"}
        # inputs and results fill the budget now, until the finished jobs are deleted
        assert c.post("/api/jobs", files=[("files", ("4.wav", clip))]).status_code == 507
        for job in done:
            assert c.delete(f"/api/jobs/{job['id']}").json()["action"] == "deleted"
        assert len(submit(c, [("4.wav", clip), ("5.wav", clip)])) == 2
