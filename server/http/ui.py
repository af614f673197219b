"""Small JSON routes the operator page reads: the words it shows and the traffic it charts.

The page keeps no vocabulary and no PromQL of its own. Its labels come from :mod:`server.vocab`;
its chart is computed here from the same collection ``/metrics`` renders (under gunicorn, every
worker's files, aggregated), so the page and Prometheus count the same requests.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from prometheus_client import CollectorRegistry
from pydantic import Field

from server.http.deps import CtxDep
from server.http.middleware import TRANSCRIPTION_PREFIXES
from server.http.schemas import Closed
from server.metrics import Metrics
from server.vocab import (
    AUDIO_SUFFIXES,
    HISTORY_LABELS,
    JOB_STATUS_LABELS,
    LANGUAGE_NAMES,
    LANGUAGES,
    HistoryEvent,
    JobStatus,
)

router = APIRouter(tags=["operator page"])

MIN_INTERVAL_S = 1.0  # a poll right after another adds an interval too short to mean anything
HISTORY_S = 150.0  # the page charts the last two and a half minutes
NO_VERSION = "none"  # the middleware's model and version labels for a request no version answered


# -- vocabulary ---------------------------------------------------------------------------------


class Term(Closed):
    id: str = Field(description="The value as the API sends it")
    label: str = Field(description="The words the page shows for it")


class JobStatusTerm(Term):
    finished: bool = Field(description="Final: the job will not run again")
    succeeded: bool = Field(description="Finished with a transcript")


class Vocabulary(Closed):
    history_events: list[Term] = Field(description="Every event GET /admin/history can list")
    job_statuses: list[JobStatusTerm]
    languages: list[Term] = Field(description="What the language field of a transcription accepts")
    audio_suffixes: list[str] = Field(description="File suffixes counted as recordings in folders and zips")


@router.get("/api/ui/vocabulary", response_model=Vocabulary)
async def vocabulary() -> Vocabulary:
    return Vocabulary(
        history_events=[Term(id=event, label=HISTORY_LABELS[event]) for event in HistoryEvent],
        job_statuses=[JobStatusTerm(id=status, label=JOB_STATUS_LABELS[status], finished=status.finished,
                                    succeeded=status is JobStatus.COMPLETED) for status in JobStatus],
        languages=[Term(id=lang, label=LANGUAGE_NAMES[lang]) for lang in LANGUAGES],
        audio_suffixes=list(AUDIO_SUFFIXES),
    )


# -- traffic ------------------------------------------------------------------------------------


class Traffic(Closed):
    requests: int = Field(description="Transcription requests answered in the interval")
    rate_per_s: float
    errors: int = Field(description="Of those, answered with a 5xx (503 overloaded and not ready included)")
    p50_s: float | None = Field(description="Median latency, as histogram_quantile(0.5) computes it; null "
                                            "without requests")
    p95_s: float | None = Field(description="95th percentile latency, as histogram_quantile(0.95)")


class VersionTraffic(Traffic):
    model: str | None = Field(description="The named model that answered; null for requests refused before one did")
    version: str | None = Field(description="The version that answered; null for requests refused before one did")


class TrafficPoint(Traffic):
    end: float = Field(description="Unix time the interval ended")
    seconds: float = Field(description="Length of the interval")
    versions: list[VersionTraffic] = Field(description="The versions that answered requests in the interval")


class TrafficSeries(Closed):
    routes: list[str] = Field(description="The route prefixes counted: transcription only, so the page's own "
                                          "polling does not drown real traffic")
    history_s: float = Field(description="How far back the points reach")
    points: list[TrafficPoint] = Field(description="Consecutive intervals of the last minutes, oldest first")


@dataclass
class _Tally:
    """Cumulative counts of one version since the server started."""

    requests: float = 0.0
    errors: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)  # upper bound -> cumulative count

    def minus(self, before: _Tally) -> _Tally:
        return _Tally(self.requests - before.requests, self.errors - before.errors,
                      {le: n - before.buckets.get(le, 0.0) for le, n in self.buckets.items()})

    def add(self, other: _Tally) -> None:
        self.requests += other.requests
        self.errors += other.errors
        for le, n in other.buckets.items():
            self.buckets[le] = self.buckets.get(le, 0.0) + n


@dataclass(frozen=True)
class _Snapshot:
    monotonic: float
    wall: float
    tallies: dict[tuple[str, str], _Tally]


class TrafficSampler:
    """Snapshots of the aggregated request metrics, taken when the page asks, and the intervals
    between them.

    Each process keeps its own snapshots, but each snapshot is of every worker's metrics: under
    gunicorn a worker answers only some polls, so its intervals are longer, never wrong.
    """

    def __init__(self, metrics: Metrics):
        self._metrics = metrics
        self._lock = threading.Lock()
        self._snapshots: deque[_Snapshot] = deque()

    def series(self) -> TrafficSeries:
        """Blocking: under gunicorn, reads every worker's metric files."""
        now = _Snapshot(time.monotonic(), time.time(), self._tallies(self._metrics.scraped()))
        with self._lock:
            kept = self._snapshots
            # (a snapshot that lost the race for the lock to a newer one is older than it: not kept)
            if not kept or now.monotonic - kept[-1].monotonic >= MIN_INTERVAL_S:
                kept.append(now)
            while len(kept) > 1 and now.monotonic - kept[1].monotonic >= HISTORY_S:
                kept.popleft()
            snapshots = list(kept)
        points = [point for before, after in pairwise(snapshots) if (point := _interval(before, after))]
        return TrafficSeries(routes=list(TRANSCRIPTION_PREFIXES), history_s=HISTORY_S, points=points)

    def _tallies(self, scraped: CollectorRegistry) -> dict[tuple[str, str], _Tally]:
        requests = {family.name for family in self._metrics.requests.describe()}
        durations = {family.name for family in self._metrics.request_duration.describe()}
        tallies: dict[tuple[str, str], _Tally] = {}
        for family in scraped.collect():
            if family.name not in requests | durations:
                continue
            for sample in family.samples:
                if not sample.labels.get("route", "").startswith(TRANSCRIPTION_PREFIXES):
                    continue
                key = (sample.labels.get("model", NO_VERSION), sample.labels.get("version", NO_VERSION))
                tally = tallies.setdefault(key, _Tally())
                if family.name in requests and sample.name.endswith("_total"):
                    tally.requests += sample.value
                    if sample.labels.get("status", "").startswith("5"):
                        tally.errors += sample.value
                elif family.name in durations and sample.name.endswith("_bucket"):
                    le = float(sample.labels["le"])
                    tally.buckets[le] = tally.buckets.get(le, 0.0) + sample.value
        return tallies


def _interval(before: _Snapshot, after: _Snapshot) -> TrafficPoint | None:
    """None when a counter went down: the server restarted in between, and the difference is noise."""
    seconds = after.monotonic - before.monotonic
    total = _Tally()
    versions = []
    for (model, version), tally in sorted(after.tallies.items()):
        delta = tally.minus(before.tallies.get((model, version), _Tally()))
        if delta.requests < 0 or any(n < 0 for n in delta.buckets.values()):
            return None
        if delta.requests == 0:
            continue
        total.add(delta)
        versions.append(VersionTraffic(model=None if model == NO_VERSION else model,
                                       version=None if version == NO_VERSION else version,
                                       **_traffic(delta, seconds).model_dump()))
    return TrafficPoint(end=after.wall, seconds=seconds, versions=versions, **_traffic(total, seconds).model_dump())


def _traffic(delta: _Tally, seconds: float) -> Traffic:
    return Traffic(requests=round(delta.requests), rate_per_s=delta.requests / seconds, errors=round(delta.errors),
                   p50_s=histogram_quantile(0.5, delta.buckets), p95_s=histogram_quantile(0.95, delta.buckets))


def histogram_quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' ``histogram_quantile`` over cumulative bucket counts: linear within the bucket
    the rank falls in, and the highest finite bound when it falls in ``+Inf``."""
    bounds = sorted(buckets)
    if not bounds or bounds[-1] != math.inf or buckets[math.inf] <= 0:
        return None
    rank = q * buckets[math.inf]
    lower, below = 0.0, 0.0
    for upper in bounds:
        count = buckets[upper]
        if count >= rank and count > below:
            if upper == math.inf:
                return lower
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return None


async def _sampler(request: Request, ctx: CtxDep) -> TrafficSampler:
    """One per app, made by its first poll. Async, so it runs on the event loop: no other request
    can run between the lookup and the assignment and make a second one."""
    sampler: TrafficSampler | None = getattr(request.app.state, "traffic_sampler", None)
    if sampler is None:
        sampler = request.app.state.traffic_sampler = TrafficSampler(ctx.metrics)
    return sampler


SamplerDep = Annotated[TrafficSampler, Depends(_sampler)]


@router.get("/api/system/traffic", response_model=TrafficSeries)
async def traffic(sampler: SamplerDep) -> TrafficSeries:
    """Transcription traffic of the last minutes: request rate, errors and latency, per version."""
    return await asyncio.to_thread(sampler.series)
