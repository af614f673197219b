"""The shapes of what a process serves: the models a client may name (``/v1/models``), every named
model's state, and the system status that holds them. Built on the smaller shapes of
:mod:`server.http.schemas` (workers, rollouts, watches, smoke reports)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from server.http.schemas import Closed, JobQueueStatus, Rollout, SmokeReport, Watch, Worker


class ModelCard(Closed):
    id: str = Field(description="What to send as `model`: a model name (its live version), NAME@VERSION (that "
                               "loaded version), or a bare version of the default model")
    object: Literal["model"]
    created: int
    owned_by: str
    loaded: bool = Field(description="Loaded in the process that answered, so it can be pinned")
    live: bool = Field(description="The id answers with its model's live version")
    model: str = Field(description="The named model the id belongs to")
    version: str | None = Field(description="The version the id names, or the model's live one for a model name")
    kind: str = Field(description="The model's kind, e.g. sensevoice")


class ModelList(Closed):
    object: Literal["list"]
    data: list[ModelCard]


class ModelStatus(Closed):
    """One named model in the process that answered: its lifecycle, pointer, memory and peers."""

    name: str
    kind: str | None = Field(description="sensevoice, ...; null for a model with no version yet")
    default: bool = Field(description="The default model: unnamed requests and /admin/model/* use it")
    ready: bool
    reason: str
    state: str = Field(description="not_loaded, loading, ready, swapping or unloading")
    live_version: str | None
    previous_version: str | None
    registry_current: str | None
    registry_generation: int
    held: bool = Field(description="Unloaded by an operator: every process stays unloaded until load")
    swapping: bool
    last_error: str | None
    in_flight: int
    model_memory_bytes: int = Field(description="Resident memory the live version added when it loaded")
    model_path: str | None
    model_file: str | None
    device: str
    providers: list[str]
    sessions: list[dict[str, Any]] = Field(description="The live version's onnxruntime sessions: the file each "
                                           "came from (source), what was loaded (loaded), whether it was a prepared "
                                           "graph (prepared, optimised_at_load) and, if not, why (reason)")
    generated: bool = Field(description="The live version is a generated stand-in (make-test-model, the seeded "
                                        "demo), not real speech recognition")
    smoke: SmokeReport | None
    versions: list[str] = Field(description="Every version the registry holds, oldest first")
    loaded_versions: list[str] = Field(description="Versions loaded here (the live one, a staged candidate)")
    workers: list[Worker] = Field(description="Every worker's heartbeat for this model")
    rollout: Rollout | None
    watch: Watch | None


class ModelsAnswer(Closed):
    default: str = Field(description="The default model's name")
    models: list[ModelStatus] = Field(description="The default model first, then the others by name")


class SystemStatus(Closed):
    ready: bool
    reason: str
    state: str = Field(description="The default model's state, or shutting_down")
    model_loaded: bool
    model_version: str | None
    model_path: str | None
    model_file: str | None
    device: str
    providers: list[str]
    model_memory_bytes: int = Field(description="The default model's")
    smoke: SmokeReport | None
    previous_version: str | None
    registry_current: str | None
    registry_generation: int
    swapping: bool
    last_error: str | None
    in_flight: int
    queued: int
    resident_memory_bytes: int = Field(description="The whole process, every model included")
    pid: int
    uptime_s: float
    registry: str
    workers: list[Worker]
    rollout: Rollout | None
    watch: Watch | None
    jobs: JobQueueStatus | None = Field(None, description="This process's job queue; counts are null until first read")
    model: str = Field(description="The default model, which the model fields above describe")
    models: list[ModelStatus] = Field(description="Every named model this process serves, the default first")
    models_memory_bytes: int = Field(description="What every model's live version added when it loaded")


class CanaryCriteria(Closed):
    """Overrides of the ``canary_*`` settings for one canary; absent fields keep the settings'."""

    min_requests: int | None = Field(None, ge=1, description="Each side must answer this many, or inconclusive")
    max_error_rate_increase: float | None = Field(None, ge=0, le=1)
    max_empty_rate_increase: float | None = Field(None, ge=0, le=1)
    max_latency_ratio: float | None = Field(None, ge=1, description="Candidate p95 over live p95")
    max_cer_mean: float | None = Field(None, ge=0, le=10, description="Shadow: mean CER against the live transcripts")
    cer_threshold: float | None = Field(None, ge=0, le=10)
    max_cer_share: float | None = Field(None, ge=0, le=1, description="Shadow: share of CERs above cer_threshold")


class CanaryRequest(Closed):
    version: str = Field(min_length=1, max_length=64)
    mode: Literal["canary", "shadow"] | None = Field(None, description="Default: VOXSWAP_CANARY_MODE")
    percent: float | None = Field(None, gt=0, le=100, description="Of clients (canary) or requests (shadow)")
    duration_s: float | None = Field(None, gt=0, le=86_400)
    criteria: CanaryCriteria | None = None
    on_pass: Literal["promote", "hold"] | None = Field(None, description="Default: VOXSWAP_CANARY_ON_PASS")
    expected_current: str | None = Field(None, description="409 unless this is the current (committed) version")


class CanaryAnswer(Closed):
    """A canary as ``canary.json`` holds it; ``comparison`` is live while it runs."""

    id: str
    model: str
    version: str = Field(description="The candidate")
    live_version: str | None
    mode: str = Field(description="canary or shadow")
    percent: float
    duration_s: float
    on_pass: str
    criteria: dict[str, float]
    state: str = Field(description="staging, running, passed, promoted, failed, inconclusive, stopped or interrupted")
    reason: str
    created_at: float
    started_at: float | None
    until: float | None
    finished_at: float | None
    rollout_id: str
    coordinator_id: str
    coordinator_pid: int
    comparison: dict[str, Any] = Field(description="live and candidate: requests, errors, empty, error_rate, "
                                                   "empty_rate, p95_ms; shadow: compared, cer_mean, "
                                                   "cer_above_threshold, mirrored, dropped, failed")
