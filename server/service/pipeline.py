"""The stages of a pipeline around speech recognition: voice activity detection cuts the audio,
punctuation restores the sentences. :meth:`TranscriptionService.transcribe_samples` runs them, each
under one lease for the whole request (see there). Each stage's outcome feeds its own model's
stats, so a stage's post-swap watch and canary judge it on pipeline traffic too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from server.engines.base import PuncEngine, VadEngine
from server.errors import InvalidRequest
from server.lifecycle.holder import LoadedModel
from server.lifecycle.policy import ModelLifecycle
from server.speech import segmenter


@dataclass(frozen=True)
class Stages:
    """The live lifecycles of one pipeline's stages."""

    pipeline: str
    asr: ModelLifecycle
    vad: ModelLifecycle | None = None
    punc: ModelLifecycle | None = None


def vad_spans(lifecycle: ModelLifecycle, model: LoadedModel, samples: NDArray[np.float32], *,
              window_s: float) -> list[segmenter.Span]:
    """The voice activity stage's segments as spans for the speech recognition stage."""
    engine = model.engine
    if not isinstance(engine, VadEngine):
        raise InvalidRequest(f"model {lifecycle.name!r} is not a voice activity detector", param="model")
    started = time.perf_counter()
    try:
        segments = engine.segments(samples)
    except Exception:
        lifecycle.stats.record(model.version, ok=False, empty=False, latency_s=time.perf_counter() - started)
        raise
    lifecycle.stats.record(model.version, ok=True, empty=not segments, latency_s=time.perf_counter() - started)
    return segmenter.from_segments(segments, samples, window_s=window_s)


def punctuate(lifecycle: ModelLifecycle, model: LoadedModel, texts: list[str]) -> list[str]:
    """Each segment's text punctuated on its own: a segment is a stretch of speech between pauses."""
    engine = model.engine
    if not isinstance(engine, PuncEngine):
        raise InvalidRequest(f"model {lifecycle.name!r} is not a punctuation model", param="model")
    started = time.perf_counter()
    try:
        done = [engine.punctuate(text) for text in texts]
    except Exception:
        lifecycle.stats.record(model.version, ok=False, empty=False, latency_s=time.perf_counter() - started)
        raise
    lifecycle.stats.record(model.version, ok=True, empty=False, latency_s=time.perf_counter() - started)
    return done
