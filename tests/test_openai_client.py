"""The official ``openai`` Python client, unmodified, against a real voxswap server on a socket."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from fastapi import FastAPI

from server.testing import synth
from tests.conftest import TEXT_A

LONG = [("speech", 12.0), ("silence", 1.5), ("speech", 20.0)]


@pytest.fixture
def oa(live_server: tuple[str, FastAPI]) -> Iterator[openai.OpenAI]:
    url, _ = live_server
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=30) as client:  # default retries
        yield client


@pytest.fixture(scope="module")
def clip() -> bytes:
    return synth.wav_bytes(synth.speech_like(2.0, seed=4))


def test_json_is_the_default_and_gives_the_text(oa: openai.OpenAI, clip: bytes) -> None:
    result = oa.audio.transcriptions.create(model="whisper-1", file=("clip.wav", clip))
    assert result.text == TEXT_A


def test_text_srt_and_vtt_come_back_as_strings(oa: openai.OpenAI, clip: bytes) -> None:
    text = oa.audio.transcriptions.create(model="whisper-1", file=("clip.wav", clip), response_format="text")
    assert text.strip() == TEXT_A
    srt = oa.audio.transcriptions.create(model="whisper-1", file=("clip.wav", clip), response_format="srt")
    assert srt == f"1\n00:00:00,000 --> 00:00:02,000\n{TEXT_A}\n"
    vtt = oa.audio.transcriptions.create(model="whisper-1", file=("clip.wav", clip), response_format="vtt")
    assert vtt == f"WEBVTT\n\n00:00:00.000 --> 00:00:02.000\n{TEXT_A}\n"


def test_verbose_json_has_segments_and_voxswaps_extra_fields(oa: openai.OpenAI) -> None:
    result = oa.audio.transcriptions.create(
        model="voxswap", file=("long.wav", synth.wav_bytes(synth.islands(LONG))), response_format="verbose_json",
        timestamp_granularities=["segment"], language="en",
    )
    assert result.text == f"{TEXT_A} {TEXT_A}"
    assert result.language == "en" and result.duration == pytest.approx(33.5, abs=0.01)
    assert result.segments is not None and len(result.segments) == 2
    first, second = result.segments
    assert (first.id, first.start, first.text) == (0, 0.0, TEXT_A)
    assert 12.0 <= first.end <= 13.5 <= second.end and 12.0 <= second.start <= 13.5
    extra = result.model_extra or {}
    assert extra["model_version"] == "a"
    assert extra["emotion"] == "neutral" and extra["events"] == ["speech"]


def test_language_reaches_the_model(oa: openai.OpenAI, clip: bytes) -> None:
    result = oa.audio.transcriptions.create(model="whisper-1", file=("clip.wav", clip), language="ko",
                                            response_format="verbose_json")
    assert result.language == "ko"


def test_a_version_that_is_not_loaded_is_a_conflict_error(oa: openai.OpenAI, clip: bytes) -> None:
    with pytest.raises(openai.ConflictError) as info:
        oa.audio.transcriptions.create(model="b", file=("clip.wav", clip))
    assert info.value.status_code == 409
    assert info.value.code == "version_not_loaded" and info.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        oa.audio.transcriptions.create(model="no-such-version", file=("clip.wav", clip))


def test_the_live_version_can_be_pinned_by_name(oa: openai.OpenAI, clip: bytes) -> None:
    raw = oa.audio.transcriptions.with_raw_response.create(model="a", file=("clip.wav", clip))
    assert raw.headers["x-model-version"] == "a" and raw.parse().text == TEXT_A


def test_bad_audio_is_a_bad_request_error_with_a_reason(oa: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        oa.audio.transcriptions.create(model="whisper-1", file=("empty.wav", b""))
    assert info.value.code == "empty_audio" and "empty" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        oa.audio.transcriptions.create(model="whisper-1", file=("clip.wav", synth.wav_bytes(synth.silence(1))),
                                       language="klingon")
    assert info.value.param == "language"


def test_models_list_shows_the_models_and_versions(oa: openai.OpenAI) -> None:
    models = {m.id: m for m in oa.models.list()}
    assert set(models) == {"sensevoice", "sensevoice@a", "a", "b"}
    assert (models["sensevoice"].model_extra or {})["version"] == "a"
    assert (models["a"].model_extra or {})["live"] is True
    assert (models["b"].model_extra or {})["loaded"] is False
    assert models["a"].owned_by == "voxswap"


def test_the_client_does_not_retry_a_conflict_it_cannot_win(
    oa: openai.OpenAI, clip: bytes, live_server: tuple[str, FastAPI]
) -> None:
    import httpx

    url, _ = live_server
    with pytest.raises(openai.ConflictError):
        oa.audio.transcriptions.create(model="b", file=("clip.wav", clip))
    metrics = httpx.get(f"{url}/metrics").text
    assert ('voxswap_requests_total{model="none",route="/v1/audio/transcriptions",status="409",version="none"} 1.0'
            in metrics)
