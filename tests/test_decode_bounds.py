"""Decoding costs what the model will see, never what the source rate claims (issue 18, finding B).

The probe's file: a FLAC of 599 s of silence at 384 kHz, well inside the length and rate limits and
under a megabyte, took 1.9 GB to decode (the length limit counted source samples, and the whole
source was held, then resampled), and 4 at once peaked at 7.5 GB because decoding ran before a
request was admitted. Memory is measured as a client would see it hurt: the server's RSS (psutil),
sampled every 2 ms while it decodes.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import httpx
import numpy as np
import psutil
import pytest
import soundfile as sf

from server.errors import AudioTooLong, UnsupportedAudio
from server.speech import audio
from server.storage.registry import Registry
from server.testing import synth
from testkit.processes import start_server

MB = 1_000_000
PER_REQUEST = 50 * MB  # the budget: extra memory one request of this file may cost
SOURCE_RATE = 384_000
SECONDS = 599


class PeakRss:
    """The highest resident memory of a process while the block runs, above where it started."""

    def __init__(self, pid: int):
        self._process = psutil.Process(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)
        self.start = self.peak = 0

    def __enter__(self) -> PeakRss:
        self.start = self.peak = self._process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.start




@pytest.fixture(scope="module")
def silent_384k_flac() -> bytes:
    data = synth.silence_flac(SECONDS, SOURCE_RATE)
    assert len(data) < 1_000_000  # what the probe sent: a small upload, far inside max_upload_bytes
    return data


def test_the_384_khz_flac_of_599_s_of_silence_decodes_within_50_mb(silent_384k_flac: bytes) -> None:
    audio.decode(synth.silence_flac(1, SOURCE_RATE), max_seconds=600)  # imports and first-use costs
    with PeakRss(psutil.Process().pid) as rss:
        decoded = audio.decode(silent_384k_flac, max_seconds=600)
    assert (decoded.source_rate, decoded.duration_s) == (SOURCE_RATE, SECONDS)
    assert not decoded.samples.any()
    # the 16 kHz result alone is 38 MB; the 230 million source samples are never held
    assert rss.growth < PER_REQUEST, f"decoding took {rss.growth / MB:.0f} MB"


def test_the_limit_counts_the_seconds_the_model_would_see() -> None:
    """599 s at 384 kHz is accepted like 599 s at 16 kHz, and 601 s is refused the same way, with
    its length: no rate makes a file longer or shorter than it is."""
    assert audio.decode(synth.silence_flac(5, SOURCE_RATE), max_seconds=5).duration_s == 5
    for rate in (SOURCE_RATE, 16_000):
        with pytest.raises(AudioTooLong, match=r"6\.0 s long; this server accepts at most 5 s"):
            audio.decode(synth.silence_flac(6, rate), max_seconds=5)


@pytest.fixture
def server(registry: Registry, tmp_path: Path) -> Iterator[str]:
    """A real ``voxswap serve`` with one inference thread, as the probe ran it."""
    proc = start_server(registry.root, tmp_path / "server", env={"VOXSWAP_INFERENCE_WORKERS": "1"})
    try:
        yield proc.url
    finally:
        proc.stop()


def test_four_at_once_are_decoded_one_admitted_request_at_a_time(server: str, silent_384k_flac: bytes) -> None:
    """Decoding is part of the admitted work on the inference thread, so four uploads at once cost
    what one does (the probe saw 7.5 GB), a quarter of it per request."""
    pid = httpx.get(f"{server}/api/system/status", timeout=10).json()["workers"][0]["pid"]

    def send(n: int) -> tuple[list[httpx.Response], int]:
        answers: list[httpx.Response] = []

        def one() -> None:
            with httpx.Client(base_url=server, timeout=300) as client:
                answers.append(client.post("/api/transcribe", files={"file": ("silence.flac", silent_384k_flac)}))

        threads = [threading.Thread(target=one) for _ in range(n)]
        with PeakRss(pid) as rss:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=300)
        assert [a.status_code for a in answers] == [200] * n, [a.text for a in answers]
        assert {(a.json()["duration_s"], a.json()["language"]) for a in answers} == {(SECONDS, "nospeech")}
        return answers, rss.growth

    with httpx.Client(base_url=server, timeout=300) as client:  # warm: imports, first decode, first run
        warm = client.post("/api/transcribe", files={"file": ("s.flac", synth.silence_flac(2, SOURCE_RATE))})
        assert warm.status_code == 200, warm.text
    _, alone = send(1)  # its 16 kHz samples, the segmenter's pass over them, the model's batches
    _, together = send(4)
    assert together < 1.5 * alone, f"one alone took {alone / MB:.0f} MB, 4 at once {together / MB:.0f} MB"
    assert together / 4 < PER_REQUEST, f"4 at once took {together / MB:.0f} MB"


@pytest.mark.parametrize("rate", [8_000, 44_100, 48_000, SOURCE_RATE])
def test_a_tone_keeps_its_pitch_and_level_and_nothing_above_8_khz_folds_back(rate: int) -> None:
    """Resampling quality: a 440 Hz tone comes out at 440 Hz and the same level at 16 kHz, and a
    tone above the new Nyquist frequency is filtered out instead of aliasing into the speech band."""
    t = np.arange(2 * rate) / rate
    for tone, expected_db in ((440.0, -9.0), (12_000.0, None)):
        if tone >= rate / 2:
            continue
        wav = io.BytesIO()
        sf.write(wav, (0.5 * np.sin(2 * np.pi * tone * t)).astype(np.float32), rate, format="WAV", subtype="FLOAT")
        decoded = audio.decode(wav.getvalue(), max_seconds=10)
        assert decoded.duration_s == pytest.approx(2.0, abs=0.001)
        middle = decoded.samples[1600:-1600]  # away from the edges' filter ramps
        level_db = 20 * np.log10(np.sqrt(np.mean(middle.astype(np.float64) ** 2)) + 1e-12)
        if expected_db is None:
            assert level_db < -60, f"{tone} Hz at {rate} Hz aliased at {level_db:.0f} dBFS"
            continue
        spectrum = np.abs(np.fft.rfft(middle[:16_000] * np.hanning(16_000)))
        assert int(np.argmax(spectrum)) == 440  # 1 Hz per bin: 16,000 samples at 16 kHz
        assert level_db == pytest.approx(expected_db, abs=0.2)  # a 0.5 sine is -9 dBFS RMS


def test_an_upload_cannot_make_ffmpeg_read_a_file_of_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FFmpeg's concat demuxer reads a playlist of paths: as an upload it would transcribe files on
    the server's own disk. Only audio containers are probed."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "secret.wav").write_bytes(synth.wav_bytes(synth.speech_like(1.0, seed=9)))
    with pytest.raises(UnsupportedAudio, match="not audio this server can decode"):
        audio.decode(b"ffconcat version 1.0\nfile sub/secret.wav\n", max_seconds=60)
