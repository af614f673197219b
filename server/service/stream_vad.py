"""A pipeline's voice activity stage as a realtime session's turn detector (online FSMN-VAD).

The detector follows the stage's live version between turns and keeps one version for a whole
turn: while nobody speaks it leases the live version for each chunk only, so an idle session never
holds up that model's drain, and a new version takes over at the next chunk with fresh state;
once speech starts, the chunk's lease is kept until the speech stops, so the version that found a
turn's start also finds its end.
"""

from __future__ import annotations

from contextlib import ExitStack

import numpy as np
from numpy.typing import NDArray

from server.engines.base import VadEngine, VadStreamState
from server.errors import InvalidRequest
from server.lifecycle.holder import LoadedModel
from server.lifecycle.policy import ModelLifecycle
from server.speech.pcm import SAMPLE_RATE
from server.speech.turns import Boundary

SAMPLES_PER_MS = SAMPLE_RATE // 1000


class VadTurnDetector:
    def __init__(self, lifecycle: ModelLifecycle, *, silence_ms: int):
        self.lifecycle = lifecycle
        self.silence_ms = silence_ms
        self._stream: VadStreamState | None = None
        self._version: str | None = None  # the version the stream's state belongs to
        self._offset = 0  # absolute stream position where the current VAD stream began
        self._position = 0  # samples fed so far (absolute)
        self._turn = ExitStack()  # the lease kept while speech goes on
        self._held: LoadedModel | None = None

    @property
    def version(self) -> str | None:
        return self._version

    def feed(self, samples: NDArray[np.float32]) -> list[Boundary]:
        """Blocking (one ONNX call per chunk): run it off the event loop."""
        with ExitStack() as chunk:
            model = self._held or chunk.enter_context(self.lifecycle.lease())
            if self._stream is None or model.version != self._version:
                self._open(model)
            assert self._stream is not None
            pairs = self._stream.feed(samples)
            self._position += len(samples)
            found: list[Boundary] = []
            for start_ms, end_ms in pairs:
                if start_ms >= 0:
                    found.append(Boundary("start", self._offset + start_ms * SAMPLES_PER_MS))
                    if self._held is None:
                        self._held, self._turn = model, chunk.pop_all()  # this version until the speech stops
                if end_ms >= 0:
                    found.append(Boundary("stop", self._offset + end_ms * SAMPLES_PER_MS))
                    self._release()
            return found

    def reset(self) -> None:
        """Forget speech in progress: the next chunk starts a fresh stream on the live version."""
        self._release()
        self._stream = None

    def close(self) -> None:
        self._release()

    def _open(self, model: LoadedModel) -> None:
        engine = model.engine
        if not isinstance(engine, VadEngine):
            raise InvalidRequest(f"model {self.lifecycle.name!r} is not a voice activity detector", param="model")
        self._stream = engine.open_stream(silence_ms=self.silence_ms)
        self._version, self._offset = model.version, self._position

    def _release(self) -> None:
        self._held = None
        self._turn.close()
