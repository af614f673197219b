"""``stream=true`` on ``/v1/audio/transcriptions``: server-sent events the official client iterates,
a delta per finished segment while the rest of the file is still being decoded."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest
from fastapi import FastAPI

from server.app import create_app
from server.settings import Settings
from server.storage.registry import Registry
from server.testing import synth
from testkit.harness import serve_in_thread
from tests.conftest import TEXT_A

# five stretches of speech between pauses: with a 5 s window, five segments
ISLANDS = [("speech", 4.0), ("silence", 1.0)] * 5
SLOW_TEXT = "slow model streams"


@pytest.fixture
def slow_server(registry: Registry, model_dir: Callable[..., Path],
                make_settings: Callable[..., Settings]) -> Iterator[tuple[openai.OpenAI, FastAPI]]:
    """The default model's live version spends ~80 ms per audio second (~0.3 s per segment), one
    segment per batch."""
    registry.add(model_dir(SLOW_TEXT, compute_ms=80), "slow")
    registry.promote("slow")
    app = create_app(make_settings(segment_window_s=5, segment_batch_size=1))
    with serve_in_thread(app) as url, openai.OpenAI(base_url=f"{url}/v1", api_key="unused") as client:
        yield client, app


@pytest.fixture
def oa(live_server: tuple[str, FastAPI]) -> Iterator[openai.OpenAI]:
    url, _ = live_server
    with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0) as client:
        yield client


def test_deltas_add_up_to_the_final_text_and_the_first_comes_while_the_file_is_decoded(
        slow_server: tuple[openai.OpenAI, FastAPI]) -> None:
    client, app = slow_server
    clip = synth.wav_bytes(synth.islands(ISLANDS, seed=3))
    stream = client.audio.transcriptions.create(model="gpt-4o-transcribe", file=("long.wav", clip), stream=True)
    deltas: list[str] = []
    still_decoding: list[bool] = []
    done = None
    for event in stream:
        if event.type == "transcript.text.delta":
            if not deltas:  # the first segment is out; the other four are still being decoded
                still_decoding.append(app.state.ctx.pool.admitted == 1)
            deltas.append(event.delta)
        elif event.type == "transcript.text.done":
            done = event
    assert still_decoding == [True]
    assert done is not None and len(deltas) == 5
    assert "".join(deltas) == done.text == " ".join([SLOW_TEXT] * 5)
    extra = done.model_extra or {}
    assert extra["model_version"] == "slow" and extra["model"] == "sensevoice"
    assert app.state.ctx.pool.admitted == 0


def test_a_short_file_streams_one_delta_and_the_done_event(oa: openai.OpenAI) -> None:
    clip = synth.wav_bytes(synth.speech_like(2.0, seed=1))
    events = list(oa.audio.transcriptions.create(model="whisper-1", file=("a.wav", clip), stream=True,
                                                 response_format="text"))
    assert [e.type for e in events] == ["transcript.text.delta", "transcript.text.done"]
    assert events[0].delta == events[1].text == TEXT_A


def test_what_can_be_refused_is_refused_before_the_stream_starts(oa: openai.OpenAI) -> None:
    clip = synth.wav_bytes(synth.speech_like(2.0, seed=1))
    with pytest.raises(openai.NotFoundError):
        oa.audio.transcriptions.create(model="no-such-model", file=("a.wav", clip), stream=True)
    with pytest.raises(openai.BadRequestError, match="stream=true"):
        oa.audio.transcriptions.create(model="whisper-1", file=("a.wav", clip), stream=True,
                                       response_format="verbose_json")
    with pytest.raises(openai.APIStatusError) as bad_audio:
        oa.audio.transcriptions.create(model="whisper-1", file=("a.wav", b"RIFF not a wave at all"), stream=True)
    assert bad_audio.value.status_code in (400, 415)
