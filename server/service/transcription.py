"""Transcription as routes and batch jobs see it: audio in, a labelled, parsed transcript out.

Routes call this service; the service admits the request to the inference pool, then decodes the
audio and leases a model version inside the inference thread, and labels the answer with that
version. Batch jobs drive the same :class:`FileTranscription` one batch at a time (see
``server.service.jobs``).

Any speech recognition kind answers (``ModelKind.transcribes``). SenseVoice's raw output carries
tags (language, emotion, events) parsed into fields; a Paraformer's is the text itself. A model of
another kind (punctuation, voice activity detection) is refused with a 400 before any audio is
decoded, as are hotwords sent to a model that cannot use them.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from server.engines.base import (
    MAX_HOTWORD_CHARS,
    MAX_HOTWORDS,
    AsrEngine,
    HotwordsError,
    TimestampsUnsupportedError,
)
from server.errors import InvalidRequest, VersionNotLoaded
from server.lifecycle.models import ModelSet
from server.lifecycle.policy import ModelLifecycle
from server.metrics import Metrics
from server.service import pipeline
from server.service.inference import InferencePool
from server.service.pipeline import Stages
from server.service.shadow import ShadowRunner
from server.settings import Settings
from server.speech import audio, richtext, segmenter
from server.speech.richtext import join_texts
from server.speech.words import Word
from server.vocab import ModelKind, pinned_name

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
        data = asdict(self)
        if self.pipeline is None:
            del data["pipeline"], data["model_versions"]
        if self.words is None:
            del data["words"]
        data["processing_ms"] = round(self.processing_ms, 2)
        data["duration_s"] = round(self.duration_s, 3)
        return data


class TranscriptionService:
    def __init__(self, models: ModelSet, pool: InferencePool, settings: Settings, metrics: Metrics):
        self.models = models
        self.pool = pool
        self.settings = settings
        self.metrics = metrics
        self.shadow = ShadowRunner(settings.shadow_queue, self._run_candidate)
        self._kinds: dict[str, ModelKind] = {}  # a model's kind never changes once it has one

    def kind(self, model: ModelLifecycle) -> ModelKind | None:
        """The model's kind (None while it holds no version), read from disk once per model."""
        known = self._kinds.get(model.name)
        if known is None and (known := model.registry.kind()) is not None:
            self._kinds[model.name] = known
        return known

    def check_request(self, model: ModelLifecycle, *, hotwords: str = "") -> None:
        """A 400 for a request its model cannot answer: a model that does not transcribe, or hotwords
        for one that takes none. Cheap (no audio is read), so it runs before admission."""
        kind = self.kind(model)
        if kind is None:
            return  # no version yet: the lease answers (503)
        if not kind.transcribes:
            raise InvalidRequest(f"model {model.name!r} is a {kind.role} model ({kind}), not speech recognition; "
                                 "use it in a pipeline", param="model")
        if hotwords.strip() and not kind.takes_hotwords:
            raise InvalidRequest(f"model {model.name!r} cannot use hotwords (it is a {kind} model; only "
                                 "seaco-paraformer and contextual-paraformer models take them)", param="hotwords")

    def prompt_hotwords(self, model: ModelLifecycle, prompt: str | None) -> str:
        """OpenAI's ``prompt`` as hotwords: for a model that takes them, its words that fit (up to 10
        characters each, the first 100); for any other model nothing, since OpenAI clients send a
        prompt routinely and it is no hotword request. Free text, so nothing in it is refused."""
        kind = self.kind(model)
        if not prompt or kind is None or not kind.takes_hotwords:
            return ""
        return " ".join([word for word in prompt.split() if len(word) <= MAX_HOTWORD_CHARS][:MAX_HOTWORDS])

    async def transcribe(
        self, data: bytes, *, language: str = "auto", use_itn: bool = False, version: str | None = None,
        model: ModelLifecycle | None = None, client_key: str = "", hotwords: str = "", stages: Stages | None = None,
        timestamps: bool = False,
    ) -> Transcription:
        """Decoding is admitted work: it runs on the inference thread, in the same job as the model.

        Decoding a small upload can cost seconds of CPU (ten minutes of 384 kHz FLAC is 230 million
        samples to resample), so it takes a slot of the pool like inference does: concurrent decodes
        are bounded by ``inference_workers`` (and the waiting ones by ``max_queue``, beyond which the
        answer is 503 before a byte is decoded), they compete with inference for the same cores
        rather than beside it, ``inference_timeout_s`` covers both, and a request costs one thread
        hop. A separate decoding pool would add a second queue to size and a second hop.

        ``model`` is the named model to run (the default model's when None), ``version`` a pinned
        loaded version of it (its live version when None, or a canary's candidate for a client in
        its share, by ``client_key``). ``hotwords``: space-separated words to bias a SeACo or
        contextual Paraformer towards (a 400 for other kinds).
        """
        lifecycle = stages.asr if stages is not None else model or self.models.default
        self.check_request(lifecycle, hotwords=hotwords)
        return await self.pool.run(self._decode_and_transcribe, data, language, use_itn, version,
                                   lifecycle, client_key, hotwords, stages, timestamps)

    def decode(self, data: bytes) -> NDArray[np.float32]:
        """Blocking: an upload as the 16 kHz samples the model sees; a clear 4xx for bad audio."""
        return audio.decode(data, max_seconds=self.settings.max_audio_seconds).samples

    def _decode_and_transcribe(self, data: bytes, language: str, use_itn: bool, version: str | None,
                               model: ModelLifecycle, client_key: str, hotwords: str,
                               stages: Stages | None = None, timestamps: bool = False) -> Transcription:
        if stages is not None:  # a pipeline: every stage leased once; no canary split for its stages yet
            return self.run_pipeline(stages, self.decode(data), language, use_itn, version, hotwords,
                                     timestamps=timestamps)
        return self.transcribe_samples(self.decode(data), language, use_itn, version, model, client_key,
                                       hotwords=hotwords, timestamps=timestamps)

    def transcribe_samples(
        self, samples: NDArray[np.float32], language: str, use_itn: bool, version: str | None,
        model: ModelLifecycle | None = None, client_key: str = "", *, hotwords: str = "", timestamps: bool = False,
    ) -> Transcription:
        """Blocking: the version asked for, else a canary's split decides; a shadow mirrors the
        request once the live answer is known. A candidate that went away between the split and
        the lease (its canary ended) leaves the request to the live version, never to a 409.
        A request with hotwords is not mirrored: the shadow runs without them, so its transcript
        would differ for that reason alone and count against the candidate."""
        lifecycle = model or self.models.default
        routed = lifecycle.canary.route(client_key) if version is None else None
        try:
            result = self._transcribe_on(lifecycle, samples, language, use_itn, routed or version, hotwords,
                                         timestamps=timestamps)
        except VersionNotLoaded:
            if routed is None:
                raise
            result = self._transcribe_on(lifecycle, samples, language, use_itn, None, hotwords, timestamps=timestamps)
        if (version is None and routed is None and not hotwords.strip()
                and (mirror := lifecycle.canary.mirror()) is not None):
            canary_id, candidate = mirror
            self.shadow.submit(lifecycle, canary_id, candidate, samples, language, use_itn, result.text)
        return result

    def _run_candidate(self, lifecycle: ModelLifecycle, version: str, samples: NDArray[np.float32],
                       language: str, use_itn: bool) -> tuple[str, float]:
        """A shadow's mirror: the candidate's transcript of the same samples, and its inference time."""
        file = self.file(samples, language=language, use_itn=use_itn, version=version, model=lifecycle)
        file.run()
        return file.result().text, file.elapsed_s

    def _transcribe_on(
        self, lifecycle: ModelLifecycle, samples: NDArray[np.float32], language: str, use_itn: bool,
        version: str | None, hotwords: str = "", *, spans: list[segmenter.Span] | None = None,
        watched: bool = True, timestamps: bool = False,
    ) -> Transcription:
        """Blocking: runs on an inference thread. One lease decides the version that answers the
        whole file, however many segments long audio is cut into.

        Only requests feed the post-swap watch (``watched``): a batch job's minutes of audio are no
        request latency, and counting them would judge a new version by the jobs it happened to get.
        """
        file = self.file(samples, language=language, use_itn=use_itn, version=version, model=lifecycle,
                         hotwords=hotwords, spans=spans, timestamps=timestamps)
        try:
            file.run()
        except InvalidRequest:
            raise  # the request's mistake (hotwords), not the version's
        except Exception:
            if watched and file.version is not None:  # a refused lease is no outcome of any version
                lifecycle.stats.record(file.version, ok=False, empty=False, latency_s=file.elapsed_s)
            raise
        result = file.result()
        if watched:
            lifecycle.stats.record(result.model_version, ok=True, empty=not result.text, latency_s=file.elapsed_s)
        return result

    def run_pipeline(self, stages: Stages, samples: NDArray[np.float32], language: str, use_itn: bool,
                     version: str | None, hotwords: str, *, watched: bool = True,
                     timestamps: bool = False) -> Transcription:
        """Blocking: voice activity, speech recognition, punctuation, each stage leased once and held
        until the answer is assembled, so a stage swapped meanwhile never mixes two of its versions
        into one answer; the answer names each stage's version. Requests and batch jobs (the whole
        file in one call, ``watched=False``: see :meth:`_transcribe_on`) both run it."""
        versions: dict[str, str] = {}
        with ExitStack() as leases:
            vad = leases.enter_context(stages.vad.lease()) if stages.vad is not None else None
            punc = leases.enter_context(stages.punc.lease()) if stages.punc is not None else None
            spans = None
            if stages.vad is not None and vad is not None:
                spans = pipeline.vad_spans(stages.vad, vad, samples, window_s=self.settings.segment_window_s,
                                           record=watched)
                versions["vad"] = pinned_name(stages.vad.name, vad.version)
            result = self._transcribe_on(stages.asr, samples, language, use_itn, version, hotwords, spans=spans,
                                         watched=watched, timestamps=timestamps)
            versions["asr"] = pinned_name(stages.asr.name, result.model_version)
            if stages.punc is not None and punc is not None:
                texts = pipeline.punctuate(stages.punc, punc, [s.text for s in result.segments], record=watched)
                for segment, text in zip(result.segments, texts, strict=True):
                    segment.text = text
                result.text = join_texts(texts)
                versions["punc"] = pinned_name(stages.punc.name, punc.version)
        result.pipeline, result.model_versions = stages.pipeline, versions
        return result

    def file(self, samples: NDArray[np.float32], *, language: str, use_itn: bool,
             version: str | None = None, model: ModelLifecycle | None = None, hotwords: str = "",
             spans: list[segmenter.Span] | None = None, timestamps: bool = False) -> FileTranscription:
        """Blocking (it cuts the audio unless ``spans`` are given): one file's transcription, to run at
        the caller's pace."""
        return FileTranscription(self, model or self.models.default, samples, language, use_itn, version,
                                 hotwords, spans, timestamps)


class FileTranscription:
    """One file through the model: cut into segments once, then run batch by batch on one version.

    The one pipeline of routes and batch jobs. Every call to :meth:`run` leases the version the
    file is pinned to (the one asked for, else the one its first batch got), so a result is always
    the work of the one version it records. A request runs all its batches in one call, under one
    lease; a batch job runs one batch per call and yields to interactive requests between them, so
    a swap never waits for a long job to drain: the job's next lease fails with VersionNotLoaded,
    and it calls :meth:`restart`.
    """

    def __init__(self, service: TranscriptionService, model: ModelLifecycle, samples: NDArray[np.float32],
                 language: str, use_itn: bool, version: str | None, hotwords: str = "",
                 spans: list[segmenter.Span] | None = None, timestamps: bool = False):
        self._service = service
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
                                                                     window_s=service.settings.segment_window_s)
        self._batches = segmenter.batches(self.spans, service.settings.segment_batch_size)
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
        with self._model.lease(self.version or self._asked) as model:
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
            except HotwordsError as exc:
                raise InvalidRequest(str(exc), param="hotwords") from exc
            except TimestampsUnsupportedError as exc:
                raise InvalidRequest(f"model {self._model.name!r} does not give timestamps: {exc}",
                                     param="timestamps") from exc
            finally:
                self.elapsed_s += time.perf_counter() - started

    def restart(self) -> None:
        """Throw away the batches done: the version they ran on is gone, so none of them counts."""
        self.version = None
        self.elapsed_s = 0.0
        self._raws = []
        self._words = []
        self._done = 0

    def result(self) -> Transcription:
        """The finished file's transcript, labelled with its version and counted in the metrics.

        Segments keep their own tags; the file's tags are the most common among voiced ones. A
        model without tags (Paraformer) answers text only: no language, emotion or events.
        """
        assert self.version is not None and self.finished, "result() of a file not run to its end"
        version, spans, raws, elapsed = self.version, self.spans, self._raws, self.elapsed_s
        duration = len(self._samples) / audio.SAMPLE_RATE
        self._model.metrics.transcribed(version, inference_s=elapsed, audio_s=duration)
        parsed = [richtext.parse(raw) if self._tagged else richtext.RichTranscript(" ".join(raw.split()), raw)
                  for raw in raws]
        voiced = [(span, p) for span, p in zip(spans, parsed, strict=True) if p.text]
        segments = [Segment(i, round(span.start_s, 3), round(span.end_s, 3), p.text, p.language,
                            p.emotion, p.events) for i, (span, p) in enumerate(voiced)]
        tagged = [p for _, p in voiced] or parsed[:1]
        language = _most_common([p.language for p in tagged])
        events = list(dict.fromkeys(e for p in tagged for e in p.events))
        separator = "" if language in ("zh", "yue", "ja") else " "
        text = separator.join(s.text for s in segments) if self._tagged else join_texts([s.text for s in segments])
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


def _most_common(values: list[str | None]) -> str | None:
    """The most frequent value; on a tie, the one that came first."""
    counts = Counter(v for v in values if v is not None)
    return counts.most_common(1)[0][0] if counts else None
