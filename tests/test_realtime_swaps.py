"""Realtime sessions across model changes: a turn finishes on the version it began on, the next turn
takes the new one; a pinned session keeps its version until the drain timeout ends it; a pipeline's
voice activity stage changes version only between turns."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI

from server.app import create_app
from server.settings import Settings
from server.storage.catalog import ModelCatalog
from server.storage.registry import Registry
from server.testing import synth
from server.tools.cli import main as cli
from testkit.harness import serve_in_thread
from tests.conftest import AUTH, TEXT_A, TEXT_B
from tests.fsmn_vad import fsmn_vad_dir  # noqa: F401  (a fixture)
from tests.realtime_helpers import TRANSCRIPTION, Session, realtime, session_update, turns

COMPLETED, FAILED = f"{TRANSCRIPTION}.completed", f"{TRANSCRIPTION}.failed"
TEXTS = {"a": TEXT_A, "b": TEXT_B}


@pytest.fixture
def serve(make_settings: Callable[..., Settings]) -> Iterator[Callable[..., tuple[str, FastAPI]]]:
    stack: list[Any] = []

    def start(**overrides: object) -> tuple[str, FastAPI]:
        app = create_app(make_settings(**overrides))
        served = serve_in_thread(app)
        stack.append(served)
        return served.__enter__(), app

    yield start
    for served in reversed(stack):
        served.__exit__(None, None, None)


def _update(url: str, path: str, version: str | None, into: dict[str, Any]) -> threading.Thread:
    """POST an update (or, without a version, a rollback) in a thread: it returns only when the
    old version has drained."""
    def run() -> None:
        into["started"] = time.monotonic()
        into["response"] = httpx.post(f"{url}{path}", json={"version": version} if version else None, headers=AUTH,
                                      timeout=60)
        into["answered"] = time.monotonic()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _started_at(session: Session) -> dict[str, float]:
    """When each turn's speech_started arrived, by item id."""
    return {e["item_id"]: at for e, at in zip(session.events, session.arrivals, strict=True)
            if e["type"] == "input_audio_buffer.speech_started"}


@pytest.mark.parametrize("change", ["update", pytest.param("rollback", marks=pytest.mark.long)])
def test_a_swap_under_four_live_sessions_completes_every_turn_on_the_version_that_began_it(
        change: str, registry: Registry, serve: Callable[..., tuple[str, FastAPI]]) -> None:
    if change == "rollback":  # b is live, a the previous version a rollback returns to
        registry.promote("b")
    old, new = ("a", "b") if change == "update" else ("b", "a")
    url, _ = serve()
    utterance = np.concatenate([synth.speech_like(2.5, seed=7), synth.silence(1.0)])
    update: dict[str, Any] = {}

    async def speaker(session: Session) -> None:
        for _ in range(5):
            await session.append(utterance, pace=2.0)
        await session.wait(lambda events: len(turns(session)) == 5, timeout=30)

    async def scenario() -> list[Session]:
        async with realtime(url, session_update()) as s1, realtime(url, session_update()) as s2, \
                realtime(url, session_update()) as s3, realtime(url, session_update()) as s4:
            sessions = [s1, s2, s3, s4]
            talking = [asyncio.create_task(speaker(s)) for s in sessions]
            await asyncio.sleep(2.6)  # mid-turn for everyone: the second utterance is being spoken
            thread = _update(url, f"/admin/model/{change}", new if change == "update" else None, update)
            await asyncio.gather(*talking)
            await asyncio.to_thread(thread.join)
            return sessions

    sessions = asyncio.run(scenario())
    response = update["response"]
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["drained"] is True and report["timings"]["drain_s"] > 0.05  # the swap waited for turns
    flipped_at = update["started"] + report["timings"]["time_to_flip_s"]
    spanning = 0
    for session in sessions:
        finished, started = turns(session), _started_at(session)
        assert len(finished) == 5 and not session.of(FAILED)
        assert len(started) == 5  # every speech_started ended in exactly one .completed
        labels = [completed["model_version"] for _, completed in finished]
        assert labels == sorted(labels, key=[old, new].index), labels  # old ... old new ... new: never back
        for deltas, completed in finished:
            version, began = completed["model_version"], started[completed["item_id"]]
            assert TEXTS[version] in completed["transcript"] and "".join(deltas) == completed["transcript"]
            if began < update["started"]:
                assert version == old
            if began > update["answered"]:
                assert version == new
            ended = session.arrivals[session.events.index(completed)]
            spanning += began < flipped_at < ended
    assert spanning, "no turn was in progress across the flip; the test proved nothing"
    assert all({c["model_version"] for _, c in turns(s)} == {old, new} for s in sessions)


def test_a_pinned_session_keeps_its_version_until_the_drain_timeout_closes_it(
        serve: Callable[..., tuple[str, FastAPI]]) -> None:
    url, _ = serve(drain_timeout_s=2.0)
    utterance = np.concatenate([synth.speech_like(1.5, seed=8), synth.silence(0.8)])
    update: dict[str, Any] = {}

    async def scenario() -> tuple[Session, Session]:
        async with realtime(url, session_update("sensevoice@a")) as pinned, \
                realtime(url, session_update()) as live:
            await pinned.append(utterance, pace=None)
            await pinned.wait_count(COMPLETED, 1)
            thread = _update(url, "/admin/model/update", "b", update)
            await asyncio.sleep(0.5)  # flipped; the pinned session still holds a's lease
            await pinned.append(utterance, pace=None)
            await pinned.wait_count(COMPLETED, 2)
            await live.append(utterance, pace=None)
            await live.wait_count(COMPLETED, 1)
            speech = synth.speech_like(8.0, seed=9)  # a turn still open at the deadline
            for offset in range(0, len(speech), 1600):
                if pinned.closed.is_set():
                    break
                await pinned.append(speech[offset : offset + 1600], pace=1.0)
            await asyncio.to_thread(thread.join)
            return pinned, live

    pinned, live = asyncio.run(scenario())
    assert [c["model_version"] for c in pinned.of(COMPLETED)] == ["a", "a"]  # the second after the flip
    assert [c["model_version"] for c in live.of(COMPLETED)] == ["b"]
    error = pinned.of("error")[-1]["error"]
    assert error["code"] == "model_version_retired" and "drain timeout" in error["message"]
    assert pinned.close_code == 1001
    # the turn open at the deadline was announced, so it ends as failed, not silently
    assert len(pinned.of("input_audio_buffer.speech_started")) == len(turns(pinned)) == 3
    assert pinned.of(FAILED)[0]["error"]["code"] == "model_version_retired"
    report = update["response"].json()
    assert report["drained"] is False and report["timings"]["drain_s"] >= 1.9


@pytest.fixture
def listening(registry: Registry, fsmn_vad_dir: Path) -> ModelCatalog:  # noqa: F811
    """The real FSMN-VAD as model ``fsmn`` (v1 live, v2 a copy) and a pipeline ``listen`` of it
    and the default model."""
    catalog = ModelCatalog(registry.root)
    fsmn = catalog.create("fsmn", "fsmn-vad")
    fsmn.add(fsmn_vad_dir, "v1")
    fsmn.add(fsmn_vad_dir, "v2")
    fsmn.promote("v1")
    assert cli(["pipeline", "set", "listen", "--vad", "fsmn", "--asr", "sensevoice",
                "--registry", str(registry.root)]) == 0
    return catalog


def test_a_pipelines_vad_finds_turns_and_changes_version_only_between_them(
        listening: ModelCatalog, serve: Callable[..., tuple[str, FastAPI]]) -> None:
    url, _ = serve()
    update: dict[str, Any] = {}

    async def scenario() -> Session:
        async with realtime(url, session_update("listen")) as session:
            detection = session.of("session.updated")[0]["session"]["audio"]["input"]["turn_detection"]
            assert detection["detector"] == "fsmn-vad"
            await session.append(np.concatenate([synth.silence(0.5), synth.speech_like(4.0, seed=4)]), pace=4.0)
            await session.wait_count("input_audio_buffer.speech_started", 1)
            thread = _update(url, "/admin/models/fsmn/update", "v2", update)
            await asyncio.sleep(0.5)
            assert "response" not in update  # the VAD's drain waits: a turn is using v1
            await session.append(np.concatenate([synth.speech_like(1.0, seed=5), synth.silence(1.5)]), pace=4.0)
            await session.wait_count(COMPLETED, 1)
            await asyncio.to_thread(thread.join)
            await session.append(np.concatenate([synth.speech_like(2.0, seed=6), synth.silence(1.5)]), pace=4.0)
            await session.wait_count(COMPLETED, 2)
            return session

    session = asyncio.run(scenario())
    assert update["response"].status_code == 200 and update["response"].json()["drained"] is True
    first, second = (c for _, c in turns(session))
    assert first["model_versions"] == {"asr": "sensevoice@a", "vad": "fsmn@v1"}
    assert second["model_versions"] == {"asr": "sensevoice@a", "vad": "fsmn@v2"}
    assert TEXT_A in first["transcript"] and TEXT_A in second["transcript"]
    assert not session.of(FAILED) and not session.of("error")
