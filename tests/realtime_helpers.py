"""A realtime test client on the official ``openai`` client: send audio (at real-time pace or
faster), collect every server event as a dict, wait for the ones a test needs."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import openai
from numpy.typing import NDArray
from scipy.signal import resample_poly
from websockets.exceptions import ConnectionClosed

from server.speech.audio import decode

Event = dict[str, Any]
TRANSCRIPTION = "conversation.item.input_audio_transcription"
CHUNK_S = 0.1


def pcm(samples: NDArray[np.float32], rate: int = 24_000) -> bytes:
    """16 kHz float samples as 16-bit PCM at ``rate``, as a realtime client sends them."""
    if rate != 16_000:
        samples = resample_poly(samples, rate // 8000, 2).astype(np.float32)
    return (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes()


def espeak(text: str) -> NDArray[np.float32]:
    """Real synthetic speech (espeak-ng), at 16 kHz."""
    wav = subprocess.run(["espeak-ng", "-v", "en", "-s", "160", "--stdout", text], check=True,
                         capture_output=True).stdout
    return decode(wav, max_seconds=60).samples


def session_update(model: str = "default", *, rate: int = 24_000, vad: dict[str, Any] | None = None,
                   manual: bool = False, language: str | None = None) -> Event:
    detection = None if manual else {"type": "server_vad", "silence_duration_ms": 500, **(vad or {})}
    transcription: dict[str, Any] = {"model": model, **({"language": language} if language else {})}
    return {"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
        "format": {"type": "audio/pcm", "rate": rate}, "transcription": transcription,
        "turn_detection": detection}}}}


@dataclass
class Session:
    connection: Any
    events: list[Event] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # monotonic time each event arrived
    raw: list[bytes] = field(default_factory=list)
    close_code: int | None = None
    close_reason: str = ""
    failure: BaseException | None = None
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    async def send(self, event: Event) -> None:
        await self.connection.send(event)

    async def send_raw(self, text: str) -> None:
        await self.connection._connection.send(text)

    async def append(self, samples: NDArray[np.float32], *, rate: int = 24_000, pace: float | None = 1.0) -> None:
        """Send ``samples`` in 100 ms appends; ``pace`` 1.0 is real time, 4.0 four times faster,
        None as fast as possible. Paced by the clock, so the sender's own delays do not add up."""
        raw = pcm(samples, rate)
        step = int(rate * CHUNK_S) * 2
        started = time.monotonic()
        for index, offset in enumerate(range(0, len(raw), step)):
            await self.send({"type": "input_audio_buffer.append",
                             "audio": base64.b64encode(raw[offset : offset + step]).decode()})
            if pace:
                await asyncio.sleep(max(0.0, started + (index + 1) * CHUNK_S / pace - time.monotonic()))

    def of(self, kind: str) -> list[Event]:
        return [e for e in self.events if e["type"] == kind]

    async def wait(self, check: Callable[[list[Event]], bool], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not check(self.events):
            if self.closed.is_set() or time.monotonic() > deadline:
                raise AssertionError(f"events so far: {[e['type'] for e in self.events]} "
                                     f"(closed {self.close_code} {self.close_reason!r} {self.failure!r})")
            await asyncio.sleep(0.02)

    async def wait_count(self, kind: str, count: int, timeout: float = 20.0) -> None:
        await self.wait(lambda events: sum(e["type"] == kind for e in events) >= count, timeout)

    async def _read(self) -> None:
        """Events as the JSON the server sent (the client's typed models only know 24 kHz sessions);
        :attr:`raw` keeps the bytes for a test that parses them with the client's own types."""
        try:
            while True:
                raw = await self.connection.recv_bytes()
                self.raw.append(raw)
                self.events.append(json.loads(raw))
                self.arrivals.append(time.monotonic())
        except ConnectionClosed as exc:
            self.failure = exc
            if exc.rcvd is not None:
                self.close_code, self.close_reason = exc.rcvd.code, exc.rcvd.reason
        except Exception as exc:
            self.failure = exc
            raise
        finally:
            socket = getattr(self.connection, "_connection", None)
            if self.close_code is None and socket is not None and socket.close_code is not None:
                self.close_code, self.close_reason = socket.close_code, socket.close_reason or ""
            self.closed.set()


def turns(session: Session) -> list[tuple[list[str], Event]]:
    """Each finished turn: its deltas' texts and its closing event (.completed or .failed)."""
    deltas: dict[str, list[str]] = {}
    found = []
    for event in session.events:
        if event["type"] == f"{TRANSCRIPTION}.delta":
            deltas.setdefault(event["item_id"], []).append(event["delta"])
        elif event["type"] in (f"{TRANSCRIPTION}.completed", f"{TRANSCRIPTION}.failed"):
            found.append((deltas.get(event["item_id"], []), event))
    return found


@asynccontextmanager
async def realtime(url: str, update: Event | None = None, **query: str) -> AsyncIterator[Session]:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused")
    async with client.realtime.connect(extra_query={"intent": "transcription", **query}) as connection:
        session = Session(connection)
        reader = asyncio.create_task(session._read())
        await session.wait_count("session.created", 1)
        if update is not None:
            await session.send(update)
            await session.wait_count("session.updated", 1)
        try:
            yield session
        finally:
            reader.cancel()
