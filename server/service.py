"""Transcription as the routes see it: bytes in, a labelled, parsed transcript out.

Routes call this service; the service decodes audio, admits the request to the inference pool,
leases a model version inside the inference thread and labels the answer with that version.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from server import audio, richtext
from server.inference import InferencePool
from server.loader import ModelLoader
from server.metrics import Metrics
from server.settings import Settings


@dataclass
class Segment:
    id: int
    start: float
    end: float
    text: str
    language: str | None
    emotion: str | None
    events: list[str]


@dataclass
class Transcription:
    text: str
    raw_text: str
    language: str | None
    emotion: str | None
    events: list[str]
    model_version: str
    duration_s: float
    processing_ms: float
    segments: list[Segment] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["processing_ms"] = round(self.processing_ms, 2)
        data["duration_s"] = round(self.duration_s, 3)
        return data


class TranscriptionService:
    def __init__(self, loader: ModelLoader, pool: InferencePool, settings: Settings, metrics: Metrics):
        self.loader = loader
        self.pool = pool
        self.settings = settings
        self.metrics = metrics

    async def transcribe(
        self, data: bytes, *, language: str = "auto", use_itn: bool = False, version: str | None = None
    ) -> Transcription:
        decoded = await asyncio.to_thread(audio.decode, data, max_seconds=self.settings.max_audio_seconds)
        return await self.pool.run(self.transcribe_samples, decoded.samples, language, use_itn, version)

    def transcribe_samples(
        self, samples: NDArray[np.float32], language: str, use_itn: bool, version: str | None
    ) -> Transcription:
        """Blocking: runs on an inference thread. The lease decides the version that answers."""
        duration = len(samples) / audio.SAMPLE_RATE
        with self.loader.lease(version) as model:
            started = time.perf_counter()
            raw = model.engine.transcribe(samples, language=language, use_itn=use_itn)
            elapsed = time.perf_counter() - started
        parsed = richtext.parse(raw)
        self.metrics.inference_duration.labels(model.version).observe(elapsed)
        self.metrics.audio_seconds.labels(model.version).inc(duration)
        if duration > 0:
            self.metrics.real_time_factor.labels(model.version).observe(elapsed / duration)
        segment = Segment(0, 0.0, round(duration, 3), parsed.text, parsed.language, parsed.emotion,
                          parsed.events)
        return Transcription(
            text=parsed.text, raw_text=raw, language=parsed.language, emotion=parsed.emotion,
            events=parsed.events, model_version=model.version, duration_s=duration,
            processing_ms=elapsed * 1000, segments=[segment] if parsed.text else [],
        )
