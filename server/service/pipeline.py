"""The stages of a pipeline around speech recognition: voice activity detection cuts the audio,
punctuation restores the sentences. :meth:`TranscriptionService.transcribe_samples` runs them, each
under one lease for the whole request (see there). Each stage's outcome feeds its own model's
stats, so a stage's post-swap watch and canary judge it on pipeline traffic too.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from server.engines.base import AsrEngine, PuncEngine, VadEngine
from server.errors import InvalidRequest, NotReady, VoxswapError
from server.lifecycle.holder import LoadedModel
from server.lifecycle.models import ModelSet
from server.lifecycle.policy import ModelLifecycle
from server.lifecycle.smoke import punctuation_error_rate
from server.settings import Settings
from server.speech import audio, richtext, segmenter
from server.speech.richtext import char_error_rate
from server.storage.pipelines import Pipeline, PipelineStore


@dataclass(frozen=True)
class Stages:
    """The live lifecycles of one pipeline's stages."""

    pipeline: str
    asr: ModelLifecycle
    vad: ModelLifecycle | None = None
    punc: ModelLifecycle | None = None


def vad_spans(lifecycle: ModelLifecycle, model: LoadedModel, samples: NDArray[np.float32], *,
              window_s: float, record: bool = True) -> list[segmenter.Span]:
    """The voice activity stage's segments as spans for the speech recognition stage. ``record``:
    the outcome counts for the stage's watch and canary (requests do; jobs and gate runs do not)."""
    engine = model.engine
    if not isinstance(engine, VadEngine):
        raise InvalidRequest(f"model {lifecycle.name!r} is not a voice activity detector", param="model")
    with _recorded(lifecycle, model, record) as outcome:
        segments = engine.segments(samples)
        outcome["empty"] = not segments
    return segmenter.from_segments(segments, samples, window_s=window_s)


def punctuate(lifecycle: ModelLifecycle, model: LoadedModel, texts: list[str], *, record: bool = True) -> list[str]:
    """Each segment's text punctuated on its own: a segment is a stretch of speech between pauses."""
    engine = model.engine
    if not isinstance(engine, PuncEngine):
        raise InvalidRequest(f"model {lifecycle.name!r} is not a punctuation model", param="model")
    with _recorded(lifecycle, model, record):
        return [engine.punctuate(text) for text in texts]


@contextmanager
def _recorded(lifecycle: ModelLifecycle, model: LoadedModel, record: bool) -> Iterator[dict[str, bool]]:
    """A stage's outcome and time into its model's stats (when ``record``); the block may mark the
    outcome empty."""
    started, outcome = time.perf_counter(), {"empty": False}
    try:
        yield outcome
    except Exception:
        if record:
            lifecycle.stats.record(model.version, ok=False, empty=False, latency_s=time.perf_counter() - started)
        raise
    if record:
        lifecycle.stats.record(model.version, ok=True, empty=outcome["empty"], latency_s=time.perf_counter() - started)


class PipelineGate:
    """A new version of any stage passes every pipeline that uses its model before it serves: each
    pipeline's golden clips through all its stages, the candidate in its stage and the live
    versions of the others. (The stage's own smoke test ran first.)"""

    def __init__(self, models: ModelSet, pipelines: PipelineStore, settings: Settings):
        self.models = models
        self.pipelines = pipelines
        self.settings = settings

    def check(self, model: str, candidate: LoadedModel) -> str | None:
        """Why ``candidate`` (a version of ``model``) fails a pipeline's golden clip, or None."""
        for found in self.pipelines.using(model):
            for golden in found.smoke:
                try:
                    got = self._run(found, model, candidate, self.pipelines.clip_path(golden))
                except NotReady:
                    break  # another stage serves nothing here yet (this process is starting): nothing to compare
                except (VoxswapError, OSError) as exc:
                    return f"pipeline {found.name!r}: its golden clip could not run: {exc}"
                cer = char_error_rate(golden["text"], got)  # words only: punctuation is judged apart
                # the punctuation, where the words came out the same (where they differ, CER judges)
                marks = punctuation_error_rate(golden["text"], got) if found.punc else None
                limit = self.settings.smoke_cer_threshold
                if cer > limit or (marks is not None and marks > limit):
                    return (f"pipeline {found.name!r}: its golden clip {Path(golden['audio']).name} gave {got[:80]!r}, "
                            f"expected {golden['text'][:80]!r} (CER {cer:.2f}"
                            + (f", punctuation {marks:.2f} different)" if marks is not None else ")"))
        return None

    def _run(self, found: Pipeline, model: str, candidate: LoadedModel, clip: Path) -> str:
        samples = audio.decode(clip.read_bytes(), max_seconds=self.settings.max_audio_seconds).samples
        with ExitStack() as leases:
            stage = {role: candidate if name == model else leases.enter_context(self.models.get(name).lease())
                     for role, name in found.stages().items()}
            spans = (vad_spans(self.models.get(found.vad), stage["vad"], samples,
                               window_s=self.settings.segment_window_s, record=False) if found.vad
                     else segmenter.split(samples, window_s=self.settings.segment_window_s))
            engine = stage["asr"].engine
            if not isinstance(engine, AsrEngine):
                return ""
            raws = engine.transcribe_batch([samples[s.start:s.end] for s in spans], language="auto", use_itn=False)
            texts = [richtext.parse(raw).text if engine.tagged else " ".join(raw.split()) for raw in raws]
            if found.punc:
                texts = punctuate(self.models.get(found.punc), stage["punc"], [t for t in texts if t], record=False)
            return richtext.join_texts(texts)
