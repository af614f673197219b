"""The words voxswap's interfaces share, each defined once: audio suffixes, languages, job statuses,
history events, and the labels the operator page shows for them.

Storage, routes, the CLI client, the test-model generator and the page (through
``GET /api/ui/vocabulary``) all read these, so a new status or event is added in one place and
every reader either knows it or fails a test.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Literal, get_args

# Every suffix a recording we can decode is likely to carry. The decoder sniffs the content
# (libsndfile, then FFmpeg through PyAV), so a suffix never decides whether a file decodes; it
# decides which files of a folder, a zip or a version's ``smoke/`` count as recordings, and the
# suffix a staged upload keeps on disk. Each of these decodes here: wav, flac, ogg/oga (vorbis),
# opus, mp3, m4a/mp4 (aac), raw aac (adts), webm/mka (matroska), aiff, au, caf and amr.
AUDIO_SUFFIXES: tuple[str, ...] = (
    ".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".m4a", ".mp4", ".aac", ".webm", ".mka",
    ".aif", ".aiff", ".au", ".caf", ".amr",
)

# SenseVoice's language ids: what a request may force ("auto" lets the model detect it).
Language = Literal["auto", "zh", "en", "yue", "ja", "ko", "nospeech"]
LANGUAGES: tuple[Language, ...] = get_args(Language)
LANGUAGE_NAMES: dict[Language, str] = {
    "auto": "auto-detect", "zh": "Chinese (zh)", "en": "English (en)", "yue": "Cantonese (yue)",
    "ja": "Japanese (ja)", "ko": "Korean (ko)", "nospeech": "no speech (nospeech)",
}


class ModelKind(StrEnum):
    """What family a named model is, so which engine loads it; recorded in every version's manifest.
    A model holds versions of one kind only. One kind per model family funasr-onnx runs."""

    SENSEVOICE = "sensevoice"
    PARAFORMER = "paraformer"
    SEACO_PARAFORMER = "seaco-paraformer"
    CONTEXTUAL_PARAFORMER = "contextual-paraformer"
    CT_PUNC = "ct-punc"
    FSMN_VAD = "fsmn-vad"

    @property
    def transcribes(self) -> bool:
        """Audio in, text out: a transcription route may name a model of this kind."""
        return self in ASR_KINDS

    @property
    def takes_hotwords(self) -> bool:
        """Biased towards words a request names (SeACo and contextual Paraformer only)."""
        return self in HOTWORD_KINDS

    @property
    def role(self) -> str:
        """What a model of this kind does, in the words an error message uses ("a punctuation model")."""
        return KIND_ROLES[self]


ASR_KINDS: frozenset[ModelKind] = frozenset({ModelKind.SENSEVOICE, ModelKind.PARAFORMER,
                                             ModelKind.SEACO_PARAFORMER, ModelKind.CONTEXTUAL_PARAFORMER})
HOTWORD_KINDS: frozenset[ModelKind] = frozenset({ModelKind.SEACO_PARAFORMER, ModelKind.CONTEXTUAL_PARAFORMER})
KIND_ROLES: dict[ModelKind, str] = {
    ModelKind.SENSEVOICE: "speech recognition",
    ModelKind.PARAFORMER: "speech recognition",
    ModelKind.SEACO_PARAFORMER: "speech recognition",
    ModelKind.CONTEXTUAL_PARAFORMER: "speech recognition",
    ModelKind.CT_PUNC: "punctuation",
    ModelKind.FSMN_VAD: "voice activity detection",
}


# What a request's ``model`` may say to mean "the default model's live version" (OpenAI clients
# send ``whisper-1``, and the streaming models' names for SSE and Realtime transcription). Model
# names never take these spellings, nor an ``@``: ``NAME@VERSION`` is the one spelling of a pinned
# version.
MODEL_ALIASES: tuple[str, ...] = ("whisper-1", "gpt-4o-transcribe", "gpt-4o-mini-transcribe", "voxswap", "default")
PIN_SEPARATOR = "@"


def pinned_name(model: str, version: str) -> str:
    """``NAME@VERSION``: how answers, events and the history name one version of one model."""
    return f"{model}{PIN_SEPARATOR}{version}"


class JobStatus(StrEnum):
    """Where a batch job is. A job only moves forward, except that one cut short by a restart goes
    back to pending; the three finished statuses are final (and the outcomes of
    ``voxswap_jobs_finished_total``)."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in FINISHED_JOB_STATUSES


FINISHED_JOB_STATUSES: tuple[JobStatus, ...] = (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


class HistoryEvent(StrEnum):
    """Every event the registry's ``history.jsonl`` records (``GET /admin/history``)."""

    ADD = "add"
    REMOVE = "remove"
    SEED_DEMO = "seed_demo"  # the demo version a first start promotes into an empty registry
    PROMOTE = "promote"
    ROLLBACK = "rollback"
    AUTO_ROLLBACK = "auto_rollback"  # the post-swap watch rolled a worse version back
    LOAD = "load"
    UNLOAD = "unload"
    SWAP_FAILED = "swap_failed"  # a version failed verify, load or smoke: the old one kept serving
    REFUSED = "refused"  # a server could not load the current version and moved the pointer off it
    LOAD_RETRY = "load_retry"  # refused here but served by peers: retried, the pointer left alone
    ROLLOUT_ABANDONED = "rollout_abandoned"
    RECYCLE = "recycle"  # a worker over its memory budget restarts itself
    WATCH_START = "watch_start"
    WATCH_PASSED = "watch_passed"
    WATCH_ROLLED_BACK = "watch_rolled_back"
    WATCH_INCONCLUSIVE = "watch_inconclusive"
    WATCH_SUPERSEDED = "watch_superseded"
    WATCH_ROLLBACK_FAILED = "watch_rollback_failed"
    CANARY_START = "canary_start"  # a candidate passed its gate and takes canary or shadow traffic
    CANARY_PASSED = "canary_passed"  # judged no worse; held for an operator (on_pass: hold)
    CANARY_PROMOTED = "canary_promoted"
    CANARY_FAILED = "canary_failed"  # judged worse: dropped, the live version never left
    CANARY_INCONCLUSIVE = "canary_inconclusive"
    CANARY_STOPPED = "canary_stopped"
    CANARY_INTERRUPTED = "canary_interrupted"  # its coordinating worker died; the candidate was dropped
    PIPELINE_SET = "pipeline_set"
    PIPELINE_REMOVE = "pipeline_remove"


# The operator page's words for each value (the page has none of its own).
HISTORY_LABELS: dict[HistoryEvent, str] = {
    HistoryEvent.ADD: "added",
    HistoryEvent.REMOVE: "removed",
    HistoryEvent.SEED_DEMO: "demo promoted",
    HistoryEvent.PROMOTE: "promoted",
    HistoryEvent.ROLLBACK: "rolled back",
    HistoryEvent.AUTO_ROLLBACK: "auto rollback",
    HistoryEvent.LOAD: "loaded",
    HistoryEvent.UNLOAD: "unloaded",
    HistoryEvent.SWAP_FAILED: "refused",
    HistoryEvent.REFUSED: "taken off current",
    HistoryEvent.LOAD_RETRY: "load retried",
    HistoryEvent.ROLLOUT_ABANDONED: "rollout abandoned",
    HistoryEvent.RECYCLE: "worker recycled",
    HistoryEvent.WATCH_START: "watch started",
    HistoryEvent.WATCH_PASSED: "watch passed",
    HistoryEvent.WATCH_ROLLED_BACK: "watch rolled back",
    HistoryEvent.WATCH_INCONCLUSIVE: "watch inconclusive",
    HistoryEvent.WATCH_SUPERSEDED: "watch superseded",
    HistoryEvent.WATCH_ROLLBACK_FAILED: "watch rollback failed",
    HistoryEvent.CANARY_START: "canary started",
    HistoryEvent.CANARY_PASSED: "canary passed",
    HistoryEvent.CANARY_PROMOTED: "canary promoted",
    HistoryEvent.CANARY_FAILED: "canary failed",
    HistoryEvent.CANARY_INCONCLUSIVE: "canary inconclusive",
    HistoryEvent.CANARY_STOPPED: "canary stopped",
    HistoryEvent.CANARY_INTERRUPTED: "canary interrupted",
    HistoryEvent.PIPELINE_SET: "pipeline set",
    HistoryEvent.PIPELINE_REMOVE: "pipeline removed",
}
JOB_STATUS_LABELS: dict[JobStatus, str] = {
    JobStatus.PENDING: "pending",
    JobStatus.RUNNING: "running",
    JobStatus.COMPLETED: "completed",
    JobStatus.FAILED: "failed",
    JobStatus.CANCELLED: "cancelled",
}
