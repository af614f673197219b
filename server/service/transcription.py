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

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from server.engines.base import (
    MAX_HOTWORD_CHARS,
    MAX_HOTWORDS,
)
from server.errors import InvalidRequest, VersionNotLoaded
from server.lifecycle.holder import LoadedModel
from server.lifecycle.models import ModelSet
from server.lifecycle.policy import ModelLifecycle
from server.metrics import Metrics
from server.service import pipeline
from server.service.inference import InferencePool
from server.service.pipeline import Stages
from server.service.shadow import ShadowRunner
from server.service.transcript import FileTranscription, Segment, Transcription, run_together
from server.settings import Settings
from server.speech import audio, segmenter
from server.speech.richtext import join_texts
from server.vocab import ModelKind, pinned_name

log = logging.getLogger("voxswap.service")
Held = tuple[ModelLifecycle, LoadedModel]  # a model and the version of it a caller holds a lease on


@dataclass(frozen=True)
class _Request:
    """A plain request (no pipeline, hotwords or timestamps), as it waits to be batched."""

    data: bytes
    model: ModelLifecycle
    language: str
    use_itn: bool
    version: str | None
    client_key: str


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
        if stages is None and not hotwords.strip() and not timestamps:  # the plain request: it batches
            request = _Request(data, lifecycle, language, use_itn, version, client_key)
            result: Transcription = await self.pool.run_batched(
                (lifecycle.name, language, use_itn, version), self._transcribe_together, request)
            return result
        return await self.pool.run(self._decode_and_transcribe, data, language, use_itn, version,
                                   lifecycle, client_key, hotwords, stages, timestamps)

    def _transcribe_together(self, requests: Sequence[_Request]) -> list[Transcription | Exception | None]:
        """Blocking, on an inference thread: requests of one model, language and pin that were
        queued together, decoded one by one and run as shared session calls, one per version a
        canary's split gives them (``run_together``). Each outcome is its request's own: audio that
        does not decode fails that request only."""
        outcomes: list[Transcription | Exception | None] = [None] * len(requests)
        groups: dict[str | None, list[tuple[int, NDArray[np.float32], str | None]]] = {}
        for index, request in enumerate(requests):
            try:
                samples = self.decode(request.data)
            except Exception as exc:
                outcomes[index] = exc
                continue
            routed = request.model.canary.route(request.client_key) if request.version is None else None
            groups.setdefault(routed or request.version, []).append((index, samples, routed))
        lifecycle, first = requests[0].model, requests[0]
        self.metrics.batch_size.labels(lifecycle.name).observe(len(requests))
        for version, members in groups.items():
            split = members[0][2] is not None  # a canary's split chose this version
            try:
                files, elapsed = self._run_group(lifecycle, version, [samples for _, samples, _ in members],
                                                 first.language, first.use_itn, routed=split)
            except Exception as exc:
                for index, _, _ in members:
                    outcomes[index] = exc
                continue
            for (index, samples, _), file in zip(members, files, strict=True):
                result = outcomes[index] = file.result()
                lifecycle.stats.record(result.model_version, ok=True, empty=not result.text, latency_s=elapsed)
                if requests[index].version is None and not split:
                    self._mirror(lifecycle, samples, first.language, first.use_itn, result)
        return outcomes

    def _run_group(self, lifecycle: ModelLifecycle, version: str | None, waves: list[NDArray[np.float32]],
                   language: str, use_itn: bool, *, routed: bool) -> tuple[list[FileTranscription], float]:
        """One lease for the group; a canary's candidate that went away meanwhile leaves it to the live
        version (as :meth:`transcribe_samples` does). A failure counts against the version that ran."""
        try:
            with lifecycle.lease(version) as held:
                return self._together(lifecycle, held, waves, language, use_itn)
        except VersionNotLoaded:
            if not routed:
                raise
        with lifecycle.lease() as held:
            return self._together(lifecycle, held, waves, language, use_itn)

    def _together(self, lifecycle: ModelLifecycle, held: LoadedModel, waves: list[NDArray[np.float32]],
                  language: str, use_itn: bool) -> tuple[list[FileTranscription], float]:
        files = [self.file(samples, language=language, use_itn=use_itn, model=lifecycle, held=held)
                 for samples in waves]
        started = time.perf_counter()
        try:
            elapsed = run_together(files, held, language=language, use_itn=use_itn,
                                   batch_size=self.settings.batch_max_size)
        except InvalidRequest:
            raise
        except Exception:
            for _ in files:
                lifecycle.stats.record(held.version, ok=False, empty=False, latency_s=time.perf_counter() - started)
            raise
        return files, elapsed

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
        if version is None and routed is None and not hotwords.strip():
            self._mirror(lifecycle, samples, language, use_itn, result)
        return result

    def _mirror(self, lifecycle: ModelLifecycle, samples: NDArray[np.float32], language: str, use_itn: bool,
                result: Transcription) -> None:
        """A shadow's copy of a request the live version answered, when a shadow runs."""
        if (mirror := lifecycle.canary.mirror()) is not None:
            canary_id, candidate = mirror
            self.shadow.submit(lifecycle, canary_id, candidate, samples, language, use_itn, result.text)

    def _run_candidate(self, lifecycle: ModelLifecycle, version: str, samples: NDArray[np.float32],
                       language: str, use_itn: bool) -> tuple[str, float]:
        """A shadow's mirror: the candidate's transcript of the same samples, and its inference time."""
        file = self.file(samples, language=language, use_itn=use_itn, version=version, model=lifecycle)
        file.run()
        return file.result().text, file.elapsed_s

    def _transcribe_on(
        self, lifecycle: ModelLifecycle, samples: NDArray[np.float32], language: str, use_itn: bool,
        version: str | None, hotwords: str = "", *, spans: list[segmenter.Span] | None = None,
        watched: bool = True, timestamps: bool = False, held: LoadedModel | None = None,
        on_batch: Callable[[list[str]], None] | None = None,
    ) -> Transcription:
        """Blocking: runs on an inference thread. One lease (or the ``held`` one) decides the version that answers the
        whole file, however many segments long audio is cut into.

        Only requests feed the post-swap watch (``watched``): a batch job's minutes of audio are no
        request latency, and counting them would judge a new version by the jobs it happened to get.
        """
        file = self.file(samples, language=language, use_itn=use_itn, version=version, model=lifecycle,
                         hotwords=hotwords, spans=spans, timestamps=timestamps, held=held)
        file.on_batch = on_batch
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
             spans: list[segmenter.Span] | None = None, timestamps: bool = False,
             held: LoadedModel | None = None) -> FileTranscription:
        """Blocking (it cuts the audio unless ``spans`` are given): one file's transcription, to run at
        the caller's pace."""
        return FileTranscription(self.settings, model or self.models.default, samples, language, use_itn, version,
                                 hotwords, spans, timestamps, held)

    def transcribe_piece(self, held: Held, samples: NDArray[np.float32], *, language: str,
                         punc: Held | None = None) -> Transcription:
        """Blocking: one piece of a realtime turn (the audio between two cuts) as one segment, on the
        versions the turn leased when it began, punctuated when the session's pipeline has a
        punctuation stage. Watched like a request: a realtime turn is live traffic."""
        lifecycle, model = held
        result = self._transcribe_on(lifecycle, samples, language, False, None, spans=[segmenter.Span(0, len(samples))],
                                     held=model)
        if punc is not None and result.text:
            result.text = pipeline.punctuate(punc[0], punc[1], [result.text])[0]
        return result

    async def transcribe_events(self, samples: NDArray[np.float32], on_texts: Callable[[list[str]], None], *,
                                language: str,
                                version: str | None, model: ModelLifecycle, client_key: str = "", hotwords: str = "",
                                stages: Stages | None = None) -> Transcription:
        """:meth:`transcribe`, telling ``on_texts`` each batch's segment texts as the batch ends (on
        the event loop, in order), for an SSE stream. A pipeline punctuates its whole answer at the
        end, so its texts come all at once, after its last segment."""
        self.check_request(stages.asr if stages is not None else model, hotwords=hotwords)
        loop = asyncio.get_running_loop()

        def tell(texts: list[str]) -> None:
            loop.call_soon_threadsafe(on_texts, texts)

        def run() -> Transcription:
            if stages is not None:
                result = self.run_pipeline(stages, samples, language, False, version, hotwords)
                tell([segment.text for segment in result.segments])
                return result
            with model.lease(version or model.canary.route(client_key)) as held:  # one version, all batches
                return self._transcribe_on(model, samples, language, False, None, hotwords, held=held, on_batch=tell)

        return await self.pool.run(run)


__all__ = ["FileTranscription", "Segment", "Transcription", "TranscriptionService"]
