"""The shapes every JSON route answers with, as pydantic models: ``/docs`` is the contract.

The page, the CLI client, deploy.sh and OpenAI clients read these bodies, so each route declares
its model and ``tests/test_openapi.py`` checks real answers against ``/openapi.json``. Most
shapes mirror a ``to_json()`` further down (transcription, jobs, manifests, swap reports) without
importing it: the layers below own their data, this module owns what a client is promised.

``Closed`` shapes forbid unknown keys, so a field added below without being documented here fails
that test (and, on routes that return a dict, the request) instead of drifting silently.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- errors -------------------------------------------------------------------------------------


class ErrorDetail(Closed):
    message: str
    type: str = Field(description="OpenAI's error type, e.g. invalid_request_error or server_error")
    param: str | None = Field(description="The request field at fault, when there is one")
    code: str = Field(description="Stable and machine-readable, e.g. not_found, swap_failed, overloaded")
    request_id: str | None = Field(description="Also in the X-Request-Id header; quote it in a bug report")
    report: SwapReport | None = Field(None, description="Only on swap_failed: how far the refused swap got")


class ErrorEnvelope(Closed):
    """Every failure, whatever raised it, in OpenAI's envelope plus the request id."""

    error: ErrorDetail


ERRORS = {
    400: "Invalid request: a bad field, an empty or unreadable upload, a bad version name",
    401: "Missing or wrong admin bearer token",
    403: "The admin API is disabled (no admin token is configured)",
    404: "No such model version or job",
    409: "Conflicts with the current state; `x-should-retry: false` unless it may pass later",
    413: "The upload or its audio is too large",
    415: "The upload is not audio this server can decode",
    422: "A version was refused (verification, load or smoke test); the old one keeps serving",
    503: "Not ready, overloaded or shutting down; see Retry-After",
    504: "Inference took longer than the server's timeout",
}


TEXT_BODIES = {"text/plain": {"schema": {"type": "string"}}, "text/vtt": {"schema": {"type": "string"}}}
VERSION_HEADER = {"X-Model-Version": {"description": "The version that answered", "schema": {"type": "string"}}}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: the envelope under each status it can answer with, and as the
    default, since any route can fail unexpectedly (500) or meet a 404/405 in the same envelope."""
    documented: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorEnvelope, "description": ERRORS[status]} for status in statuses
    }
    documented["default"] = {"model": ErrorEnvelope, "description": "Any other failure, in the same envelope"}
    return documented


# -- transcription --------------------------------------------------------------------------------


class Segment(Closed):
    """One voiced span of a long recording, with its own SenseVoice tags."""

    id: int
    start: float = Field(description="Seconds from the start of the audio")
    end: float
    text: str
    language: str | None
    emotion: str | None
    events: list[str]


class WordStamp(Closed):
    word: str
    start: float = Field(description="Seconds from the start of the audio")
    end: float


class Transcription(Closed):
    text: str
    raw_text: str = Field(description="The model's output with its SenseVoice tags, segments joined")
    language: str | None = Field(description="From SenseVoice's tags; null for a model without them (Paraformer)")
    emotion: str | None
    events: list[str]
    model: str = Field(description="The named model that answered (also the X-Model header)")
    model_version: str = Field(description="The version of it that answered (also the X-Model-Version header)")
    duration_s: float
    processing_ms: float
    segments: list[Segment]
    words: list[WordStamp] | None = Field(None, description="With timestamps=true: every word, in order")
    pipeline: str | None = Field(None, description="The pipeline that ran, when one was named (then `model` is "
                                                   "its speech recognition stage)")
    model_versions: dict[str, str] | None = Field(None, description="A pipeline's stages: vad, asr, punc -> "
                                                                    "NAME@VERSION")


class OpenAITranscription(Closed):
    """``response_format=json``: OpenAI's shape, text only."""

    text: str


class OpenAIVerboseTranscription(Closed):
    """``response_format=verbose_json``: OpenAI's fields plus SenseVoice's tags and the version."""

    task: Literal["transcribe"]
    language: str | None
    duration: float
    text: str
    segments: list[Segment]
    emotion: str | None
    events: list[str]
    model: str
    model_version: str
    pipeline: str | None = None
    model_versions: dict[str, str] | None = None
    words: list[WordStamp] | None = Field(None, description="With timestamp_granularities[]=word")


# -- health and status ----------------------------------------------------------------------------


class ModelReadiness(Closed):
    ready: bool
    version: str | None
    state: str = Field(description="not_loaded, loading, ready, swapping or unloading")
    reason: str
    required: bool = Field(description="Counts for this readiness answer (VOXSWAP_READY_MODELS or ?model=)")


class Health(Closed):
    status: Literal["healthy"]
    model_version: str | None = Field(description="The default model's live version")
    state: str = Field(description="The default model's: not_loaded, loading, ready, swapping or unloading")
    models: dict[str, ModelReadiness] = Field(description="Every model by name")


class HealthUnavailable(Closed):
    """503 with ``Retry-After``: what a load balancer needs to take this instance out, and why."""

    status: Literal["unavailable"]
    model_version: str | None
    state: str
    reason: str
    models: dict[str, ModelReadiness]


class Liveness(Closed):
    status: Literal["alive"]


class SmokeClipResult(Closed):
    clip: str = Field(description="The clip's file, or builtin:speech / builtin:silence / builtin:punctuation")
    expected: str | None = Field(description="The golden answer (fsmn-vad: its segments as JSON); null for built-ins")
    got: str
    cer: float | None = Field(description="Character error rate (ct-punc: the share of punctuation that differs); "
                                          "null when nothing was expected")
    latency_s: float
    passed: bool
    reason: str


class SmokeReport(Closed):
    """The check a version passed (or failed) before it was allowed to serve."""

    passed: bool
    golden: bool = Field(description="False: the version has no golden clip; only the built-in check ran")
    clips: list[SmokeClipResult]
    duration_s: float
    reason: str
    summary: str


class StagedVersion(Closed):
    rollout_id: str
    version: str
    status: str = Field(description="loading, ready or failed")
    reason: str
    outcome: str


class RecentRequests(Closed):
    """One version's recent requests in one worker, as parallel lists (what the watch judges)."""

    at: list[float]
    empty: list[bool]
    latency: list[float]
    ok: list[bool]


class Worker(Closed):
    """A process serving from this registry, from its last heartbeat."""

    pid: int
    host: str
    version: str | None
    state: str
    in_flight: int
    rss_bytes: int
    started_at: float
    heartbeat_at: float
    draining: bool
    staged: StagedVersion | None
    stats: dict[str, RecentRequests] = Field(description="Per version name")
    id: str = Field(description="Unique per process across hosts and containers (pids repeat there)")
    pid_ns: str = Field(description="The PID namespace the pid belongs to")


class Rollout(Closed):
    """A swap moving every worker of the registry together: staged everywhere, then committed."""

    id: str
    version: str
    from_version: str | None
    phase: str = Field(description="staging, committed or aborted")
    coordinator_pid: int
    started_at: float
    deadline: float
    reason: str
    coordinator_id: str = Field(description="The coordinating worker's id (see Worker.id)")
    coordinator_host: str
    coordinator_ns: str


class WatchWindow(Closed):
    requests: int
    errors: int
    empty: int
    error_rate: float
    empty_rate: float
    p95_ms: float | None


class NoSamples(Closed):
    """A watch window before its first sample was taken."""


class Watch(Closed):
    """The post-swap watch: the new version's requests against the old one's, rolled back if worse."""

    version: str
    previous: str
    state: str = Field(description="watching, passed, rolled_back, rollback_failed, inconclusive or superseded")
    started_at: float
    until: float
    reason: str
    new: WatchWindow | NoSamples
    old: WatchWindow | NoSamples


class JobQueueStatus(Closed):
    store: str = Field(description="Where the job queue lives: sqlite://<path> or postgresql://user:***@host/db")
    pending: int | None = Field(description="Jobs waiting in the whole queue (the same from every instance)")
    running: int | None = Field(description="Jobs running anywhere on the queue")
    claimed: int | None = Field(description="Jobs this process is running")


# -- admin ----------------------------------------------------------------------------------------


class SwapWorkerStaging(Closed):
    """A peer during a refused rollout's staging phase."""

    pid: int
    staged: StagedVersion | None


class SwapWorkerVersion(Closed):
    """A worker after the commit, with the version it serves."""

    pid: int
    version: str | None


class SwapReport(Closed):
    """What one swap did, phase by phase; the same report is in the history and the logs."""

    watch: Watch | None
    workers: list[SwapWorkerVersion | SwapWorkerStaging]
    converged: bool | None = Field(description="Every worker serves the version; null when no other worker "
                                               "took part")
    model: str = Field(description="The named model swapped")
    version: str
    from_version: str | None
    event: str = Field(description="promote, rollback, reload, load, load_fallback, unload or auto_rollback")
    outcome: str
    reason: str
    timings: dict[str, float] = Field(description="Seconds per phase: verify_s, load_s, smoke_s, drain_s, ...")
    memory: dict[str, int] = Field(description="Bytes: the model's, resident with both, freed, ...")
    smoke: SmokeReport | None
    generation: int | None = Field(description="The registry generation the swap committed")
    drained: bool = Field(description="False if the old version's requests outlived the drain timeout")


class UnloadedVersion(Closed):
    unloaded: str


class Unloaded(SwapReport, UnloadedVersion):
    """The version that was freed, first, then the report of freeing it."""


class NothingUnloaded(Closed):
    """No version was loaded; the registry still holds every worker unloaded."""

    unloaded: None


class WatchAnswer(Closed):
    watch: Watch | None = Field(description="The last post-swap watch, or null if none ran")


class ManifestFile(Closed):
    path: str
    sha256: str
    size: int


class SmokeClip(Closed):
    audio: str = Field(description="The golden input in the version: a recording, or for ct-punc the text file")
    text: str = Field(description="What it must give: the transcript, or the punctuated text (empty for fsmn-vad)")
    language: str
    use_itn: bool
    segments: list[list[int]] | None = Field(None, description="fsmn-vad: the speech segments, [start_ms, end_ms]")
    tolerance_ms: int | None = Field(None, description="fsmn-vad: how far a boundary may be off (null: 400 ms)")


class Manifest(Closed):
    """A version as the registry stores it; checksums are verified before every load."""

    name: str
    created_at: float
    source: str
    files: list[ManifestFile]
    smoke: list[SmokeClip] = Field(description="Golden clips; empty means only the built-in check runs")
    metadata: dict[str, Any]
    kind: str = Field(description="The model kind of the version, e.g. sensevoice")
    total_bytes: int


class VersionInfo(Manifest):
    current: bool
    previous: bool
    loaded: bool
    golden_smoke: bool


class VersionList(Closed):
    current: str | None
    previous: str | None
    generation: int
    live: str | None = Field(description="The version serving in the process that answered")
    versions: list[VersionInfo]


class Removed(Closed):
    removed: str


class HistoryLine(BaseModel):
    """One line of the registry's history; each kind of event carries its own fields."""

    model_config = ConfigDict(extra="allow")
    ts: float
    model: str = Field(description="The named model the event concerns")
    event: str = Field(description="A kind GET /api/ui/vocabulary lists; a string, so that a line another "
                                   "release wrote never breaks the list")


class History(Closed):
    events: list[HistoryLine] = Field(description="Oldest first")


ErrorDetail.model_rebuild()
