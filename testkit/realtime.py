"""Realtime transcription clients that speak like microphones, for e2e tests and benchmarks.

A :class:`Speaker` streams utterances (speech, then silence) into ``/v1/realtime?intent=transcription``
in 100 ms appends at real-time pace. It talks through the ``websockets`` library, so it sees what a
client sees: the handshake's status, every event, the close code. It records each connection and
each turn, and after a close with 1012 (a server draining) it connects again and goes on with the
next utterance, as OpenAI's client does when given ``on_reconnecting``; an utterance cut off before
the server announced its speech is spoken again. :class:`RealtimeLoad` runs several speakers on an
event loop in a thread, so a synchronous test can signal servers and run deploys meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.signal import resample_poly
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from server.testing import synth

RATE = 24_000  # the protocol's audio/pcm rate
CHUNK_S = 0.1  # one append: what a browser's audio worklet sends at a time
SERVICE_RESTART = 1012
TRANSCRIPTION = "conversation.item.input_audio_transcription"
Event = dict[str, Any]


def pcm24(samples: NDArray[np.float32]) -> bytes:
    """16 kHz float samples (``server.testing.synth``) as the protocol's 24 kHz PCM16 LE mono."""
    upsampled = resample_poly(samples, 3, 2)
    return bytes((np.clip(upsampled, -1.0, 1.0) * 32767).astype("<i2").tobytes())


def session_update(*, model: str = "default", silence_ms: int = 500) -> Event:
    """The GA ``session.update`` a transcription client sends first."""
    return {"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
        "format": {"type": "audio/pcm", "rate": RATE}, "transcription": {"model": model},
        "turn_detection": {"type": "server_vad", "silence_duration_ms": silence_ms}}}}}


def ws_url(base_url: str) -> str:
    """``http://host:port`` -> the realtime transcription endpoint's ``ws://`` URL."""
    origin = base_url.replace("http://", "ws://", 1).replace("https://", "wss://", 1).rstrip("/")
    return f"{origin}/v1/realtime?intent=transcription"


@dataclass(frozen=True)
class Utterance:
    index: int
    pcm: bytes  # 24 kHz PCM16: the speech, then the silence that ends its turn

    @property
    def seconds(self) -> float:
        return len(self.pcm) / 2 / RATE


def utterance(index: int, *, speech_s: float | None = None, silence_s: float = 1.2, seed: int = 0) -> Utterance:
    """Utterance ``index``: 3 to 4 s of speech-like audio (varying with the index), then silence."""
    speech = speech_s if speech_s is not None else 3.0 + (index % 5) * 0.25
    return Utterance(index, pcm24(np.concatenate([synth.speech_like(speech, seed=seed + index),
                                                  synth.silence(silence_s)])))


@dataclass
class TurnRecord:
    """One turn as the client saw it: announced by ``speech_started`` (or not: a bug to report)."""

    item_id: str
    connection: int
    utterance: int | None  # the utterance being spoken when the turn was announced
    started: bool = False
    events: list[str] = field(default_factory=list)  # the turn's event types, in order
    deltas: list[str] = field(default_factory=list)
    completed: list[Event] = field(default_factory=list)
    failed: list[Event] = field(default_factory=list)

    @property
    def done(self) -> bool:
        return bool(self.completed or self.failed)

    @property
    def transcript(self) -> str | None:
        return str(self.completed[0]["transcript"]) if self.completed else None

    @property
    def version(self) -> str | None:
        return str(self.completed[0].get("model_version")) if self.completed else None


@dataclass
class ConnectionRecord:
    index: int
    opened_at: float
    events: list[Event] = field(default_factory=list)
    close_code: int | None = None  # the server's close frame's code (None: no close frame came)
    close_reason: str = ""
    closed_at: float | None = None

    def types(self) -> list[str]:
        return [e.get("type", "") for e in self.events]


class Speaker:
    """One client speaking utterances one after another until stopped (or, without ``reconnect``,
    until the server closes the connection)."""

    def __init__(self, base_url: str, *, name: str = "speaker", reconnect: bool = True, seed: int = 0,
                 make_utterance: Callable[[int], Utterance] | None = None, connect_timeout_s: float = 60.0):
        self.url = ws_url(base_url)
        self.name = name
        self.reconnect = reconnect
        self.connect_timeout_s = connect_timeout_s
        self._make = make_utterance or (lambda i: utterance(i, seed=seed))
        self.connections: list[ConnectionRecord] = []
        self.turns: dict[str, TurnRecord] = {}
        self.refusals: list[str] = []  # handshakes refused (status or error) before one succeeded
        self.spoken: list[tuple[int, int, bool]] = []  # (utterance, connection, whole utterance sent)
        self.error: BaseException | None = None
        self.speaking: int | None = None  # the utterance being sent now
        self._stop = asyncio.Event()

    # -- what callers read ------------------------------------------------------------------------

    def started_turns(self) -> list[TurnRecord]:
        return [t for t in list(self.turns.values()) if t.started]

    def open_turn(self) -> TurnRecord | None:
        """The turn announced and not yet completed or failed, if any."""
        return next((t for t in self.started_turns() if not t.done), None)

    def completed(self) -> list[Event]:
        """Every ``.completed`` received, in order."""
        kind = f"{TRANSCRIPTION}.completed"
        return [e for c in list(self.connections) for e in list(c.events) if e.get("type") == kind]

    def versions(self) -> list[str | None]:
        """The ``model_version`` of every ``.completed``, in order."""
        return [e.get("model_version") for e in self.completed()]

    def problems(self) -> list[str]:
        """What a user would call a lost or broken turn; empty when every utterance spoken was
        transcribed exactly once, no turn failed, and every connection but the last ended in 1012."""
        found: list[str] = []
        for turn in list(self.turns.values()):
            if not turn.started:
                found.append(f"{turn.item_id}: events without speech_started: {turn.events}")
            elif len(turn.completed) != 1 or turn.failed:
                found.append(f"{turn.item_id} (utterance {turn.utterance}): {len(turn.completed)} completed, "
                             f"{len(turn.failed)} failed: {turn.failed or turn.events}")
        announced = [t.utterance for t in self.started_turns()]
        for index in sorted({u for u, _, _ in self.spoken}):
            if announced.count(index) != 1:
                found.append(f"utterance {index}: {announced.count(index)} turns")
        for connection in self.connections:
            errors = [e for e in connection.events if e.get("type") == "error"]
            if errors:
                found.append(f"connection {connection.index}: error events {errors}")
            if connection is not self.connections[-1] and connection.close_code != SERVICE_RESTART:
                found.append(f"connection {connection.index} closed with {connection.close_code} "
                             f"{connection.close_reason!r}")
        if self.error is not None:
            found.append(f"{type(self.error).__name__}: {self.error}")
        return [f"{self.name}: {p}" for p in found]

    def stop(self) -> None:
        """Finish the utterance in progress (on a new connection if a drain cut it off before its
        turn began), wait for its turn, then close (1000). Loop-thread only."""
        self._stop.set()

    # -- the client -------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            index = 0
            while True:
                ws = await self._connect()
                index = await self._speak(ws, index)
                if not self.reconnect or self.connections[-1].close_code != SERVICE_RESTART:
                    return  # closed by this client (stopped), or by the server for good
                # a drain: connect again, even when stopped, to finish what was being said
        except Exception as exc:  # kept for the test to report; a speaker never dies silently
            self.error = exc

    async def _connect(self) -> ClientConnection:
        """Handshake, retrying refusals (a draining instance answers 503) until the timeout."""
        deadline = time.monotonic() + self.connect_timeout_s
        delay = 0.1
        while True:
            try:
                return await connect(self.url, open_timeout=10, max_size=None, compression=None)
            except (InvalidStatus, InvalidHandshake, OSError, TimeoutError) as exc:
                status = exc.response.status_code if isinstance(exc, InvalidStatus) else None
                self.refusals.append(str(status) if status else type(exc).__name__)
                if time.monotonic() + delay > deadline:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _speak(self, ws: ClientConnection, index: int) -> int:
        """Speak utterances from ``index`` on one connection; returns the next utterance to speak."""
        record = ConnectionRecord(len(self.connections), time.monotonic())
        self.connections.append(record)
        receiver = asyncio.create_task(self._receive(ws, record))
        try:
            await ws.send(json.dumps(session_update()))
            while not receiver.done():
                clip = self._make(index)
                self.speaking = index
                whole = await self._send_paced(ws, clip, receiver)
                self.spoken.append((index, record.index, whole))
                announced = any(t.utterance == index for t in self.started_turns())
                if whole or announced:
                    index += 1  # else the server took none of it (it was draining): say it again
                if not whole:
                    break
                if self._stop.is_set():
                    await self._settle(receiver)
                    await ws.close(1000, "done")
                    break
            await receiver
        finally:
            self.speaking = None
            receiver.cancel()
            await ws.close()  # a no-op once closed; else (an error here) the connection is not left open
        return index

    async def _send_paced(self, ws: ClientConnection, clip: Utterance, receiver: asyncio.Task[None]) -> bool:
        """Send ``clip`` in 100 ms appends on a wall-clock schedule; False if the connection ended first."""
        step = int(RATE * CHUNK_S) * 2
        began = time.monotonic()
        for n, offset in enumerate(range(0, len(clip.pcm), step)):
            delay = began + n * CHUNK_S - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if receiver.done():
                return False
            audio = base64.b64encode(clip.pcm[offset:offset + step]).decode()
            try:
                await ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
            except ConnectionClosed:
                return False
        return True

    async def _settle(self, receiver: asyncio.Task[None], timeout_s: float = 30.0) -> None:
        """Wait until no announced turn is still open (its ``.completed`` or ``.failed`` arrived)."""
        deadline = time.monotonic() + timeout_s
        while self.open_turn() is not None and not receiver.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def _receive(self, ws: ClientConnection, record: ConnectionRecord) -> None:
        try:
            async for message in ws:
                event = json.loads(message)
                record.events.append(event)
                self._on_event(event, record.index)
        except ConnectionClosed:
            pass
        finally:
            record.closed_at = time.monotonic()
            received = ws.protocol.close_rcvd
            if received is not None:
                record.close_code, record.close_reason = received.code, received.reason

    def _on_event(self, event: Event, connection: int) -> None:
        item = event.get("item_id")
        kind = str(event.get("type", ""))
        if not isinstance(item, str):
            return
        turn = self.turns.get(item)
        if turn is None:
            turn = self.turns[item] = TurnRecord(item, connection, self.speaking)
        turn.events.append(kind)
        if kind == "input_audio_buffer.speech_started":
            turn.started = True
        elif kind == f"{TRANSCRIPTION}.delta":
            turn.deltas.append(str(event.get("delta", "")))
        elif kind == f"{TRANSCRIPTION}.completed":
            turn.completed.append(event)
        elif kind == f"{TRANSCRIPTION}.failed":
            turn.failed.append(event)


class RealtimeLoad:
    """Speakers on one event loop in a background thread, started and stopped from synchronous code:
    ``clients`` alike ones (``Speaker`` options as keywords), or the ``speakers`` given."""

    def __init__(self, base_url: str = "", clients: int = 4, *, speakers: list[Speaker] | None = None,
                 **options: Any):
        self.speakers = speakers if speakers is not None else [
            Speaker(base_url, name=f"speaker-{i}", seed=100 * i, **options) for i in range(clients)]
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="realtime-load", daemon=True)

    def __enter__(self) -> RealtimeLoad:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        try:
            self.stop()
        except TimeoutError:
            if exc_type is None:
                raise  # else the test's own failure says more than a stuck speaker

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(asyncio.gather(*(s.run() for s in self.speakers)))
        self._loop.close()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float = 60.0) -> None:
        """Let each speaker finish its utterance and its turn, then close; wait for all of them."""
        for speaker in self.speakers:
            with suppress(RuntimeError):  # the loop is closed: every speaker has ended already
                self._loop.call_soon_threadsafe(speaker.stop)
        self.join(timeout_s)

    def join(self, timeout_s: float = 60.0) -> None:
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError("realtime speakers still running")

    def completed(self) -> int:
        return sum(len(s.completed()) for s in self.speakers)

    def errors(self) -> list[str]:
        return [f"{s.name}: {type(s.error).__name__}: {s.error}" for s in self.speakers if s.error is not None]
