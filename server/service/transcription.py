"""Transcription as the routes see it: bytes in, a labelled, parsed transcript out.

Routes call this service; the service decodes audio, admits the request to the inference pool,
leases a model version inside the inference thread and labels the answer with that version.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from server.lifecycle.policy import LoadedModel, ModelLifecycle
from server.metrics import Metrics
from server.service.inference import InferencePool
from server.settings import Settings
from server.speech import audio, richtext, segmenter

log = logging.getLogger("voxswap.service")


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
    def __init__(self, lifecycle: ModelLifecycle, pool: InferencePool, settings: Settings, metrics: Metrics):
        self.lifecycle = lifecycle
        self.pool = pool
        self.settings = settings
        self.metrics = metrics

    async def transcribe(
        self, data: bytes, *, language: str = "auto", use_itn: bool = False, version: str | None = None
    ) -> Transcription:
        self.pool.check_capacity()
        decoded = await asyncio.to_thread(audio.decode, data, max_seconds=self.settings.max_audio_seconds)
        return await self.pool.run(self.transcribe_samples, decoded.samples, language, use_itn, version)

    def transcribe_samples(
        self, samples: NDArray[np.float32], language: str, use_itn: bool, version: str | None
    ) -> Transcription:
        """Blocking: runs on an inference thread. One lease decides the version that answers the
        whole file, however many segments long audio is cut into."""
        spans = segmenter.split(samples, window_s=self.settings.segment_window_s)
        with self.lifecycle.lease(version) as model:
            started = time.perf_counter()
            raws: list[str] = []
            try:
                for batch in segmenter.batches(spans, self.settings.segment_batch_size):
                    raws += self.run_batch(model, samples, batch, language, use_itn)
            except Exception:
                self.lifecycle.stats.record(model.version, ok=False, empty=False,
                                         latency_s=time.perf_counter() - started)
                raise
            elapsed = time.perf_counter() - started
        result = self.assemble(model.version, samples, spans, raws, elapsed)
        self.lifecycle.stats.record(model.version, ok=True, empty=not result.text, latency_s=elapsed)
        log.debug("transcribed", extra={"event": "transcribed", "version": model.version,
                                        "audio_s": round(result.duration_s, 3), "inference_s": round(elapsed, 4),
                                        "segments": len(spans)})
        return result

    @staticmethod
    def run_batch(model: LoadedModel, samples: NDArray[np.float32], spans: list[segmenter.Span],
                  language: str, use_itn: bool) -> list[str]:
        """Blocking: raw model output for some spans of ``samples``, in one session run."""
        return model.engine.transcribe_batch([samples[s.start : s.end] for s in spans],
                                             language=language, use_itn=use_itn)

    def assemble(self, version: str, samples: NDArray[np.float32], spans: list[segmenter.Span],
                 raws: list[str], elapsed: float) -> Transcription:
        """Segments with their own tags; the file's tags are the most common among voiced ones."""
        duration = len(samples) / audio.SAMPLE_RATE
        self.metrics.inference_duration.labels(version).observe(elapsed)
        self.metrics.audio_seconds.labels(version).inc(duration)
        if duration > 0:
            self.metrics.real_time_factor.labels(version).observe(elapsed / duration)
        parsed = [richtext.parse(raw) for raw in raws]
        voiced = [(span, p) for span, p in zip(spans, parsed, strict=True) if p.text]
        segments = [Segment(i, round(span.start_s, 3), round(span.end_s, 3), p.text, p.language,
                            p.emotion, p.events) for i, (span, p) in enumerate(voiced)]
        tagged = [p for _, p in voiced] or parsed[:1]
        language = _most_common([p.language for p in tagged])
        events = list(dict.fromkeys(e for p in tagged for e in p.events))
        separator = "" if language in ("zh", "yue", "ja") else " "
        return Transcription(
            text=separator.join(s.text for s in segments), raw_text=" ".join(raws), language=language,
            emotion=_most_common([p.emotion for p in tagged]), events=events, model_version=version,
            duration_s=duration, processing_ms=elapsed * 1000, segments=segments,
        )


def _most_common(values: list[str | None]) -> str | None:
    """The most frequent value; on a tie, the one that came first."""
    counts = Counter(v for v in values if v is not None)
    return counts.most_common(1)[0][0] if counts else None
