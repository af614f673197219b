"""A realtime turn and the decoder that turns its pieces into deltas and one final transcript.

A turn leases its speech recognition version (and its punctuation stage's) when it begins and
keeps the lease until its ``.completed`` or ``.failed`` is sent: a swap meanwhile waits for the
turn (bounded by the drain timeout) and the whole turn is the work of the version that began it.

While speech goes on, the session cuts the turn into pieces (at the quietest point once the open
part reaches ``realtime_segment_s``); each piece is decoded once, on the inference pool like any
request, and sent as a delta. The final transcript is the pieces' texts joined, so the deltas of a
turn always add up to its ``.completed`` transcript, and finishing a turn only costs its last
piece. The decoder runs one piece at a time per session, in order, so a session's events keep the
order of its audio.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from server.errors import VoxswapError
from server.metrics import Metrics
from server.service import realtime_events as events
from server.service.inference import InferencePool
from server.service.transcription import Held, TranscriptionService
from server.speech.pcm import SAMPLE_RATE
from server.speech.richtext import join_texts
from server.vocab import pinned_name

log = logging.getLogger("voxswap.realtime")
MIN_PIECE_SAMPLES = SAMPLE_RATE // 10  # a last piece shorter than 100 ms after others adds no words
CLIENT_ENDINGS = ("session_closed", "input_audio_buffer_cleared")  # turns the client ended, not the server
MAX_QUEUED_PIECES = 8  # beyond this, the session stops reading its client until the decoder catches up


@dataclass(eq=False)
class Turn:
    item_id: str
    begin: int  # absolute stream sample where the turn's audio begins
    language: str
    asr: Held | None  # None when no version could be leased (``failure`` says why)
    punc: Held | None = None
    vad: str | None = None  # NAME@VERSION of the voice activity stage that found it, if any
    leases: ExitStack = field(default_factory=ExitStack)
    cut: int = 0  # absolute sample where the next piece begins
    started_at: float = field(default_factory=time.monotonic)
    ended_at: float | None = None
    first_delta_at: float | None = None
    texts: list[str] = field(default_factory=list)
    language_found: str | None = None
    failure: tuple[str, str] | None = None  # (code, message)
    samples: int = 0  # the turn's length so far

    def __post_init__(self) -> None:
        self.cut = self.begin

    def fail(self, code: str, message: str) -> None:
        if self.failure is None:
            self.failure = (code, message)


@dataclass
class _Job:
    turn: Turn
    samples: NDArray[np.float32]
    final: bool


class TurnDecoder:
    """One session's decoding, in order: pieces to deltas, each turn's end to ``.completed`` or ``.failed``."""

    def __init__(self, service: TranscriptionService, pool: InferencePool, metrics: Metrics,
                 emit: Callable[[events.Event], None], model: Callable[[], str]):
        self._service = service
        self._pool = pool
        self._metrics = metrics
        self._emit = emit
        self._model = model  # the session's model name, for metric labels
        self._jobs: asyncio.Queue[_Job | None] = asyncio.Queue()
        self._pending = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self._progress = asyncio.Condition()
        self.abandoned = False  # the client went away: release leases, decode nothing more
        self._task = asyncio.create_task(self._run(), name="voxswap-realtime-decoder")

    def piece(self, turn: Turn, samples: NDArray[np.float32], *, final: bool = False) -> None:
        self._pending += 1
        self.idle.clear()
        self._jobs.put_nowait(_Job(turn, samples, final))

    async def room(self) -> None:
        """Wait while ``MAX_QUEUED_PIECES`` pieces wait to be decoded: a client may send audio faster
        than real time (a recording through a realtime session), but never more than the server can
        hold; its WebSocket simply stops being read meanwhile."""
        async with self._progress:
            await self._progress.wait_for(lambda: self._pending < MAX_QUEUED_PIECES)

    async def close(self) -> None:
        """Finish (or, when abandoned, skip) what is queued, release every lease, stop."""
        self._jobs.put_nowait(None)
        await asyncio.shield(self._task)

    async def _run(self) -> None:
        while (job := await self._jobs.get()) is not None:
            try:
                await self._decode(job)
            except Exception:  # never leave a turn holding its lease because of a bug here
                log.exception("realtime decoding failed", extra={"event": "realtime_decode_error"})
                job.turn.fail("server_error", "the server could not decode this turn")
                if job.final:
                    self._end(job.turn)
            finally:
                self._pending -= 1
                if self._pending == 0:
                    self.idle.set()
                async with self._progress:
                    self._progress.notify_all()

    async def _decode(self, job: _Job) -> None:
        turn = job.turn
        short = job.final and turn.texts and len(job.samples) < MIN_PIECE_SAMPLES
        if not self.abandoned and turn.failure is None and turn.asr is not None and len(job.samples) and not short:
            try:
                result = await self._pool.run_bounded(functools.partial(
                    self._service.transcribe_piece, turn.asr, job.samples, language=turn.language, punc=turn.punc))
            except VoxswapError as exc:
                turn.fail(exc.code or "transcription_failed", exc.message)
            else:
                self._add_text(turn, result.text, result.language)
        if job.final:
            self._end(turn)

    def _add_text(self, turn: Turn, text: str, language: str | None) -> None:
        if not text:
            return
        before = join_texts(turn.texts)
        turn.texts.append(text)
        turn.language_found = turn.language_found or language
        if not self.abandoned:
            if turn.first_delta_at is None:
                turn.first_delta_at = time.monotonic()
                self._metrics.stream_first_delta.labels(self._model()).observe(turn.first_delta_at - turn.started_at)
            self._emit(events.delta(turn.item_id, join_texts(turn.texts)[len(before):]))

    def _end(self, turn: Turn) -> None:
        """The turn's one closing event, then its leases go."""
        try:
            if self.abandoned:
                turn.fail("session_closed", "the session ended before the turn was transcribed")
            elif turn.failure is not None:
                self._emit(events.failed(turn.item_id, turn.failure[1], code=turn.failure[0]))
            elif turn.asr is not None:
                lifecycle, model = turn.asr
                versions = {"asr": pinned_name(lifecycle.name, model.version)}
                if turn.vad:
                    versions["vad"] = turn.vad
                if turn.punc is not None:
                    versions["punc"] = pinned_name(turn.punc[0].name, turn.punc[1].version)
                self._emit(events.completed(
                    turn.item_id, join_texts(turn.texts), seconds=turn.samples / SAMPLE_RATE, model=lifecycle.name,
                    model_version=model.version, language=turn.language_found,
                    model_versions=versions if len(versions) > 1 else None))
                if turn.ended_at is not None:
                    self._metrics.stream_finalize.labels(self._model()).observe(time.monotonic() - turn.ended_at)
            outcome = ("abandoned" if turn.failure is not None and turn.failure[0] in CLIENT_ENDINGS
                       else "failed" if turn.failure is not None or turn.asr is None else "completed")
            self._metrics.stream_turns.labels(self._model(), outcome).inc()
        finally:
            turn.leases.close()
