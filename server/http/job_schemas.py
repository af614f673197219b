"""The shapes of the batch-job routes (``/api/jobs``): see :mod:`server.http.schemas` for why."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from server.http.schemas import Closed, Transcription
from server.vocab import JobStatus, Language


class JobTimings(Closed):
    queued_s: float | None
    running_s: float | None


class JobWebhook(Closed):
    url: str = Field(description="scheme://host[:port]/path only: never the query string or userinfo")
    status: str | None = Field(description="pending, sending, delivered or failed; null once cancelled")
    attempts: int
    error: str | None = Field(description="HTTP <status>, or a generic reason that never shows network details")


class Job(Closed):
    id: str
    status: JobStatus
    filename: str
    size_bytes: int
    language: Language
    use_itn: bool
    progress: float = Field(description="0 to 1; the share of the recording transcribed so far")
    attempts: int
    model: str | None = Field(description="As submitted: a model name, NAME@VERSION or a pipeline name; null for "
                                          "the default model. The result names the model and versions that ran it")
    hotwords: str | None = Field(description="As submitted; null for none")
    model_version: str | None
    duration_s: float | None
    processing_ms: float | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    timings: JobTimings
    error: str | None
    webhook: JobWebhook | None
    result_url: str
    owner_key: str | None = Field(
        description="Id (never the key) of the client API key that submitted it; null without keys")


class JobsSubmitted(Closed):
    jobs: list[Job]
    skipped: list[str] = Field(description="Zip members that are not audio, or empty")


class JobPage(Closed):
    jobs: list[Job] = Field(description="Newest first")
    total: int
    limit: int
    offset: int


class JobResult(Transcription):
    job_id: str
    filename: str


class JobRemoved(Closed):
    id: str
    action: Literal["cancelled", "deleted"]
    status: Literal["cancelled", "deleted"]
