"""One file through one version of a model: cut into segments, decoded batch by batch, parsed into a
labelled transcript. The service (``server.service.transcription``) runs it for requests, batch
jobs, SSE streams and realtime turns; it never chooses a version itself.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from server.engines.base import AsrEngine, HotwordsError, TimestampsUnsupportedError
from server.errors import InvalidRequest
from server.lifecycle.holder import LoadedModel
from server.lifecycle.policy import ModelLifecycle
from server.settings import Settings
from server.speech import audio, richtext, segmenter
from server.speech.richtext import join_texts
from server.speech.words import Word

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
    model: str  # the named model that answered
    model_version: str  # the bare version of it (answers name both; NAME@VERSION spells the pair)
    duration_s: float
    processing_ms: float
    segments: list[Segment] = field(default_factory=list)
    words: list[dict[str, Any]] | None = None  # {word, start, end}, when asked for (``timestamps``)
    pipeline: str | None = None  # the pipeline that ran it; then ``model`` is its speech recognition stage
    model_versions: dict[str, str] = field(default_factory=dict)  # a pipeline's stages: role -> NAME@VERSION

    def to_json(self) -> dict[str, Any]:
        """Built field by field: ``dataclasses.asdict`` deep-copies every value, and cost a tenth of
        a millisecond per request here."""
        data: dict[str, Any] = {
            "text": self.text, "raw_text": self.raw_text, "language": self.language, "emotion": self.emotion,
            "events": self.events, "model": self.model, "model_version": self.model_version,
            "duration_s": round(self.duration_s, 3), "processing_ms": round(self.processing_ms, 2),
            "segments": [vars(segment) for segment in self.segments]}
        if self.words is not None:
            data["words"] = self.words
        if self.pipeline is not None:
            data["pipeline"], data["model_versions"] = self.pipeline, self.model_versions
        return data


class FileTranscription:
    """One file through the model: cut into segments once, then run batch by batch on one version.

    The one pipeline of routes and batch jobs. Every call to :meth:`run` leases the version the
    file is pinned to (the one asked for, else the one its first batch got), so a result is always
    the work of the one version it records. A request runs all its batches in one call, under one
    lease; a batch job runs one batch per call and yields to interactive requests between them, so
    a swap never waits for a long job to drain: the job's next lease fails with VersionNotLoaded,
    and it calls :meth:`restart`.
    """

    def __init__(self, settings: Settings, model: ModelLifecycle, samples: NDArray[np.float32],
                 language: str, use_itn: bool, version: str | None, hotwords: str = "",
                 spans: list[segmenter.Span] | None = None, timestamps: bool = False,
                 held: LoadedModel | None = None):
        """``held``: a version the caller already leased (a realtime turn, an SSE stream), run on
        without a lease of its own: after a flip the old version can no longer be leased by name,
        but a lease taken before the flip still holds it."""
        self._held = held
        self.on_batch: Callable[[list[str]], None] | None = None  # each batch's segment texts, as it ends
        self._hotwords = hotwords
        self._timestamps = timestamps
        self._words: list[list[Word]] = []  # per segment, in step with the raw texts, when timestamps
        self._tagged = True  # SenseVoice's raw text carries tags; set from the engine that runs the file
        self._model = model
        self._samples = samples
        self._language = language
        self._use_itn = use_itn
        self._asked = version
        # a pipeline's voice activity detector cuts the audio; without one, the energy splitter
        self.spans = spans if spans is not None else segmenter.split(samples,
                                                                     window_s=settings.segment_window_s)
        self._batches = segmenter.batches(self.spans, settings.segment_batch_size)
        self.version: str | None = None  # the version running this file, once a lease got one
        self.elapsed_s = 0.0  # inference time so far, leases and queueing excluded
        self._raws: list[str] = []
        self._done = 0

    @property
    def finished(self) -> bool:
        return self._done == len(self._batches)

    @property
    def progress(self) -> float:
        return self._done / len(self._batches) if self._batches else 1.0

    def run(self, batches: int | None = None) -> None:
        """Blocking: the next ``batches`` batches (all that are left by default) under one lease."""
        todo = self._batches[self._done :][:batches]
        lease: AbstractContextManager[LoadedModel] = (
            nullcontext(self._held) if self._held is not None else self._model.lease(self.version or self._asked))
        with lease as model:
            engine = model.engine
            if not isinstance(engine, AsrEngine):  # a model of another kind named as the default, say
                raise InvalidRequest(f"model {self._model.name!r} is a {engine.kind.role} model ({engine.kind}), "
                                     "not speech recognition; use it in a pipeline", param="model")
            self.version = model.version
            self._tagged = engine.tagged
            started = time.perf_counter()
            try:
                for batch in todo:
                    waves = [self._samples[s.start : s.end] for s in batch]
                    if self._timestamps:
                        pairs = engine.transcribe_batch_with_words(
                            waves, language=self._language, use_itn=self._use_itn, hotwords=self._hotwords,
                            offsets=[s.start_s for s in batch])
                        self._raws += [raw for raw, _ in pairs]
                        self._words += [words for _, words in pairs]
                    else:
                        self._raws += engine.transcribe_batch(waves, language=self._language, use_itn=self._use_itn,
                                                              hotwords=self._hotwords)
                    self._done += 1
                    if self.on_batch is not None:
                        self.on_batch([self._parse(raw).text for raw in self._raws[-len(batch):]])
            except HotwordsError as exc:
                raise InvalidRequest(str(exc), param="hotwords") from exc
            except TimestampsUnsupportedError as exc:
                raise InvalidRequest(f"model {self._model.name!r} does not give timestamps: {exc}",
                                     param="timestamps") from exc
            finally:
                self.elapsed_s += time.perf_counter() - started

    def waves(self) -> list[NDArray[np.float32]]:
        """The file's segments as the model takes them (views, no copies)."""
        return [self._samples[s.start : s.end] for s in self.spans]

    def finish(self, model: LoadedModel, raws: list[str], elapsed_s: float) -> None:
        """The file ran elsewhere, in a batch with other files (:func:`run_together`), on ``model``."""
        assert len(raws) == len(self.spans)
        self.version, self._raws, self.elapsed_s = model.version, raws, elapsed_s
        self._tagged = model.engine.tagged if isinstance(model.engine, AsrEngine) else True
        self._done = len(self._batches)

    def restart(self) -> None:
        """Throw away the batches done: the version they ran on is gone, so none of them counts."""
        self.version = None
        self.elapsed_s = 0.0
        self._raws = []
        self._words = []
        self._done = 0

    def _parse(self, raw: str) -> richtext.RichTranscript:
        """A segment's raw model output as text and tags (a Paraformer's is the text itself)."""
        return richtext.parse(raw) if self._tagged else richtext.RichTranscript(" ".join(raw.split()), raw)

    def result(self) -> Transcription:
        """The finished file's transcript, labelled with its version and counted in the metrics.

        Segments keep their own tags; the file's tags are the most common among voiced ones. A
        model without tags (Paraformer) answers text only: no language, emotion or events.
        """
        assert self.version is not None and self.finished, "result() of a file not run to its end"
        version, spans, raws, elapsed = self.version, self.spans, self._raws, self.elapsed_s
        duration = len(self._samples) / audio.SAMPLE_RATE
        self._model.metrics.transcribed(version, inference_s=elapsed, audio_s=duration)
        parsed = [self._parse(raw) for raw in raws]
        voiced = [(span, p) for span, p in zip(spans, parsed, strict=True) if p.text]
        segments = [Segment(i, round(span.start_s, 3), round(span.end_s, 3), p.text, p.language,
                            p.emotion, p.events) for i, (span, p) in enumerate(voiced)]
        tagged = [p for _, p in voiced] or parsed[:1]
        language = _most_common([p.language for p in tagged])
        events = list(dict.fromkeys(e for p in tagged for e in p.events))
        separator = "" if language in ("zh", "yue", "ja") else " "
        text = separator.join(s.text for s in segments) if self._tagged else join_texts([s.text for s in segments])
        if log.isEnabledFor(logging.DEBUG):  # the extra dict is not built for a line nobody logs
            log.debug("transcribed", extra={"event": "transcribed", "model": self._model.name, "version": version,
                                            "audio_s": round(duration, 3), "inference_s": round(elapsed, 4),
                                            "segments": len(spans)})
        return Transcription(
            text=text, raw_text=" ".join(raws), language=language,
            emotion=_most_common([p.emotion for p in tagged]), events=events, model=self._model.name,
            model_version=version,
            duration_s=duration, processing_ms=elapsed * 1000, segments=segments,
            words=[asdict(w) for ws, p in zip(self._words, parsed, strict=True) if p.text for w in ws]
            if self._timestamps else None,
        )


def run_together(files: list[FileTranscription], model: LoadedModel, *, language: str, use_itn: bool,
                 batch_size: int) -> float:
    """Blocking: the segments of several files (requests that arrived together) through one version
    in as few session runs as possible, shortest first, so that each run pads little: a run holds at
    most ``batch_size`` segments and never one over twice as long as its shortest. Returns the
    inference time, which every file reports as its own (they shared it)."""
    engine = model.engine
    if not isinstance(engine, AsrEngine):
        raise InvalidRequest(f"version {model.version} is a {engine.kind.role} model, not speech recognition",
                             param="model")
    pieces = sorted(((len(wave), index, segment, wave) for index, file in enumerate(files)
                     for segment, wave in enumerate(file.waves())), key=lambda piece: piece[0])
    raws: list[list[str]] = [[""] * len(file.spans) for file in files]
    started = time.perf_counter()
    run: list[tuple[int, int, int, NDArray[np.float32]]] = []
    for piece in [*pieces, None]:
        if run and (piece is None or len(run) == batch_size or piece[0] > 2 * max(run[0][0], 1)):
            texts = engine.transcribe_batch([wave for *_, wave in run], language=language, use_itn=use_itn)
            for (_, index, segment, _), text in zip(run, texts, strict=True):
                raws[index][segment] = text
            run = []
        if piece is not None:
            run.append(piece)
    elapsed = time.perf_counter() - started
    for file, file_raws in zip(files, raws, strict=True):
        file.finish(model, file_raws, elapsed)
    return elapsed


def _most_common(values: list[str | None]) -> str | None:
    """The most frequent value; on a tie, the one that came first."""
    counts = Counter(v for v in values if v is not None)
    return counts.most_common(1)[0][0] if counts else None
