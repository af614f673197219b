"""Long recordings: cut at pauses into segments, one version answering the whole file."""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from server.speech import segmenter
from server.testing import synth
from tests.conftest import TEXT_A

ISLANDS = [("speech", 12.0), ("silence", 1.5), ("speech", 20.0), ("silence", 2.0), ("speech", 15.0)]


def _verbose(client: TestClient, samples: np.ndarray, **form: str) -> dict[str, Any]:
    r = client.post("/v1/audio/transcriptions", files={"file": ("long.wav", synth.wav_bytes(samples))},
                    data={"response_format": "verbose_json", **form})
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def _gaps(pattern: list[tuple[str, float]]) -> list[tuple[float, float]]:
    """(start, end) seconds of each silent part."""
    gaps, t = [], 0.0
    for kind, seconds in pattern:
        if kind == "silence":
            gaps.append((t, t + seconds))
        t += seconds
    return gaps


def test_long_audio_is_cut_inside_the_pauses_one_segment_per_speech_island(client: TestClient) -> None:
    body = _verbose(client, synth.islands(ISLANDS))
    segments = body["segments"]
    assert [s["text"] for s in segments] == [TEXT_A] * 3
    assert body["text"] == " ".join([TEXT_A] * 3)
    assert body["duration"] == pytest.approx(50.5, abs=0.01)
    assert [s["id"] for s in segments] == [0, 1, 2]
    for (left, right), (gap_start, gap_end) in zip(pairwise(segments), _gaps(ISLANDS), strict=True):
        assert gap_start <= left["end"] <= gap_end, (left, gap_start, gap_end)
        assert gap_start <= right["start"] <= gap_end, (right, gap_start, gap_end)
    # each segment covers its island (give or take a frame) and stays under the window
    islands = [(0.0, 12.0), (13.5, 33.5), (35.5, 50.5)]
    for segment, (start, end) in zip(segments, islands, strict=True):
        assert segment["start"] <= start + 0.05 and segment["end"] >= end - 0.05
        assert segment["end"] - segment["start"] <= 30.0
        assert (segment["language"], segment["emotion"], segment["events"]) == ("en", "neutral", ["speech"])
    assert (body["language"], body["emotion"], body["events"]) == ("en", "neutral", ["speech"])
    assert body["model_version"] == "a"


def test_subtitles_of_long_audio_have_one_cue_per_island(client: TestClient) -> None:
    wav = synth.wav_bytes(synth.islands(ISLANDS))
    srt = client.post("/v1/audio/transcriptions", files={"file": ("long.wav", wav)},
                      data={"response_format": "srt"}).text
    assert srt.startswith("1\n00:00:00,000 --> 00:00:12,")
    assert srt.count(" --> ") == 3 and srt.count(TEXT_A) == 3
    vtt = client.post("/v1/audio/transcriptions", files={"file": ("long.wav", wav)},
                      data={"response_format": "vtt"}).text
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:12.")
    assert "\n00:00:35." in vtt and vtt.rstrip().endswith(TEXT_A)


def test_a_long_silence_gives_no_segment(client: TestClient) -> None:
    body = _verbose(client, synth.islands([("speech", 10), ("silence", 35), ("speech", 10)]))
    assert [s["text"] for s in body["segments"]] == [TEXT_A, TEXT_A]
    first, second = body["segments"]
    assert first["end"] <= 10.5 and second["start"] >= 44.5
    assert body["text"] == f"{TEXT_A} {TEXT_A}"


def test_long_audio_without_any_pause_is_cut_hard_at_the_window(client: TestClient) -> None:
    body = _verbose(client, synth.speech_like(70.0, seed=3))
    assert [(s["start"], s["end"]) for s in body["segments"]] == [(0.0, 30.0), (30.0, 60.0), (60.0, 70.0)]
    assert body["text"] == " ".join([TEXT_A] * 3)


def test_a_long_silent_file_is_empty_text_and_nospeech(client: TestClient) -> None:
    body = _verbose(client, synth.silence(45.0))
    assert body["text"] == "" and body["segments"] == [] and body["language"] == "nospeech"


def test_window_and_batch_size_are_settings(make_settings) -> None:  # type: ignore[no-untyped-def]
    from server.app import create_app

    with TestClient(create_app(make_settings(segment_window_s=10.0, segment_batch_size=1))) as c:
        body = _verbose(c, synth.islands([("speech", 8), ("silence", 1), ("speech", 8), ("silence", 1),
                                          ("speech", 8)]), language="ja")
    assert [s["text"] for s in body["segments"]] == [TEXT_A] * 3
    assert {s["language"] for s in body["segments"]} == {"ja"}


def test_short_audio_is_one_segment_covering_it() -> None:
    samples = synth.islands([("speech", 5), ("silence", 3), ("speech", 5)])
    assert segmenter.split(samples, window_s=30.0) == [segmenter.Span(0, len(samples))]


def test_a_noisy_recording_is_still_cut_in_its_pauses() -> None:
    rng = np.random.default_rng(5)
    clean = synth.islands(ISLANDS)
    noisy = (clean + 0.003 * rng.standard_normal(len(clean))).astype(np.float32)  # a -50 dBFS hiss
    spans = segmenter.split(noisy, window_s=30.0)
    assert len(spans) == 3
    for (left, right), (gap_start, gap_end) in zip(pairwise(spans), _gaps(ISLANDS), strict=True):
        assert gap_start <= left.end_s <= gap_end and gap_start <= right.start_s <= gap_end


def test_a_short_utterance_in_a_long_silence_is_never_cut() -> None:
    samples = synth.islands([("silence", 29.0), ("speech", 2.0), ("silence", 29.0)])
    spans = segmenter.split(samples, window_s=30.0)
    holding = [s for s in spans if s.start_s <= 29.0 and s.end_s >= 31.0]
    assert len(holding) == 1, spans
    assert all(s.end_s <= 29.0 or s.start_s >= 31.0 for s in spans if s not in holding)
