"""``voxswap transcribe`` run as a user runs it: a subprocess talking to a real server on a socket."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.app import create_app
from server.storage.catalog import ModelCatalog
from server.storage.registry import Registry
from server.testing import synth
from testkit.harness import serve_in_thread
from tests.conftest import TEXT_A
from tests.jobs_helpers import VOXSWAP, free_port


@pytest.fixture
def server_url(make_settings: Callable[..., Any], tmp_path: Path) -> Iterator[str]:
    settings = make_settings(data_dir=tmp_path / "data", job_poll_s=0.05, segment_window_s=5.0)
    with serve_in_thread(create_app(settings)) as url:
        yield url


def voxswap(*args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VOXSWAP), *map(str, args)], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def recordings(tmp_path: Path) -> Path:
    """A folder as a team has it: recordings in sub-folders, notes beside them, two with one name."""
    root = tmp_path / "recordings"
    (root / "monday").mkdir(parents=True)
    (root / "tuesday").mkdir()
    (root / "monday" / "standup.wav").write_bytes(synth.wav_bytes(synth.speech_like(1.5, seed=1)))
    (root / "tuesday" / "standup.wav").write_bytes(synth.wav_bytes(synth.speech_like(1.5, seed=2)))
    (root / "tuesday" / "review.wav").write_bytes(
        synth.wav_bytes(synth.islands([("speech", 4), ("silence", 1), ("speech", 4)])))
    (root / "monday" / "notes.txt").write_text("agenda")
    return root


def test_one_file_prints_its_text(server_url: str, recordings: Path) -> None:
    done = voxswap("transcribe", recordings / "monday" / "standup.wav", "--server", server_url)
    assert (done.returncode, done.stdout) == (0, TEXT_A + "\n"), done.stderr


def test_one_file_in_each_format(server_url: str, recordings: Path) -> None:
    review = recordings / "tuesday" / "review.wav"
    srt = voxswap("transcribe", review, "--server", server_url, "--format", "srt").stdout
    assert srt.startswith("1\n00:00:00,000 --> 00:00:04,") and srt.count(TEXT_A) == 2
    vtt = voxswap("transcribe", review, "--server", server_url, "--format", "vtt").stdout
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> ")
    data = json.loads(voxswap("transcribe", review, "--server", server_url, "--format", "json",
                              "--language", "ko", "--use-itn").stdout)
    assert data["text"] == "Model a says hello. Model a says hello." and data["language"] == "ko"
    assert len(data["segments"]) == 2 and data["model_version"] == "a"


def test_one_file_with_out_is_written_there(server_url: str, recordings: Path, tmp_path: Path) -> None:
    done = voxswap("transcribe", recordings / "monday" / "standup.wav", "--server", server_url,
                   "--out", tmp_path / "out", "--format", "vtt")
    assert done.returncode == 0 and done.stdout == ""
    assert (tmp_path / "out" / "standup.vtt").read_text().endswith(TEXT_A + "\n")


def test_a_folder_becomes_batch_jobs_with_one_result_file_each(server_url: str, recordings: Path,
                                                              tmp_path: Path) -> None:
    out = tmp_path / "transcripts"
    done = voxswap("transcribe", recordings, "--server", server_url, "--out", out)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["review.txt", "standup-2.txt", "standup.txt"]
    assert (out / "standup.txt").read_text() == TEXT_A + "\n"
    assert (out / "review.txt").read_text() == f"{TEXT_A} {TEXT_A}\n"
    assert "3/3 done" in done.stderr and "3 of 3 transcribed" in done.stderr
    assert done.stdout == ""
    jobs = httpx.get(f"{server_url}/api/jobs").json()
    assert jobs["total"] == 3 and {j["status"] for j in jobs["jobs"]} == {"completed"}
    assert sorted(j["filename"] for j in jobs["jobs"]) == ["review.wav", "standup.wav", "standup.wav"]


def test_result_names_never_collide(server_url: str, tmp_path: Path) -> None:
    folder = tmp_path / "calls"
    (folder / "x").mkdir(parents=True)
    for name, seed in (("a.wav", 1), ("x/a.wav", 2), ("a-2.wav", 3)):
        (folder / name).write_bytes(synth.wav_bytes(synth.speech_like(1.2, seed=seed)))
    out = tmp_path / "out"
    done = voxswap("transcribe", folder / "a.wav", folder / "x" / "a.wav", folder / "a-2.wav",
                   "--server", server_url, "--out", out, "--format", "json")
    assert done.returncode == 0, done.stderr
    written = {p.name: json.loads(p.read_text())["duration_s"] for p in out.iterdir()}
    assert sorted(written) == ["a-2-2.json", "a-2.json", "a.json"] and all(d == 1.2 for d in written.values())


def test_many_files_as_srt(server_url: str, recordings: Path, tmp_path: Path) -> None:
    out = tmp_path / "subtitles"
    done = voxswap("transcribe", recordings / "monday" / "standup.wav", recordings / "tuesday" / "review.wav",
                   "--server", server_url, "--out", out, "--format", "srt")
    assert done.returncode == 0, done.stderr
    assert (out / "standup.srt").read_text() == f"1\n00:00:00,000 --> 00:00:01,500\n{TEXT_A}\n"
    assert (out / "review.srt").read_text().count(" --> ") == 2


def test_a_file_that_fails_is_reported_and_the_others_are_written(server_url: str, recordings: Path,
                                                                  tmp_path: Path) -> None:
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"not audio at all " * 20)
    out = tmp_path / "out"
    done = voxswap("transcribe", recordings / "monday" / "standup.wav", bad, "--server", server_url,
                   "--out", out)
    assert done.returncode == 1
    assert "failed: " in done.stderr and "broken.wav" in done.stderr and "not audio" in done.stderr
    assert (out / "standup.txt").read_text() == TEXT_A + "\n" and not (out / "broken.txt").exists()


def test_mistakes_get_a_message_not_a_traceback(recordings: Path, tmp_path: Path, server_url: str) -> None:
    done = voxswap("transcribe", tmp_path / "missing.wav", "--server", server_url)
    assert done.returncode == 1 and "missing.wav: no such file" in done.stderr
    done = voxswap("transcribe", recordings, "--server", server_url)
    assert done.returncode == 2 and "--out" in done.stderr
    done = voxswap("transcribe", recordings / "monday" / "standup.wav", "--server",
                   f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 1 and "cannot reach the server" in done.stderr
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    done = voxswap("transcribe", empty, "--server", server_url)
    assert done.returncode == 1 and "empty_audio" in done.stderr
    archive = tmp_path / "meetings.zip"
    archive.write_bytes(b"PK\x03\x04")
    done = voxswap("transcribe", archive, "--server", server_url, "--out", tmp_path / "o")
    assert done.returncode == 1 and "unzip it" in done.stderr
    assert "Traceback" not in done.stderr


MEET_1 = "meeting model one speaks"


@pytest.fixture
def meeting_url(registry: Registry, model_dir: Callable[..., Path], make_settings: Callable[..., Any],
                tmp_path: Path) -> Iterator[str]:
    """A server with a named model ``meeting`` (``m1`` live) beside the default one."""
    meeting = ModelCatalog(registry.root).create("meeting", "sensevoice")
    meeting.add(model_dir(MEET_1), "m1")
    meeting.promote("m1")
    settings = make_settings(data_dir=tmp_path / "data", job_poll_s=0.05, segment_window_s=5.0)
    with serve_in_thread(create_app(settings)) as url:
        yield url


def test_model_picks_the_model_of_one_file_and_of_batch_jobs(meeting_url: str, recordings: Path,
                                                            tmp_path: Path) -> None:
    standup = recordings / "monday" / "standup.wav"
    done = voxswap("transcribe", standup, "--server", meeting_url, "--model", "meeting")
    assert (done.returncode, done.stdout) == (0, MEET_1 + "\n"), done.stderr
    data = json.loads(voxswap("transcribe", standup, "--server", meeting_url, "--model", "meeting@m1",
                              "--format", "json").stdout)
    assert (data["text"], data["model"], data["model_version"]) == (MEET_1, "meeting", "m1")
    out = tmp_path / "transcripts"
    done = voxswap("transcribe", recordings, "--server", meeting_url, "--out", out, "--model", "meeting")
    assert done.returncode == 0, done.stderr
    assert (out / "standup.txt").read_text() == (out / "standup-2.txt").read_text() == MEET_1 + "\n"
    assert (out / "review.txt").read_text() == f"{MEET_1} {MEET_1}\n"
    jobs = httpx.get(f"{meeting_url}/api/jobs").json()["jobs"]
    assert [(j["model"], j["model_version"]) for j in jobs] == [("meeting", "m1")] * 3
    assert voxswap("transcribe", standup, "--server", meeting_url).stdout == TEXT_A + "\n"  # no --model: default


def test_an_unknown_model_stops_the_command_before_any_job_is_made(meeting_url: str, recordings: Path,
                                                                    tmp_path: Path) -> None:
    done = voxswap("transcribe", recordings / "monday" / "standup.wav", "--server", meeting_url, "--model", "nope")
    assert done.returncode == 1 and "no model 'nope'" in done.stderr and "Traceback" not in done.stderr
    done = voxswap("transcribe", recordings, "--server", meeting_url, "--out", tmp_path / "o", "--model", "nope")
    assert done.returncode == 1 and "--model 'nope': HTTP 404: no model 'nope'" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert httpx.get(f"{meeting_url}/api/jobs").json()["total"] == 0
