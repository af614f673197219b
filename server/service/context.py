"""What one app owns for its lifetime, in one object the routes reach through ``app.state.ctx``.

It lives in the service layer, below the routes, so that the HTTP dependencies can name its type
without importing the composition root that builds it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import IO

from server.lifecycle.models import ModelSet
from server.lifecycle.policy import ModelLifecycle
from server.metrics import Metrics
from server.service.inference import InferencePool
from server.service.jobs import JobRunner
from server.service.streams import StreamHub
from server.service.transcription import TranscriptionService
from server.settings import Settings
from server.storage.catalog import ModelCatalog
from server.storage.pipelines import PipelineStore
from server.storage.registry import Registry


@dataclass
class AppContext:
    """Everything long-lived that one app owns."""

    settings: Settings
    catalog: ModelCatalog
    metrics: Metrics
    models: ModelSet
    pool: InferencePool
    service: TranscriptionService
    started_at: float = field(default_factory=time.time)
    shutting_down: bool = False
    recycle_reason: str | None = None  # set after a swap left this worker over its memory budget
    recycling: bool = False
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _recycle_lock: IO[str] | None = None
    jobs: JobRunner | None = None  # batch jobs (server/jobs.py)
    pipelines: PipelineStore | None = None  # named pipelines of the registry folder
    streams: StreamHub = field(init=False)  # realtime sessions (set by the app factory)

    @property
    def lifecycle(self) -> ModelLifecycle:
        """The default model's lifecycle (what ``/admin/model/*`` and unnamed requests act on)."""
        return self.models.default

    @property
    def registry(self) -> Registry:
        """The default model's registry: the registry folder's root."""
        return self.catalog.default_registry
