"""Every Prometheus metric voxswap exports, declared once, in base units, prefixed ``voxswap_``.

Each app owns its :class:`Metrics` (its own ``CollectorRegistry``), so tests can run isolated apps
side by side. Under gunicorn, ``PROMETHEUS_MULTIPROC_DIR`` is set and prometheus-client writes
values to per-process files; :meth:`Metrics.render` then aggregates every worker's files.
"""

from __future__ import annotations

import os
import time

import psutil
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

from server.vocab import FINISHED_JOB_STATUSES

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
RTF_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
PHASE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
SWAP_OUTCOMES = ("success", "load_failed", "verify_failed", "smoke_failed", "rolled_back", "conflict", "timeout")
REJECTION_REASONS = ("overloaded", "timeout", "too_large", "unauthorized", "slow_client", "rate_limited", "refused")
SWAP_PHASES = ("verify", "load", "smoke", "drain", "free")
JOB_OUTCOMES = tuple(status.value for status in FINISHED_JOB_STATUSES)
WEBHOOK_OUTCOMES = ("delivered", "failed")
SHADOW_OUTCOMES = ("mirrored", "dropped", "failed")
TURN_OUTCOMES = ("completed", "failed", "abandoned")  # abandoned: the client left during the turn
STREAM_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.multiprocess = multiprocess_dir() is not None
        r = self.registry
        self.requests = Counter(
            "voxswap_requests", "HTTP requests by route, status code and model version.",
            ["route", "status", "model", "version"], registry=r)
        self.request_duration = Histogram(
            "voxswap_request_duration_seconds", "HTTP request latency, whole request.",
            ["route", "model", "version"], buckets=LATENCY_BUCKETS, registry=r)
        self.inference_duration = Histogram(
            "voxswap_inference_duration_seconds", "Time the model spent on one request.",
            ["model", "version"], buckets=LATENCY_BUCKETS, registry=r)
        self.audio_seconds = Counter(
            "voxswap_audio_seconds", "Seconds of audio transcribed.", ["model", "version"], registry=r)
        self.real_time_factor = Histogram(
            "voxswap_real_time_factor", "Inference seconds per audio second.",
            ["model", "version"], buckets=RTF_BUCKETS, registry=r)
        self.in_flight = Gauge(
            "voxswap_requests_in_flight", "Transcription requests being handled now.",
            registry=r, multiprocess_mode="livesum")
        self.queue_depth = Gauge(
            "voxswap_inference_queue_depth", "Requests admitted and waiting for an inference thread.",
            registry=r, multiprocess_mode="livesum")
        self.rejections = Counter(
            "voxswap_rejected_requests", "Requests refused before inference, by reason.",
            ["reason"], registry=r)
        self.model_info = Gauge(
            "voxswap_model_active", "1 for the version of each model this process serves.",
            ["model", "version"], registry=r, multiprocess_mode="liveall")
        self.model_loaded = Gauge(
            "voxswap_model_loaded", "1 when a model is loaded and serving.",
            ["model"], registry=r, multiprocess_mode="liveall")
        self.swaps = Counter(
            "voxswap_swaps", "Model swaps by model and outcome.", ["model", "outcome"], registry=r)
        self.swap_phase = Histogram(
            "voxswap_swap_phase_duration_seconds", "Duration of each swap phase.",
            ["model", "phase"], buckets=PHASE_BUCKETS, registry=r)
        self.model_load = Histogram(
            "voxswap_model_load_duration_seconds", "Time to build a model session.",
            ["model"], buckets=PHASE_BUCKETS, registry=r)
        self.model_memory = Gauge(
            "voxswap_model_memory_bytes", "Resident memory the live model added when it loaded.",
            ["model"], registry=r, multiprocess_mode="liveall")
        self.resident_memory = Gauge(
            "voxswap_process_resident_memory_bytes", "Resident memory of this process.",
            registry=r, multiprocess_mode="liveall")
        self.swap_freed = Gauge(
            "voxswap_swap_freed_memory_bytes", "Resident memory given back by the last swap's free.",
            ["model"], registry=r, multiprocess_mode="liveall")
        self.registry_generation = Gauge(
            "voxswap_registry_generation", "Generation of each model's registry state this process has seen.",
            ["model"], registry=r, multiprocess_mode="max")
        self.start_time = Gauge(
            "voxswap_process_start_time_seconds", "Start time of this process (unix seconds).",
            registry=r, multiprocess_mode="liveall")
        self.start_time.set(time.time())
        self.jobs_finished = Counter(
            "voxswap_jobs_finished", "Batch jobs that ended, by outcome.", ["outcome"], registry=r)
        # Every process that uses a queue reports the whole queue's counts, labelled with the queue:
        # sum(max by (queue) (...)) counts each queue once, whether it is one machine's SQLite file
        # or a fleet's PostgreSQL database.
        self.jobs_pending = Gauge(
            "voxswap_jobs_pending", "Batch jobs waiting in a queue (max by queue, then sum).", ["queue"],
            registry=r, multiprocess_mode="livemax")
        self.jobs_running = Gauge(
            "voxswap_jobs_running", "Batch jobs running from a queue (max by queue, then sum).", ["queue"],
            registry=r, multiprocess_mode="livemax")
        self.jobs_claimed = Gauge(
            "voxswap_jobs_claimed", "Batch jobs this process is running now (sum() across processes and instances).",
            registry=r, multiprocess_mode="livesum")
        self.shadow = Counter(
            "voxswap_shadow_requests", "Requests mirrored to a shadow candidate, by outcome (dropped: queue full).",
            ["model", "outcome"], registry=r)
        self.webhooks = Counter(
            "voxswap_job_webhooks", "Job webhook deliveries that ended, by outcome.", ["outcome"], registry=r)
        self.batch_size = Histogram(
            "voxswap_batch_requests", "Requests run together as one batch (1: alone), by model.",
            ["model"], buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64), registry=r)
        self.stream_sessions = Gauge(
            "voxswap_realtime_sessions", "Realtime transcription sessions (WebSockets) open now.",
            registry=r, multiprocess_mode="livesum")
        self.stream_turns = Counter(
            "voxswap_realtime_turns", "Realtime turns that ended, by model and outcome: completed, failed "
            "(the server could not transcribe it), abandoned (the client left or cleared it).",
            ["model", "outcome"], registry=r)
        self.stream_first_delta = Histogram(
            "voxswap_realtime_first_delta_seconds", "From a turn's speech start to its first delta event.",
            ["model"], buckets=STREAM_BUCKETS, registry=r)
        self.stream_finalize = Histogram(
            "voxswap_realtime_finalize_seconds", "From a turn's end (speech stopped or commit) to its completed event.",
            ["model"], buckets=STREAM_BUCKETS, registry=r)
        self.stream_audio = Counter(
            "voxswap_realtime_audio_seconds", "Seconds of audio streamed into realtime sessions.", ["model"],
            registry=r)
        # a labelled series exists only from its first increment, and increase() cannot see that
        # first event: create the known ones at zero so a server's first refused swap is visible
        known: list[tuple[Counter | Histogram, tuple[str, ...]]] = [
            (self.rejections, REJECTION_REASONS), (self.jobs_finished, JOB_OUTCOMES), (self.webhooks, WEBHOOK_OUTCOMES)]
        for metric, values in known:
            for value in values:
                metric.labels(value)
        self._process = psutil.Process()

    def for_model(self, model: str) -> ModelMetrics:
        return ModelMetrics(self, model)

    def refresh_process(self) -> int:
        rss = int(self._process.memory_info().rss)
        self.resident_memory.set(rss)
        return rss

    def scraped(self) -> CollectorRegistry:
        """What a scrape reads: this process's metrics, or under gunicorn every worker's files, aggregated."""
        if not self.multiprocess:
            return self.registry
        collector_registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(collector_registry)  # type: ignore[no-untyped-call]
        return collector_registry

    def render(self) -> tuple[bytes, str]:
        self.refresh_process()
        return generate_latest(self.scraped()), CONTENT_TYPE_LATEST


class ModelMetrics:
    """The series of one named model: what its lifecycle and its answers record, each labelled with
    the model, so two models' swaps and latencies never mix."""

    def __init__(self, metrics: Metrics, model: str):
        self.all = metrics
        self.model = model
        # created at zero, so increase() sees a model's first refused swap (see Metrics.__init__)
        for outcome in SWAP_OUTCOMES:
            metrics.swaps.labels(model, outcome)
        for phase in SWAP_PHASES:
            metrics.swap_phase.labels(model, phase)
        for outcome in SHADOW_OUTCOMES:
            metrics.shadow.labels(model, outcome)
        for outcome in TURN_OUTCOMES:
            metrics.stream_turns.labels(model, outcome)
        metrics.model_loaded.labels(model).set(0)

    def swap(self, outcome: str) -> None:
        self.all.swaps.labels(self.model, outcome).inc()

    def phase(self, phase: str, seconds: float) -> None:
        self.all.swap_phase.labels(self.model, phase).observe(seconds)

    def load_time(self, seconds: float) -> None:
        self.all.model_load.labels(self.model).observe(seconds)

    def shadow(self, outcome: str) -> None:
        self.all.shadow.labels(self.model, outcome).inc()

    def generation(self, generation: int) -> None:
        self.all.registry_generation.labels(self.model).set(generation)

    def memory(self, live_bytes: int) -> None:
        self.all.model_memory.labels(self.model).set(live_bytes)

    def freed(self, freed_bytes: int) -> None:
        self.all.swap_freed.labels(self.model).set(freed_bytes)

    def active_version(self, version: str | None, previous: str | None = None) -> None:
        """Old label set to 0, not removed: multiprocess files keep removed labels' last value."""
        if previous and previous != version:
            self.all.model_info.labels(self.model, previous).set(0)
        if version:
            self.all.model_info.labels(self.model, version).set(1)
        self.all.model_loaded.labels(self.model).set(1 if version else 0)

    def transcribed(self, version: str, *, inference_s: float, audio_s: float) -> None:
        self.all.inference_duration.labels(self.model, version).observe(inference_s)
        self.all.audio_seconds.labels(self.model, version).inc(audio_s)
        if audio_s > 0:
            self.all.real_time_factor.labels(self.model, version).observe(inference_s / audio_s)
