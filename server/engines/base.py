"""What every engine is to the lifecycle, and what each family adds for its callers.

The lifecycle builds, smoke-tests, leases, drains and closes engines without knowing their family:
it needs only :class:`BaseEngine` (the model file, the providers and device it runs on, its ONNX
metadata, ``close``). Callers that use an engine's answer check its family with ``isinstance``
against :class:`AsrEngine` (audio -> text), :class:`PuncEngine` (text -> punctuated text) or
:class:`VadEngine` (audio -> speech segments).

Like the SenseVoice engine, every engine takes float32 16 kHz mono waveforms, never paths: a path
makes funasr-onnx pull in librosa's loader and touch the disk on the request path.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
from numpy.typing import NDArray

from server.engines.session import Session, SessionConfig, building
from server.speech.words import Word
from server.vocab import ModelKind

Waveform = NDArray[np.float32]
SAMPLE_RATE = 16_000  # every engine takes 16 kHz mono
MIN_SAMPLES = 400  # one 25 ms frame at 16 kHz: funasr-onnx's front end fails on anything shorter
MAX_HOTWORD_CHARS = 10  # funasr-onnx pads each hotword to 10 characters and raises past that
MAX_HOTWORDS = 100  # each is embedded on every request; a request is not a vocabulary


class EngineLoadError(Exception):
    """The version's files could not be turned into a working session."""


class EngineInferenceError(Exception):
    """funasr-onnx failed on an input without raising (it logs and returns fewer results): said here."""


class HotwordsError(ValueError):
    """Hotwords sent to a model that cannot use them, or that funasr-onnx cannot take: the caller's
    mistake, which the service answers with a 400."""


class TimestampsUnsupportedError(ValueError):
    """Word timestamps asked of a model whose graph cannot give them (a Paraformer exported without
    the ``us_alphas`` / ``us_cif_peak`` outputs): the caller's request, which the service answers
    with a 400 ("model X does not give timestamps")."""


class BaseEngine:
    """One loaded version of any kind. Subclasses set the fields in their ``__init__`` and keep the
    funasr-onnx model in ``self._model``, which :meth:`close` drops."""

    kind: ClassVar[ModelKind]
    model_file: str
    providers: list[str]
    device: str
    onnxruntime_version: str
    metadata: dict[str, str]
    # per session, in funasr-onnx's order: {"source": the original file, "loaded": the file loaded
    # (relative to the version), "prepared", "optimised_at_load", "reason": why the stored prepared
    # graph was not used as it was (the original loaded instead, or the graph made again)}
    sessions: list[dict[str, Any]]

    def _describe_sessions(self, sessions: list[Session], model_file: str, device: str) -> None:
        """Fill the fields every engine reports from its sessions (the first is its main one)."""
        import onnxruntime

        session = sessions[0].session
        providers = list(session.get_providers())
        self.model_file = model_file
        self.providers = providers
        self.device = device if device != "cpu" and "CUDAExecutionProvider" in providers else "cpu"
        self.onnxruntime_version = onnxruntime.__version__
        self.metadata = dict(session.get_modelmeta().custom_metadata_map)
        self.sessions = [dict(s.info) for s in sessions]

    @property
    def prepared(self) -> bool:
        """Whether every session was built from a prepared graph (mapped weights, no optimisation at load)."""
        return all(s["prepared"] for s in self.sessions)

    def close(self) -> None:
        """Drop the session so its memory can be given back; the engine is unusable afterwards."""
        self.__dict__.pop("_model", None)

    @property
    def closed(self) -> bool:
        return "_model" not in self.__dict__


class AsrEngine(BaseEngine):
    """Speech recognition: raw text per waveform (SenseVoice's includes its tags)."""

    tagged: ClassVar[bool] = False  # the raw text carries SenseVoice's <|lang|><|EMOTION|>... tags

    @property
    def takes_hotwords(self) -> bool:
        return self.kind.takes_hotwords

    def transcribe_batch(self, waveforms: list[Waveform], *, language: str = "auto", use_itn: bool = False,
                         hotwords: str = "") -> list[str]:
        raise NotImplementedError

    def transcribe(self, waveform: Waveform, *, language: str = "auto", use_itn: bool = False,
                   hotwords: str = "") -> str:
        """Raw output for one waveform."""
        return self.transcribe_batch([waveform], language=language, use_itn=use_itn, hotwords=hotwords)[0]

    @property
    def gives_timestamps(self) -> bool:
        """Whether :meth:`transcribe_with_words` can answer (else it raises TimestampsUnsupportedError)."""
        return False

    def transcribe_batch_with_words(
        self, waveforms: list[Waveform], *, language: str = "auto", use_itn: bool = False, hotwords: str = "",
        offsets: Sequence[float] | None = None,
    ) -> list[tuple[str, list[Word]]]:
        """Per waveform: the raw text, exactly what :meth:`transcribe_batch` answers (tags included),
        and its words, timed in seconds, in order, without overlaps, inside the waveform and shifted
        by that waveform's offset (its segment's start in the file; 0 when ``offsets`` is None)."""
        raise TimestampsUnsupportedError(f"this {self.kind} model does not give timestamps")

    def transcribe_with_words(
        self, waveform: Waveform, *, language: str = "auto", use_itn: bool = False, hotwords: str = "",
        offset: float = 0.0,
    ) -> tuple[str, list[Word]]:
        """Raw text and timed words for one waveform (see :meth:`transcribe_batch_with_words`)."""
        return self.transcribe_batch_with_words([waveform], language=language, use_itn=use_itn, hotwords=hotwords,
                                                offsets=[offset])[0]

    def refuse_hotwords(self, hotwords: str) -> None:
        if hotwords.strip():
            raise HotwordsError(f"a {self.kind} model cannot use hotwords (only seaco-paraformer and "
                                "contextual-paraformer models can)")


class PuncEngine(BaseEngine):
    """Punctuation: text in, the same words punctuated out."""

    def punctuate(self, text: str) -> str:
        raise NotImplementedError


class VadEngine(BaseEngine):
    """Voice activity detection: where in a waveform there is speech, as (start_ms, end_ms) pairs."""

    def segments(self, waveform: Waveform) -> list[tuple[int, int]]:
        raise NotImplementedError

    def open_stream(self, *, silence_ms: int) -> VadStreamState:
        """A live stream's own detector state on this engine, ending speech after ``silence_ms``."""
        raise NotImplementedError


class VadStreamState(Protocol):
    def feed(self, samples: Waveform, *, final: bool = False) -> list[tuple[int, int]]:
        """``[start_ms, end_ms]`` pairs in stream time that these samples reveal; -1 for a side not known
        yet (``[start, -1]``) or told before (``[-1, end]``)."""
        ...


def normalise_hotwords(hotwords: str) -> str:
    """Space-separated hotwords as funasr-onnx takes them: single spaces (a doubled space would make
    an empty hotword), each at most 10 characters (funasr-onnx raises on a longer one)."""
    words = hotwords.split()
    too_long = [w for w in words if len(w) > MAX_HOTWORD_CHARS]
    if too_long:
        raise HotwordsError(f"hotword {too_long[0][:40]!r} is longer than {MAX_HOTWORD_CHARS} characters; "
                            "funasr-onnx takes words of up to 10 characters, separated by spaces")
    if len(words) > MAX_HOTWORDS:
        raise HotwordsError(f"{len(words)} hotwords: at most {MAX_HOTWORDS} per request")
    return " ".join(words)


def offsets_for(waveforms: Sequence[Waveform], offsets: Sequence[float] | None) -> list[float]:
    """One offset per waveform: ``offsets`` checked for length, or zeros."""
    if offsets is None:
        return [0.0] * len(waveforms)
    if len(offsets) != len(waveforms):
        raise ValueError(f"{len(offsets)} offsets for {len(waveforms)} waveforms")
    return [float(o) for o in offsets]


def device_id(device: str) -> str:
    """funasr-onnx's device id for ``cpu``, ``cuda`` or ``cuda:N``."""
    return "-1" if device == "cpu" else (device.split(":", 1)[1] if ":" in device else "0")


def load_funasr(class_name: str, model_dir: Path, *, model_file: str, threads: int, device: str,
                config: SessionConfig | None = None, quiet: tuple[type[Warning], ...] = (RuntimeWarning,),
                ) -> tuple[Any, list[Session]]:
    """One funasr-onnx model class (``class_name`` of ``funasr_onnx``) built on a version folder, the
    same way for every family, and its sessions (the main one first).

    The sessions are built by :mod:`server.engines.session` (explicit options; a prepared graph where
    ``config`` names one), never by funasr-onnx: its class runs its own ``__init__`` (config, front
    end, tokenizer) while the session class it looks up is swapped for ours (see that module), so
    no session is ever built from the original file and then thrown away. Before that, its cached
    am.mvn statistics are dropped (funasr-onnx caches them by path; a version removed and re-added
    under one name must not reuse the old ones); the warnings in ``quiet`` are ignored; any failure
    is an :class:`EngineLoadError` (funasr-onnx and onnxruntime raise many unrelated types).
    """
    import funasr_onnx
    from funasr_onnx.utils.frontend import load_cmvn

    load_cmvn.cache_clear()
    try:
        with warnings.catch_warnings(), building(model_dir, threads=threads, device=device,
                                                 config=config or SessionConfig()) as sessions:
            for category in quiet:
                warnings.simplefilter("ignore", category)
            model = getattr(funasr_onnx, class_name)(
                model_dir=str(model_dir), quantize=model_file == "model_quant.onnx", intra_op_num_threads=threads,
                device_id=device_id(device))
    except Exception as exc:
        raise EngineLoadError(f"{type(exc).__name__}: {exc}") from exc
    if not sessions:  # funasr-onnx (pinned) changed how it builds sessions: say so rather than guess
        raise EngineLoadError(f"funasr-onnx's {class_name} built its sessions itself; voxswap cannot configure them")
    return model, sessions
