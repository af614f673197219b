"""Every common audio format a user uploads decodes and transcribes; every bad upload is a clear 4xx.

Fixtures are made here with Debian's espeak-ng (real synthetic speech) and ffmpeg (each container
and codec), so the files are what recorders and browsers produce, not what our decoder likes.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import soundfile as sf
from fastapi.testclient import TestClient

from server.app import create_app
from server.testing import synth
from testkit.harness import serve_in_thread
from tests.conftest import TEXT_A

SPOKEN = "Hello, this is a test of the voxswap speech server, reading a short sentence aloud."
FFMPEG = shutil.which("ffmpeg")
ESPEAK = shutil.which("espeak-ng")
needs_tools = pytest.mark.skipif(not (FFMPEG and ESPEAK), reason="needs Debian's ffmpeg and espeak-ng "
                                 "(scripts/install-system-deps.sh)")

# name -> (ffmpeg output arguments, file name)
FORMATS: dict[str, tuple[list[str], str]] = {
    "wav-16bit-16k": (["-ar", "16000", "-c:a", "pcm_s16le"], "clip.wav"),
    "wav-24bit-44k1": (["-ar", "44100", "-c:a", "pcm_s24le"], "clip24.wav"),
    "wav-float32": (["-ar", "22050", "-c:a", "pcm_f32le"], "clipf.wav"),
    "wav-8k": (["-ar", "8000", "-c:a", "pcm_s16le"], "clip8k.wav"),
    "wav-stereo-44k1": (["-ar", "44100", "-ac", "2", "-c:a", "pcm_s16le"], "stereo.wav"),
    "wav-mulaw-8k": (["-ar", "8000", "-c:a", "pcm_mulaw"], "phone.wav"),
    "flac": (["-c:a", "flac"], "clip.flac"),
    "ogg-vorbis": (["-c:a", "libvorbis"], "clip.ogg"),
    "ogg-opus": (["-c:a", "libopus"], "clip.opus"),
    "mp3": (["-c:a", "libmp3lame", "-b:a", "64k"], "clip.mp3"),
    "m4a-aac": (["-c:a", "aac", "-b:a", "64k"], "clip.m4a"),
    "webm-opus": (["-ac", "2", "-ar", "48000", "-c:a", "libopus"], "clip.webm"),  # a browser recording
    "mp4-video-and-aac": (["-f", "lavfi", "-i", "testsrc=size=64x64:rate=5", "-shortest", "-c:v",
                           "libx264", "-c:a", "aac"], "movie.mp4"),
}


def ffmpeg(*args: str) -> None:
    assert FFMPEG
    subprocess.run([FFMPEG, "-hide_banner", "-loglevel", "error", "-y", *args], check=True, timeout=60)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """Each format of one espeak-ng sentence (~5 s), plus some broken and empty files."""
    if not (FFMPEG and ESPEAK):
        pytest.skip("needs ffmpeg and espeak-ng")
    root = tmp_path_factory.mktemp("formats")
    spoken = root / "spoken.wav"
    subprocess.run([ESPEAK, "-w", str(spoken), SPOKEN], check=True, timeout=60)
    out: dict[str, bytes] = {"espeak-original": spoken.read_bytes()}
    for name, (args, filename) in FORMATS.items():
        if args[:2] == ["-f", "lavfi"]:  # a second input (video) goes before the output options
            ffmpeg("-i", str(spoken), *args[:4], "-map", "1:v", "-map", "0:a", *args[4:], str(root / filename))
        else:
            ffmpeg("-i", str(spoken), *args, str(root / filename))
        out[name] = (root / filename).read_bytes()
    ffmpeg("-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono", "-t", "0", "-c:a", "flac", str(root / "0.flac"))
    out["zero-length-flac"] = (root / "0.flac").read_bytes()
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x64:rate=5", "-t", "1", "-c:v", "libvpx", str(root / "v.webm"))
    out["video-only-webm"] = (root / "v.webm").read_bytes()
    ffmpeg("-f", "lavfi", "-i", "anullsrc=r=16000:cl=mono", "-t", "600", "-c:a", "flac", str(root / "b.flac"))
    out["10-minutes-of-silence-flac"] = (root / "b.flac").read_bytes()
    ffmpeg("-f", "lavfi", "-i", "anullsrc=r=48000:cl=stereo", "-t", "3", "-c:a", "libopus", str(root / "s.webm"))
    out["silent-webm"] = (root / "s.webm").read_bytes()
    return out


@needs_tools
@pytest.mark.parametrize("name", ["espeak-original", *FORMATS])
def test_each_format_decodes_and_transcribes(client: TestClient, fixtures: dict[str, bytes], name: str) -> None:
    filename = FORMATS[name][1] if name in FORMATS else "spoken.wav"
    r = client.post("/api/transcribe", files={"file": (filename, fixtures[name], "application/octet-stream")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["text"] == TEXT_A
    assert body["language"] == "en" and body["model_version"] == "a"
    assert body["duration_s"] == pytest.approx(5.01, abs=0.1)  # encoders pad by a few ms at most


@needs_tools
def test_the_file_name_and_content_type_do_not_matter(client: TestClient, fixtures: dict[str, bytes]) -> None:
    r = client.post("/v1/audio/transcriptions", files={"file": ("recording.wav", fixtures["mp3"], "audio/wav")})
    assert r.status_code == 200 and r.json() == {"text": TEXT_A}
    r = client.post("/v1/audio/transcriptions", files={"file": ("blob", fixtures["m4a-aac"])})
    assert r.status_code == 200 and r.json() == {"text": TEXT_A}


def _wav(samples: np.ndarray, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, 16_000, format="WAV", subtype=subtype)
    return buf.getvalue()


def _zip_of_text() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("notes.txt", "not audio")
    return buf.getvalue()


BAD_UPLOADS: dict[str, tuple[Callable[[dict[str, bytes]], bytes], int, str]] = {
    "empty-file": (lambda f: b"", 400, "empty_audio"),
    "wav-header-no-samples": (lambda f: synth.wav_bytes(synth.silence(0.0)), 400, "empty_audio"),
    "zero-length-flac": (lambda f: f["zero-length-flac"], 400, "empty_audio"),
    "10-ms-of-audio": (lambda f: synth.wav_bytes(synth.speech_like(0.01)), 400, "audio_too_short"),
    "text-file": (lambda f: b"meeting notes, not audio\n" * 50, 415, "unsupported_audio"),
    "random-bytes": (lambda f: np.random.default_rng(1).bytes(3_000_000), 415, "unsupported_audio"),
    "png-image": (lambda f: b"\x89PNG\r\n\x1a\n" + bytes(200), 415, "unsupported_audio"),
    "zip-file": (lambda f: _zip_of_text(), 415, "unsupported_audio"),
    "truncated-mp3": (lambda f: f["mp3"][:200], 415, "unsupported_audio"),
    "truncated-wav-header": (lambda f: f["wav-16bit-16k"][:30], 415, "unsupported_audio"),
    "video-without-audio": (lambda f: f["video-only-webm"], 415, "unsupported_audio"),
}


@needs_tools
@pytest.mark.parametrize("name", list(BAD_UPLOADS))
@pytest.mark.parametrize("route", ["/api/transcribe", "/v1/audio/transcriptions"])
def test_bad_uploads_get_a_4xx_with_a_reason(client: TestClient, fixtures: dict[str, bytes], name: str,
                                             route: str) -> None:
    make, status, code = BAD_UPLOADS[name]
    r = client.post(route, files={"file": ("upload.wav", make(fixtures))}, headers={"X-Request-Id": "bad-1"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"], error["request_id"]) == (code, "file", "bad-1")
    assert error["message"] and "/tmp" not in error["message"] and "Traceback" not in error["message"]


@needs_tools
def test_silence_in_any_format_is_200_with_empty_text_and_nospeech(client: TestClient,
                                                                   fixtures: dict[str, bytes]) -> None:
    for payload in (synth.wav_bytes(synth.silence(2.0)), fixtures["silent-webm"]):
        r = client.post("/v1/audio/transcriptions", files={"file": ("s", payload)},
                        data={"response_format": "verbose_json"})
        assert r.status_code == 200, r.text
        assert (r.json()["text"], r.json()["language"], r.json()["segments"]) == ("", "nospeech", [])


def test_not_a_number_samples_are_treated_as_silence(client: TestClient) -> None:
    r = client.post("/api/transcribe", files={"file": ("nan.wav", _wav(np.full(16_000, np.nan, np.float32),
                                                                       "FLOAT"))})
    assert r.status_code == 200 and r.json()["language"] == "nospeech"


def test_odd_sample_rates_decode_and_absurd_ones_are_refused_at_once(client: TestClient) -> None:
    """A header may claim any rate: an odd one still transcribes, and one no recorder uses is a 415
    before any resampling (10 MHz would cost a resampling filter of gigabytes for 16 KB of file)."""
    odd = synth.wav_bytes(synth.speech_like(1.5, seed=3), 16_001)
    r = client.post("/api/transcribe", files={"file": ("odd.wav", odd)})
    assert r.status_code == 200, r.text
    assert (r.json()["text"], r.json()["duration_s"]) == (TEXT_A, pytest.approx(1.5, abs=0.01))
    absurd = synth.wav_bytes(np.zeros(8000, np.float32), 10_000_019)
    r = client.post("/api/transcribe", files={"file": ("absurd.wav", absurd)})
    assert r.status_code == 415, r.text
    assert "10000019 Hz" in r.json()["error"]["message"]


@needs_tools
def test_audio_longer_than_the_limit_is_413_even_when_it_compresses_to_almost_nothing(
        make_settings: Callable[..., Any], fixtures: dict[str, bytes]) -> None:
    with TestClient(create_app(make_settings(max_audio_seconds=4.0))) as c:
        r = c.post("/api/transcribe", files={"file": ("long.flac", fixtures["flac"])})
        assert r.status_code == 413 and r.json()["error"]["code"] == "audio_too_long"
        assert "4 s" in r.json()["error"]["message"]
        # 10 minutes in a few kB: refused while decoding, not after inflating it all in memory
        bomb = fixtures["10-minutes-of-silence-flac"]
        assert len(bomb) < 400_000
        r = c.post("/api/transcribe", files={"file": ("bomb.flac", bomb)})
        assert r.status_code == 413 and r.json()["error"]["code"] == "audio_too_long"
        r = c.post("/api/transcribe", files={"file": ("long.webm", fixtures["webm-opus"])})
        assert r.status_code == 413 and r.json()["error"]["code"] == "audio_too_long"


@pytest.fixture
def small_limit_server(make_settings: Callable[..., Any]) -> Iterator[str]:
    with serve_in_thread(create_app(make_settings(max_upload_bytes=64 * 1024))) as url:
        yield url


def _raw_request(url: str, head: str, body: bytes) -> tuple[int, bytes]:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode("latin-1") + body)
        received = b""
        while b"\r\n\r\n" not in received or len(received) < received.find(b"\r\n\r\n") + 4 + 50:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    status = int(received.split(b" ", 2)[1])
    return status, received


@pytest.mark.parametrize("path", ["/api/transcribe", "/v1/audio/transcriptions", "/api/jobs"])
def test_a_huge_content_length_is_refused_before_the_body_is_read(small_limit_server: str, path: str) -> None:
    # 10 GB announced, a few bytes sent: the answer must come without waiting for the rest
    head = (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary=x\r\n"
            f"Content-Length: {10 * 2**30}\r\nX-Request-Id: huge-1\r\n\r\n")
    status, raw = _raw_request(small_limit_server, head, b"--x\r\n")
    assert status == 413
    assert b'"code":"payload_too_large"' in raw and b"huge-1" in raw and b"65536 bytes" in raw


def test_an_oversized_upload_without_content_length_is_413(small_limit_server: str) -> None:
    def body() -> Iterator[bytes]:  # a chunked upload: the server counts what arrives
        yield b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n"
        for _ in range(40):
            yield bytes(8192)
        yield b"\r\n--x--\r\n"

    r = httpx.post(f"{small_limit_server}/api/transcribe", content=body(), timeout=10,
                   headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


@needs_tools
def test_bad_uploads_never_500_and_leave_no_temp_files(make_settings: Callable[..., Any], fixtures: dict[str, bytes],
                                                       tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    private_tmp = tmp_path / "tmp"  # our own temp dir, so other processes on the machine cannot interfere
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    before = sorted(os.listdir(tempfile.gettempdir()))
    uploads = [make(fixtures) for make, _, _ in BAD_UPLOADS.values()]
    uploads += [np.random.default_rng(2).bytes(2_500_000), fixtures["10-minutes-of-silence-flac"]]  # spooled
    with serve_in_thread(create_app(make_settings(max_audio_seconds=60.0, max_upload_bytes=4 * 2**20))) as url, \
            httpx.Client(base_url=url, timeout=30) as c:
        statuses = set()
        for payload in uploads:
            for route in ("/api/transcribe", "/v1/audio/transcriptions"):
                r = c.post(route, files={"file": ("upload.bin", payload)})
                statuses.add(r.status_code)
        r = c.post("/api/transcribe", files={"file": ("big.bin", bytes(5 * 2**20))})
        statuses.add(r.status_code)
    assert statuses <= {400, 413, 415}, statuses
    assert sorted(os.listdir(tempfile.gettempdir())) == before
