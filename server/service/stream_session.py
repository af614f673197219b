"""One realtime transcription session: audio in as it is spoken, turns found, transcripts out.

The session is protocol-level state, independent of the WebSocket that carries it
(``server.http.realtime``): the route hands it client events in order and sends what it emits.
Audio is resampled to 16 kHz as it arrives and kept in one buffer with absolute positions; a turn
detector (the session's pipeline's voice activity stage, else an energy detector) marks where
speech starts and stops. A turn takes its leases when it starts (see ``stream_turn``), is cut into
pieces for deltas while it goes on, and ends at the detector's stop, a client commit, the maximum
turn length, or a drain.

``turn_detection: null`` is OpenAI's manual mode: a turn is whatever the client appended between
two commits, with no speech events.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from server.errors import CommitEmpty, VersionNotLoaded, VoxswapError
from server.lifecycle.holder import LoadedModel
from server.lifecycle.models import ModelSet
from server.metrics import Metrics
from server.service import realtime_events as events
from server.service import routing
from server.service.inference import InferencePool
from server.service.routing import Target
from server.service.stream_turn import Turn, TurnDecoder
from server.service.stream_vad import VadTurnDetector
from server.service.transcription import TranscriptionService
from server.settings import Settings
from server.speech import turns
from server.speech.pcm import SAMPLE_RATE, StreamResampler
from server.speech.turns import Boundary, EnergyDetector, TurnDetector
from server.storage.pipelines import PipelineStore
from server.vocab import pinned_name

MIN_PIECE_S = 1.0  # a piece is never cut shorter than this: too little context to decode well
STOP_TAIL_S = 0.2  # audio kept after the end of speech in a turn's last piece


@dataclass(frozen=True)
class StreamServices:
    """What sessions share: one per app."""

    settings: Settings
    models: ModelSet
    pipelines: PipelineStore | None
    service: TranscriptionService
    pool: InferencePool
    metrics: Metrics


class StreamEnded(Exception):
    """The session must end: the WebSocket closes with ``code`` after an ``error`` event saying why."""

    def __init__(self, close_code: int, message: str, *, code: str):
        super().__init__(message)
        self.close_code, self.message, self.code = close_code, message, code


@dataclass(frozen=True)
class TurnDetection:
    """OpenAI's ``server_vad``: threshold (energy detector only), padding and silence, per session."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500


@dataclass(frozen=True)
class SessionConfig:
    model: str = "default"
    language: str = "auto"
    rate: int = 24_000
    turn_detection: TurnDetection | None = field(default_factory=TurnDetection)


class StreamSession:
    def __init__(self, services: StreamServices, emit: Callable[[events.Event], None]):
        self.id = events.new_id("sess")
        self._services = services
        self._settings = services.settings
        self._send = emit
        self.config = SessionConfig()
        self.target: Target | None = None
        self._pin = ExitStack()  # a pinned version's lease, held for the whole session
        self.pinned: LoadedModel | None = None
        self._resampler = StreamResampler(self.config.rate)
        self._detector: TurnDetector | None = None
        self._buffer = np.zeros(0, np.float32)
        self._buffer_start = 0  # absolute position of the buffer's first sample
        self._turn: Turn | None = None
        self._previous_item: str | None = None
        self.draining = False
        self.client_key = ""  # who the client is, for a canary's split (set by the route)
        self.decoder = TurnDecoder(services.service, services.pool, services.metrics, self._emit, self._model_label)

    # -- what the route calls, in the client's order -------------------------------------------------

    def describe(self) -> events.Event:
        """The session object of ``session.created`` and ``session.updated``."""
        config = self.config
        detection = None if config.turn_detection is None else {
            "type": "server_vad", "threshold": config.turn_detection.threshold,
            "prefix_padding_ms": config.turn_detection.prefix_padding_ms,
            "silence_duration_ms": config.turn_detection.silence_duration_ms,
            "detector": "fsmn-vad" if isinstance(self._detector, VadTurnDetector) else "energy"}
        return {"type": "transcription", "id": self.id, "object": "realtime.transcription_session",
                "audio": {"input": {"format": {"type": "audio/pcm", "rate": config.rate},
                                    "transcription": {"model": config.model, "language": config.language},
                                    "turn_detection": detection}}}

    def start(self) -> None:
        self.configure(self.config)
        self._emit({"type": "session.created", "session": self.describe()})

    def configure(self, config: SessionConfig) -> None:
        """Apply ``config`` (a 404-style error for an unknown model leaves the session as it was).
        An open turn ends first, on the settings it began with."""
        target = routing.resolve(self._services.models, config.model, None, self._services.pipelines)
        pin, pinned = ExitStack(), None
        if target.version is not None:  # NAME@VERSION: this version until the session ends
            pinned = pin.enter_context(target.model.lease(target.version))  # a 409 leaves the session as it was
        if self._turn is not None:
            self._end_turn(self._position, stopped=False)
        self._pin.close()
        self._pin, self.pinned = pin, pinned
        if config.rate != self.config.rate:
            self._resampler = StreamResampler(config.rate)
        self.config, self.target = config, target
        self._set_detector(config.turn_detection)

    async def append(self, pcm: NDArray[np.int16]) -> None:
        """A chunk of the client's audio. A VAD model's inference on it runs off the event loop;
        everything else here is cheap and runs on it, so the session's state has one owner."""
        self.check_pin()
        await self.decoder.room()  # a client sending faster than the pieces decode waits here
        samples = self._resampler.feed(pcm)
        if len(samples):
            self._take(samples, await self._detect(samples))

    def send_error(self, exc: VoxswapError, client_event: str | None = None) -> None:
        self._emit(events.error(exc.message, code=exc.code, type_=exc.type, param=exc.param, event_id=client_event))

    def send_updated(self) -> None:
        self._emit({"type": "session.updated", "session": self.describe()})

    def commit(self) -> None:
        if self._turn is None:
            raise CommitEmpty("the input audio buffer holds no turn to commit"
                              + (": with server_vad, turns are committed when speech stops"
                                 if self.config.turn_detection else ""))
        # the resampler's last few milliseconds stay in it and come out with the next append: the
        # buffer and the detector count the same samples, so their positions never drift apart
        self._end_turn(self._position, stopped=False)
        if self._detector is not None:
            self._detector.reset()

    def clear(self) -> None:
        """Throw the buffer away; a turn in progress ends as failed (its speech was announced)."""
        self._resampler.flush()
        if self._turn is not None:
            turn, self._turn = self._turn, None
            turn.fail("input_audio_buffer_cleared", "the client cleared the input audio buffer during the turn")
            self.decoder.piece(turn, np.zeros(0, np.float32), final=True)
        if self._detector is not None:
            self._detector.reset()
        self._buffer_start += len(self._buffer)
        self._buffer = np.zeros(0, np.float32)
        self._emit(events.cleared())

    def begin_drain(self) -> None:
        """Shutting down: no new turn begins; the open one ends as it would (the route bounds it)."""
        self.draining = True

    def end_open_turn(self) -> None:
        """The drain's deadline: commit what is pending now."""
        if self._turn is not None:
            self._end_turn(self._position, stopped=self.config.turn_detection is not None)

    @property
    def in_turn(self) -> bool:
        return self._turn is not None

    def abort_turn(self, code: str, message: str) -> None:
        """The session is ending for a reason of the server's: the open turn ends as failed, saying why."""
        if self._turn is not None:
            turn, self._turn = self._turn, None
            turn.fail(code, message)
            self.decoder.piece(turn, np.zeros(0, np.float32), final=True)

    async def close(self) -> None:
        """The connection is gone: an open turn cannot be delivered; every lease is released."""
        if self._turn is not None:
            turn, self._turn = self._turn, None
            turn.fail("session_closed", "the session ended during the turn")
            self.decoder.piece(turn, np.zeros(0, np.float32), final=True)
        self.decoder.abandoned = True
        await self.decoder.close()
        if isinstance(self._detector, VadTurnDetector):
            self._detector.close()
        self._pin.close()

    # -- inside ------------------------------------------------------------------------------------

    @property
    def _position(self) -> int:
        return self._buffer_start + len(self._buffer)

    def _emit(self, event: events.Event) -> None:
        self._send({"event_id": events.new_id("event"), **event})

    def _model_label(self) -> str:
        return self.target.model.name if self.target is not None else "none"

    def check_pin(self) -> None:
        if self.pinned is not None and self.pinned.drain_expired:
            raise StreamEnded(1001, f"version {self.pinned.version} was retired and its drain timeout passed",
                              code="model_version_retired")

    def _set_detector(self, detection: TurnDetection | None) -> None:
        if isinstance(self._detector, VadTurnDetector):
            self._detector.close()
        self._detector = None
        if detection is None:
            return
        stages = self.target.stages if self.target is not None else None
        if stages is not None and stages.vad is not None:
            self._detector = VadTurnDetector(stages.vad, silence_ms=detection.silence_duration_ms)
        else:
            self._detector = EnergyDetector(threshold=detection.threshold, silence_ms=detection.silence_duration_ms)

    def _take(self, samples: NDArray[np.float32], boundaries: list[Boundary]) -> None:
        """New audio and what the detector found in it: into the buffer, into the open turn."""
        start = self._position
        self._buffer = np.concatenate([self._buffer, samples])
        self._services.metrics.stream_audio.labels(self._model_label()).inc(len(samples) / SAMPLE_RATE)
        manual = self._detector is None  # manual mode: appended audio is a turn until the client commits
        if manual and self._turn is None and not self.draining and len(samples):
            self._begin_turn(start, announce=False)
        for boundary in boundaries:
            self._on_boundary(boundary)
        self._grow_turn()
        self._trim()

    async def _detect(self, samples: NDArray[np.float32]) -> list[Boundary]:
        detector = self._detector
        if detector is None:
            return []
        if not isinstance(detector, VadTurnDetector):
            return detector.feed(samples)
        try:
            return await asyncio.to_thread(detector.feed, samples)
        except VoxswapError as exc:  # the VAD stage serves nothing here now: the energy detector takes over
            detection = self.config.turn_detection or TurnDetection()
            self._detector = EnergyDetector(threshold=detection.threshold, silence_ms=detection.silence_duration_ms)
            self._emit(events.error(f"voice activity detection is unavailable ({exc.message}); "
                                    "turns are detected by energy for the rest of the session",
                                    code="turn_detection_unavailable", type_="server_error"))
            return self._detector.feed(samples)

    def _on_boundary(self, boundary: Boundary) -> None:
        if boundary.kind == "start" and self._turn is None and not self.draining:
            padding = self.config.turn_detection.prefix_padding_ms if self.config.turn_detection else 0
            self._begin_turn(max(self._buffer_start, boundary.sample - padding * SAMPLE_RATE // 1000), announce=True)
        elif boundary.kind == "stop" and self._turn is not None:
            self._end_turn(min(self._position, boundary.sample + int(STOP_TAIL_S * SAMPLE_RATE)), stopped=True,
                           speech_end=boundary.sample)

    def _begin_turn(self, begin: int, *, announce: bool) -> None:
        target = self.target
        assert target is not None
        turn = Turn(events.new_id("item"), begin, self.config.language, None)
        try:
            turn.asr = (target.model, self.pinned or self._lease_asr(turn, target))
            if target.stages is not None and target.stages.punc is not None:
                turn.punc = (target.stages.punc, turn.leases.enter_context(target.stages.punc.lease()))
        except VoxswapError as exc:
            turn.fail(exc.code or "model_unavailable", exc.message)
        if isinstance(self._detector, VadTurnDetector) and self._detector.version is not None:
            turn.vad = pinned_name(self._detector.lifecycle.name, self._detector.version)
        self._turn = turn
        if announce:
            self._emit(events.speech_started(turn.item_id, begin * 1000 // SAMPLE_RATE))

    def _lease_asr(self, turn: Turn, target: Target) -> LoadedModel:
        """The live version, or a canary's candidate for a client in its share, for the whole turn."""
        routed = target.model.canary.route(self.client_key) if target.version is None else None
        try:
            return turn.leases.enter_context(target.model.lease(routed or target.version))
        except VersionNotLoaded:
            if routed is None:
                raise
            return turn.leases.enter_context(target.model.lease())  # the canary ended meanwhile

    def _grow_turn(self) -> None:
        """Cut a piece off the open turn once it is long enough; end a turn at its maximum length."""
        turn = self._turn
        if turn is None:
            return
        turn.samples = self._position - turn.begin
        if turn.samples >= self._settings.realtime_max_turn_s * SAMPLE_RATE:
            self._end_turn(self._position, stopped=self.config.turn_detection is not None)
            if self._detector is not None:
                self._detector.reset()
            return
        open_part = self._slice(turn.cut, self._position)
        if len(open_part) >= self._settings.realtime_segment_s * SAMPLE_RATE:
            cut = turns.quietest_cut(open_part, earliest=int(MIN_PIECE_S * SAMPLE_RATE))
            self.decoder.piece(turn, open_part[:cut].copy())
            turn.cut += cut

    def _end_turn(self, end: int, *, stopped: bool, speech_end: int | None = None) -> None:
        turn, self._turn = self._turn, None
        assert turn is not None
        end = max(end, turn.cut)
        if stopped:
            self._emit(events.speech_stopped(turn.item_id, (speech_end or end) * 1000 // SAMPLE_RATE))
        self._emit(events.committed(turn.item_id, self._previous_item))
        self._previous_item = turn.item_id
        turn.samples, turn.ended_at = end - turn.begin, time.monotonic()
        self.decoder.piece(turn, self._slice(turn.cut, end).copy(), final=True)

    def _slice(self, begin: int, end: int) -> NDArray[np.float32]:
        return self._buffer[max(0, begin - self._buffer_start) : max(0, end - self._buffer_start)]

    def _trim(self) -> None:
        """Keep what an open turn still needs, else the prefix padding a next turn may take."""
        padding = self.config.turn_detection.prefix_padding_ms if self.config.turn_detection else 0
        keep_from = (self._turn.cut if self._turn is not None
                     else self._position - padding * SAMPLE_RATE // 1000 - SAMPLE_RATE)
        drop = min(len(self._buffer), max(0, keep_from - self._buffer_start))
        if drop > SAMPLE_RATE:  # trimming copies: do it in steps of a second or more
            self._buffer = self._buffer[drop:].copy()
            self._buffer_start += drop

