"""Realtime transcription (``/v1/realtime?intent=transcription``) driven by the official ``openai``
client: turns found in speech, deltas while it goes on, one final transcript per turn, and the
session surviving every mistake a client can make."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import websockets
from fastapi import FastAPI

from server.app import create_app
from server.settings import Settings
from server.storage.registry import Registry
from server.testing import synth
from testkit.harness import serve_in_thread
from tests.conftest import TEXT_A
from tests.realtime_helpers import TRANSCRIPTION, Session, espeak, realtime, session_update, turns

COMPLETED, DELTA, FAILED = f"{TRANSCRIPTION}.completed", f"{TRANSCRIPTION}.delta", f"{TRANSCRIPTION}.failed"
SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Please call Stella and ask her to bring these things.",
             "We will meet again tomorrow morning at nine."]


@pytest.fixture
def server(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., str]]:
    """Start a live server with the given settings (one per test); yields a starter returning its URL."""
    stack: list[Iterator[str]] = []

    def start(**overrides: object) -> str:
        app: FastAPI = create_app(make_settings(**overrides))
        served = serve_in_thread(app)
        stack.append(served)
        url = served.__enter__()
        start.app = app  # type: ignore[attr-defined]
        return url

    yield start
    for served in reversed(stack):
        served.__exit__(None, None, None)


def test_server_vad_finds_each_spoken_sentence_and_transcribes_it_once(server: Callable[..., str]) -> None:
    url = server()
    gap = synth.silence(1.2)
    audio = np.concatenate([gap] + [part for sentence in SENTENCES for part in (espeak(sentence), gap)])

    async def scenario() -> None:
        async with realtime(url, session_update()) as session:
            await session.append(audio, pace=4.0)
            await session.wait_count(COMPLETED, len(SENTENCES))
            await asyncio.sleep(0.3)  # nothing more comes
            kinds = [e["type"] for e in session.events]
            assert kinds.count("input_audio_buffer.speech_started") == len(SENTENCES)
            assert kinds.count("input_audio_buffer.speech_stopped") == len(SENTENCES)
            assert kinds.count("input_audio_buffer.committed") == len(SENTENCES)
            finished = turns(session)
            assert len(finished) == len(SENTENCES) and not session.of(FAILED)
            for deltas, completed in finished:
                assert deltas and "".join(deltas) == completed["transcript"]  # deltas add up to the transcript
                assert TEXT_A in completed["transcript"] and completed["model_version"] == "a"
            # each turn's events in protocol order: started, stopped, committed, completed
            for started in session.of("input_audio_buffer.speech_started"):
                own = [e["type"] for e in session.events if e.get("item_id") == started["item_id"]]
                assert own[0] == "input_audio_buffer.speech_started" and own[-1] == COMPLETED
                assert own.index("input_audio_buffer.speech_stopped") < own.index("input_audio_buffer.committed")
            # the official client parses every event into its own types (extra fields kept)
            for raw in session.raw:
                parsed = session.connection.parse_event(raw)
                assert parsed.type == json.loads(raw)["type"]
            parsed = session.connection.parse_event(session.raw[-1])
            assert parsed.type == COMPLETED and (parsed.model_extra or {})["model_version"] == "a"
            stops = [e["audio_end_ms"] for e in session.of("input_audio_buffer.speech_stopped")]
            starts = [e["audio_start_ms"] for e in session.of("input_audio_buffer.speech_started")]
            assert all(a < b for a, b in zip(starts, stops, strict=True))  # in the audio's own time
            assert all(b < a for a, b in zip(starts[1:], stops, strict=False))

    asyncio.run(scenario())


def test_a_six_second_utterance_at_real_time_pace_has_deltas_before_it_stops(server: Callable[..., str]) -> None:
    url = server()
    audio = np.concatenate([synth.silence(0.4), synth.speech_like(6.0, seed=3), synth.silence(1.0)])

    async def scenario() -> None:
        async with realtime(url, session_update()) as session:
            await session.append(audio, pace=1.0)
            await session.wait_count(COMPLETED, 1)
            kinds = [e["type"] for e in session.events]
            stopped = kinds.index("input_audio_buffer.speech_stopped")
            assert kinds[:stopped].count(DELTA) >= 2, kinds
            (deltas, completed), = turns(session)
            assert "".join(deltas) == completed["transcript"] and completed["model_version"] == "a"
            assert completed["usage"]["seconds"] >= 6.0

    asyncio.run(scenario())


def test_manual_commits_without_turn_detection_and_at_16_khz(server: Callable[..., str]) -> None:
    url = server()

    async def scenario() -> None:
        async with realtime(url, session_update(manual=True, rate=16_000)) as session:
            await session.send({"type": "input_audio_buffer.commit"})  # nothing appended yet
            await session.wait_count("error", 1)
            assert session.of("error")[0]["error"]["code"] == "input_audio_buffer_commit_empty"
            for seed in (1, 2):
                await session.append(np.concatenate([synth.speech_like(1.5, seed=seed), synth.silence(1.0)]),
                                     rate=16_000, pace=None)
                await session.send({"type": "input_audio_buffer.commit"})
                await session.wait_count(COMPLETED, seed)
            assert not session.of("input_audio_buffer.speech_started")  # no turn detection, no speech events
            assert len(session.of("input_audio_buffer.committed")) == 2
            assert all(TEXT_A in c["transcript"] for c in session.of(COMPLETED))
            updated = session.of("session.updated")[0]["session"]
            assert updated["audio"]["input"]["turn_detection"] is None
            assert updated["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 16000}

    asyncio.run(scenario())


def test_every_client_mistake_is_an_error_event_and_the_session_goes_on(server: Callable[..., str]) -> None:
    url = server(realtime_max_message_bytes=64 * 1024)

    async def scenario() -> None:
        async with realtime(url, session_update()) as session:
            mistakes = [
                ({"type": "input_audio_buffer.append", "audio": "not base64!!"}, "audio"),
                ({"type": "input_audio_buffer.append", "audio": "AAEC"}, "audio"),  # 3 bytes: a sample and a half
                ({"type": "response.create"}, "type"),
                (session_update("no-such-model"), "model"),
                ({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
                    "format": {"type": "audio/pcmu"}}}}}, "session.audio.input.format.type"),
                ({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
                    "turn_detection": {"type": "semantic_vad"}}}}}, "session.audio.input.turn_detection.type"),
            ]
            for number, (event, param) in enumerate(mistakes, start=1):
                await session.send({**event, "event_id": f"mine{number}"})
                await session.wait_count("error", number)
                error = session.of("error")[-1]["error"]
                assert error["param"] == param and error["message"], error
                assert error["event_id"] == f"mine{number}"
            await session.send_raw("{not json")
            await session.send_raw('{"type": "input_audio_buffer.append", "audio": "' + "A" * 100_000 + '"}')
            await session.wait_count("error", len(mistakes) + 2)
            assert "not JSON" in session.of("error")[-2]["error"]["message"]
            assert "65536" in session.of("error")[-1]["error"]["message"]
            # the session is intact: same model, and speech still becomes a transcript
            await session.append(np.concatenate([synth.speech_like(2.0, seed=5), synth.silence(1.0)]), pace=None)
            await session.wait_count(COMPLETED, 1)
            assert session.of(COMPLETED)[0]["model_version"] == "a"
            assert session.close_code is None

    asyncio.run(scenario())


def test_clear_during_a_turn_ends_it_as_failed(server: Callable[..., str]) -> None:
    url = server()

    async def scenario() -> None:
        async with realtime(url, session_update()) as session:
            await session.append(synth.speech_like(1.0, seed=2), pace=None)
            await session.wait_count("input_audio_buffer.speech_started", 1)
            await session.send({"type": "input_audio_buffer.clear"})
            await session.wait_count(FAILED, 1)
            assert session.of("input_audio_buffer.cleared")
            failed = session.of(FAILED)[0]
            assert failed["item_id"] == session.of("input_audio_buffer.speech_started")[0]["item_id"]
            assert failed["error"]["code"] == "input_audio_buffer_cleared"
            await session.append(np.concatenate([synth.speech_like(1.5, seed=3), synth.silence(1.0)]), pace=None)
            await session.wait_count(COMPLETED, 1)

    asyncio.run(scenario())
    metrics = httpx.get(f"{url}/metrics").text  # the client ended that turn: not the server's failure
    assert 'voxswap_realtime_turns_total{model="sensevoice",outcome="abandoned"} 1.0' in metrics
    assert 'voxswap_realtime_turns_total{model="sensevoice",outcome="failed"} 0.0' in metrics
    assert 'voxswap_realtime_turns_total{model="sensevoice",outcome="completed"} 1.0' in metrics


def test_a_turn_longer_than_the_maximum_is_committed_by_the_server(server: Callable[..., str]) -> None:
    url = server(realtime_max_turn_s=2.0)

    async def scenario() -> None:
        async with realtime(url, session_update()) as session:
            await session.append(np.concatenate([synth.speech_like(5.0, seed=4), synth.silence(1.0)]), pace=None)
            await session.wait(lambda events: sum(e["type"] == COMPLETED for e in events) >= 2)
            stops = session.of("input_audio_buffer.speech_stopped")
            starts = session.of("input_audio_buffer.speech_started")
            assert len(starts) >= 2 and stops[0]["audio_end_ms"] - starts[0]["audio_start_ms"] <= 2100

    asyncio.run(scenario())


def test_limits_refuse_the_handshake_or_close_with_a_reason(server: Callable[..., str],
                                                           caplog: pytest.LogCaptureFixture) -> None:
    url = server(realtime_max_sessions=1, realtime_idle_timeout_s=1.0)
    ws_url = url.replace("http", "ws") + "/v1/realtime"

    async def scenario() -> None:
        with pytest.raises(websockets.exceptions.InvalidStatus) as wrong_intent:
            async with websockets.connect(ws_url):
                pass
        assert wrong_intent.value.response.status_code == 400
        assert b"intent=transcription" in wrong_intent.value.response.body
        async with realtime(url) as first:
            with pytest.raises(websockets.exceptions.InvalidStatus) as full:
                async with websockets.connect(f"{ws_url}?intent=transcription"):
                    pass
            assert full.value.response.status_code == 503
            assert full.value.response.headers["retry-after"] == "1"
            assert b"maximum of 1 realtime sessions" in full.value.response.body
            started = time.monotonic()
            await asyncio.wait_for(first.closed.wait(), 5)  # idle: nothing sent for a second
            assert first.close_code == 1000 and "idle" in first.close_reason
            assert time.monotonic() - started < 3
        async with realtime(url) as again:  # the slot came back
            assert again.of("session.created")

    asyncio.run(scenario())
    # a refusal is an answer, not a server error: uvicorn's "without completing handshake" line is not logged
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.records


def test_a_turn_waits_for_a_busy_pool_where_a_request_is_refused(
        server: Callable[..., str], registry: Registry, model_dir: Callable[..., Path]) -> None:
    """Sessions are bounded by their own limit: a piece of a spoken turn queues for the model, while
    an HTTP request beyond the pool's places is refused (503) as before."""
    registry.add(model_dir("slow model speaking", compute_ms=250), "slow")
    registry.promote("slow")
    url = server(inference_workers=1, max_queue=0)
    long_clip = synth.wav_bytes(synth.speech_like(10.0, seed=2))  # ~2.5 s of model time
    clip = synth.wav_bytes(synth.speech_like(1.0, seed=3))

    async def scenario() -> tuple[int, Session]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http, realtime(url, session_update()) as session:
            busy = asyncio.create_task(http.post("/api/transcribe", files={"file": ("long.wav", long_clip)}))
            await asyncio.sleep(0.5)
            refused = await http.post("/api/transcribe", files={"file": ("c.wav", clip)})
            await session.append(np.concatenate([synth.speech_like(1.5, seed=4), synth.silence(1.0)]), pace=None)
            await session.wait_count(COMPLETED, 1, timeout=30)
            assert (await busy).status_code == 200
            return refused.status_code, session

    refused, session = asyncio.run(scenario())
    assert refused == 503
    assert not session.of(FAILED) and session.of(COMPLETED)[0]["model_version"] == "slow"
