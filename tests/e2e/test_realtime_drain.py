"""SIGTERM while realtime clients are mid-utterance: every open turn is transcribed, then 1012.

A real ``voxswap serve`` (one uvicorn process, and gunicorn with two workers) and clients speaking
at real-time pace, as a microphone does. The moment the signal lands the process is not ready and
refuses new realtime handshakes with 503 (before accept, so nginx tries the next instance); each
live session finishes the turn it is in, sends its ``.completed``, and only then closes with 1012,
the code OpenAI's client reconnects on. A speaker who does not stop is cut at the drain timeout,
and still gets a transcript for what was said. Then the process exits 0.
"""

from __future__ import annotations

import asyncio
import base64
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.websocket_reconnection import ReconnectingEvent, ReconnectingOverrides
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from server.storage.registry import Registry
from testkit.harness import wait_until
from testkit.processes import ServerProcess, start_server
from testkit.realtime import (
    CHUNK_S,
    RATE,
    SERVICE_RESTART,
    TRANSCRIPTION,
    RealtimeLoad,
    Speaker,
    session_update,
    utterance,
    ws_url,
)

pytestmark = pytest.mark.e2e
TEXT = "drain model says hello"
SHUTDOWN_DELAY_S = 3.0  # readiness 503 and handshakes refused, listening still: the window a balancer sees
DRAIN_TIMEOUT_S = 8.0  # well past a 3 s utterance's turn, far short of the talker's 20 s


@pytest.fixture
def reg(tmp_path: Path, model_dir: Callable[..., Path]) -> Registry:
    registry = Registry(tmp_path / "registry").ensure()
    registry.add(model_dir(TEXT, compute_ms=10), "a")
    registry.promote("a")
    return registry


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.stop()  # only a failed test leaves one running


def transcript_of_text(transcript: str | None) -> bool:
    """The model says TEXT for each piece of a turn: the final transcript is TEXT once or more."""
    return transcript is not None and re.fullmatch(rf"{TEXT}( {TEXT})*", transcript) is not None


class OfficialClient:
    """A session through OpenAI's own client, in its own thread, speaking until the server closes it:
    the client must parse every event and hand the 1012 to ``on_reconnecting`` (declined here: the
    server it would reach is gone)."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        self.in_turn = threading.Event()
        self.types: list[str] = []
        self.completed: list[Any] = []
        self.reconnect_codes: list[int] = []
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="official-client", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the official client's session did not end"

    def _on_reconnecting(self, event: ReconnectingEvent) -> ReconnectingOverrides:
        self.reconnect_codes.append(event.close_code)
        return {"abort": True}

    async def _run(self) -> None:
        client = openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key="unused", max_retries=0)
        closed = asyncio.Event()
        try:
            async with client.realtime.connect(extra_query={"intent": "transcription"},
                                               on_reconnecting=self._on_reconnecting) as conn:
                await conn.send(session_update())  # type: ignore[arg-type]
                sender = asyncio.create_task(self._speak(conn, closed))
                try:
                    async for event in conn:
                        self.types.append(event.type)
                        if event.type == "input_audio_buffer.speech_started":
                            self.in_turn.set()
                        elif event.type == f"{TRANSCRIPTION}.completed":
                            self.completed.append(event)
                            self.in_turn.clear()
                except (ConnectionClosed, openai.WebSocketConnectionClosedError):
                    pass  # the reconnect was declined: the close is re-raised
                finally:
                    closed.set()
                    await sender
        except Exception as exc:
            self.error = exc

    async def _speak(self, conn: Any, closed: asyncio.Event) -> None:
        """Utterance after utterance at real-time pace, until the connection closes."""
        step, index = int(RATE * CHUNK_S) * 2, 0
        while True:
            pcm, began = utterance(index, seed=7).pcm, time.monotonic()
            for n, offset in enumerate(range(0, len(pcm), step)):
                await asyncio.sleep(max(0.0, began + n * CHUNK_S - time.monotonic()))
                if closed.is_set():
                    return
                audio = base64.b64encode(pcm[offset:offset + step]).decode()
                try:
                    await conn.send({"type": "input_audio_buffer.append", "audio": audio})
                except (ConnectionClosed, openai.WebSocketConnectionClosedError):
                    return
            index += 1


def handshake_status(base_url: str) -> int:
    """The HTTP status a new realtime handshake gets (101 when it is accepted)."""
    try:
        with connect(ws_url(base_url), open_timeout=5):
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


@pytest.mark.parametrize("workers", [1, pytest.param(2, marks=pytest.mark.long)], ids=["uvicorn", "gunicorn-2-workers"])
def test_sigterm_mid_utterance_completes_every_open_turn_then_closes_1012_and_exits_0(
    reg: Registry, servers: list[ServerProcess], tmp_path: Path, workers: int
) -> None:
    server = start_server(reg.root, tmp_path / "run", workers=workers, env={
        "VOXSWAP_SHUTDOWN_DELAY_S": str(SHUTDOWN_DELAY_S), "VOXSWAP_DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S)})
    servers.append(server)
    speakers = [Speaker(server.url, name=f"speaker-{i}", reconnect=False, seed=10 * i) for i in range(2)]
    talker = Speaker(server.url, name="talker", reconnect=False, make_utterance=lambda i: utterance(i, speech_s=20))
    official = OfficialClient(server.url)
    official.start()
    with RealtimeLoad(speakers=[*speakers, talker]) as load:
        try:
            wait_until(lambda: all(s.open_turn() for s in load.speakers) and official.in_turn.is_set(), timeout_s=30,
                       message="every session mid-utterance")
        except TimeoutError as exc:
            state = {s.name: (s.spoken, [c.types() for c in s.connections], s.error) for s in load.speakers}
            raise AssertionError(f"{state}; official client: {official.types} {official.error!r}") from exc
        in_progress = {s.name: s.open_turn() for s in load.speakers}
        known = {s.name: set(s.turns) for s in load.speakers}
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)

        ready = f"{server.url}/health/ready"
        wait_until(lambda: httpx.get(ready, timeout=2).status_code == 503, timeout_s=SHUTDOWN_DELAY_S,
                   message="readiness to turn 503")
        assert handshake_status(server.url) == 503  # a new session goes elsewhere, its handshake refused
        assert time.monotonic() - signalled < SHUTDOWN_DELAY_S  # both seen while still listening
        load.join(DRAIN_TIMEOUT_S + 30)
        official.join(30)
    assert server.proc.wait(30) == 0, server.log()
    exited = time.monotonic() - signalled

    assert load.errors() == [] and official.error is None, (load.errors(), official.error)
    for speaker in load.speakers:
        turn = in_progress[speaker.name]
        assert turn is not None
        [connection] = speaker.connections
        assert connection.close_code == SERVICE_RESTART, (speaker.name, connection.close_code, connection.close_reason)
        assert set(speaker.turns) == known[speaker.name], speaker.name  # no turn begins once draining
        assert len(turn.completed) == 1 and turn.failed == [], (speaker.name, turn.events)
        assert connection.events[-1] is turn.completed[0]  # the transcript, then the close
        assert [e for e in turn.events if not e.endswith(".delta")] == [
            "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped", "input_audio_buffer.committed",
            f"{TRANSCRIPTION}.completed"], (speaker.name, turn.events)
        assert transcript_of_text(turn.transcript) and turn.version == "a", turn.completed
        assert "".join(turn.deltas) == turn.transcript  # the deltas add up to the final transcript

    closed_after = {s.name: (s.connections[0].closed_at or 0) - signalled for s in load.speakers}
    for speaker in speakers:  # their utterances ended well within the drain timeout
        assert closed_after[speaker.name] < DRAIN_TIMEOUT_S, closed_after
    # the talker's turn was cut at the drain timeout, mid-speech, and transcribed all the same
    assert DRAIN_TIMEOUT_S - 0.5 < closed_after["talker"] < DRAIN_TIMEOUT_S + 5, closed_after
    assert talker.spoken == [(0, 0, False)]  # the server did not wait for the end of its speech
    cut = in_progress["talker"]
    assert cut is not None and 5 < cut.completed[0]["usage"]["seconds"] < 20, cut
    assert exited < SHUTDOWN_DELAY_S + DRAIN_TIMEOUT_S + 10

    assert official.reconnect_codes == [SERVICE_RESTART], official.types  # the SDK would reconnect
    assert official.types[-1] == f"{TRANSCRIPTION}.completed" and official.types.count("error") == 0, official.types
    assert official.types.count(f"{TRANSCRIPTION}.completed") == official.types.count(
        "input_audio_buffer.speech_started")  # its turn in progress at the signal too
    done = official.completed[-1]
    assert transcript_of_text(done.transcript) and getattr(done, "model_version", None) == "a"
