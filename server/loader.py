"""Blue/green model loading: leases for requests, one swap at a time, proof that memory came back.

A request takes a lease on the live version (``with loader.lease() as model:``) and is answered
by, and labelled with, the version it leased, whatever happens to the pointer meanwhile. A swap:

1. verify the version's checksums,
2. build its engine beside the live one,
3. smoke-test it (golden clips or the built-in check),
4. commit the registry pointer (compare-and-swap) and flip the in-memory pointer under a lock,
5. wait for leases on the old version to end (up to the drain timeout),
6. drop the old engine, collect garbage, ``malloc_trim``, and measure the resident memory freed.

A failure in steps 1-4 discards the candidate: the old version never stops serving, and the
failure goes to the caller, the log, the metrics and the registry's history.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import psutil

from server.engine import Engine, EngineLoadError
from server.errors import (
    NotReady,
    SwapFailed,
    SwapInProgress,
    UnexpectedCurrent,
    VerificationFailed,
    VersionNotLoaded,
)
from server.metrics import Metrics
from server.registry import Manifest, Registry
from server.settings import Settings
from server.smoke import SmokeReport, run_smoke

log = logging.getLogger("voxswap.loader")
ANY_CURRENT: Any = object()


class ModelState(StrEnum):
    NOT_LOADED = "not_loaded"
    LOADING = "loading"
    READY = "ready"
    SWAPPING = "swapping"
    UNLOADING = "unloading"


@dataclass(eq=False)
class LoadedModel:
    """One version's engine plus what we learned loading it; ``leases`` counts requests using it."""

    version: str
    path: Path
    manifest: Manifest
    engine: Engine
    loaded_at: float
    load_s: float
    memory_bytes: int
    smoke: SmokeReport
    leases: int = 0
    retired: bool = False

    def describe(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "path": str(self.path),
            "model_file": self.engine.model_file,
            "device": self.engine.device,
            "providers": self.engine.providers,
            "loaded_at": self.loaded_at,
            "load_s": round(self.load_s, 4),
            "memory_bytes": self.memory_bytes,
            "in_flight": self.leases,
            "smoke": self.smoke.to_json(),
        }


@dataclass
class SwapReport:
    version: str
    from_version: str | None
    event: str
    outcome: str = "success"
    reason: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    memory: dict[str, int] = field(default_factory=dict)
    smoke: dict[str, Any] | None = None
    generation: int | None = None
    drained: bool = True

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "from_version": self.from_version,
            "event": self.event,
            "outcome": self.outcome,
            "reason": self.reason,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "memory": self.memory,
            "smoke": self.smoke,
            "generation": self.generation,
            "drained": self.drained,
        }


def malloc_trim() -> None:
    """Hand freed heap pages back to the OS; glibc keeps them otherwise and RSS never drops."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class ModelLoader:
    """Holds the live version of one process and performs every change to it."""

    def __init__(self, registry: Registry, settings: Settings, metrics: Metrics):
        self.registry = registry
        self.settings = settings
        self.metrics = metrics
        self._cond = threading.Condition()
        self._swap_lock = threading.Lock()
        self._live: LoadedModel | None = None
        self._candidate: LoadedModel | None = None
        self._state = ModelState.NOT_LOADED
        self.held_by_operator = False  # unloaded on purpose: do not follow the registry back in
        self.last_error: str | None = None
        self.applied_generation = 0
        self._process = psutil.Process()

    # -- reading ----------------------------------------------------------------------------

    @property
    def state(self) -> ModelState:
        return self._state

    @property
    def live(self) -> LoadedModel | None:
        return self._live

    @property
    def live_version(self) -> str | None:
        live = self._live
        return live.version if live else None

    @property
    def swapping(self) -> bool:
        return self._swap_lock.locked()

    def in_flight(self) -> int:
        with self._cond:
            return sum(m.leases for m in (self._live, self._candidate) if m is not None)

    def loaded_versions(self) -> list[str]:
        return [m.version for m in (self._live, self._candidate) if m is not None]

    @contextmanager
    def lease(self, version: str | None = None) -> Iterator[LoadedModel]:
        """The live version (or a pinned loaded one) for the duration of one request."""
        with self._cond:
            model = self._pick(version)
            model.leases += 1
        try:
            yield model
        finally:
            with self._cond:
                model.leases -= 1
                last = model.leases == 0
                self._cond.notify_all()
            if last and model.retired:
                model.engine.close()  # a swap whose drain timed out left the free to the last lease

    def _pick(self, version: str | None) -> LoadedModel:
        live = self._live
        if version is None or (live is not None and version == live.version):
            if live is None:
                raise NotReady(self.not_ready_reason(), retry_after=1)
            return live
        candidate = self._candidate
        if candidate is not None and candidate.version == version:
            return candidate
        raise VersionNotLoaded(
            f"version {version!r} is not loaded here; loaded: {', '.join(self.loaded_versions()) or 'none'}",
            param="model",
        )

    def not_ready_reason(self) -> str:
        if self._state == ModelState.LOADING:
            return "the model is loading"
        if self._state == ModelState.UNLOADING:
            return "the model is being unloaded"
        if self.held_by_operator:
            return "the model was unloaded by an operator; POST /admin/model/load to load it"
        if self.last_error:
            return f"no model is loaded: {self.last_error}"
        return "no model is loaded"

    # -- changing ---------------------------------------------------------------------------

    def swap_to(
        self,
        version: str,
        *,
        expected_current: str | None = ANY_CURRENT,
        event: str = "promote",
        actor: str = "api",
        commit_registry: bool = True,
    ) -> SwapReport:
        """Blue/green switch to ``version``; raises :class:`SwapFailed` and keeps the old on failure."""
        if not self._swap_lock.acquire(blocking=False):
            raise SwapInProgress("another swap is running; retry when it has finished", retry_after=2)
        try:
            live_before = self.live_version
            if expected_current is not ANY_CURRENT and live_before != expected_current:
                raise UnexpectedCurrent(
                    f"live version is {live_before!r}, not {expected_current!r}; nothing changed"
                )
            return self._swap(version, live_before, event=event, actor=actor,
                              commit_registry=commit_registry)
        finally:
            self._swap_lock.release()

    def _swap(self, version: str, live_before: str | None, *, event: str, actor: str,
              commit_registry: bool) -> SwapReport:
        report = SwapReport(version=version, from_version=live_before, event=event)
        started = time.perf_counter()
        previous_state = self._state
        self._state = ModelState.SWAPPING if self._live else ModelState.LOADING
        log.info("swap started", extra={"event": "swap_start", "version": version,
                                         "from_version": live_before, "reason": event})
        try:
            candidate = self._build(version, report)
            report.memory["rss_with_both_bytes"] = self._rss()
            if commit_registry:
                try:
                    state = self.registry.promote(
                        version, expected_current=self.registry.state().current
                        if live_before is None else live_before,
                        actor=actor, event=event,
                        details={"timings": report.to_json()["timings"]},
                    )
                except UnexpectedCurrent as exc:
                    candidate.engine.close()
                    self.metrics.swaps.labels("conflict").inc()
                    report.outcome, report.reason = "conflict", exc.message
                    raise
                report.generation = state.generation
                self.applied_generation = state.generation
                self.metrics.registry_generation.set(state.generation)
            old = self._flip(candidate)
            report.timings["time_to_flip_s"] = time.perf_counter() - started
            self.last_error = None
            self.held_by_operator = False
            self._state = ModelState.READY
            if old is not None:
                self._retire(old, report)
        except SwapFailed as exc:
            self._state = previous_state if self._live else ModelState.NOT_LOADED
            self.metrics.swaps.labels(exc.outcome).inc()
            report.outcome, report.reason = exc.outcome, exc.message
            report.timings["total_s"] = time.perf_counter() - started
            exc.report = report.to_json()
            if self._live is None:
                self.last_error = exc.message
            self.registry.record("swap_failed", version=version, from_version=live_before, actor=actor,
                                 outcome=exc.outcome, reason=exc.message, request=event,
                                 timings=exc.report["timings"])
            log.warning("swap refused", extra={"event": "swap_failed", "version": version,
                                               "outcome": exc.outcome, "reason": exc.message})
            raise
        except BaseException:
            self._state = ModelState.READY if self._live else ModelState.NOT_LOADED
            raise
        report.timings["total_s"] = time.perf_counter() - started
        self.metrics.swaps.labels("rolled_back" if event in ("rollback", "auto_rollback") else "success").inc()
        log.info("swap finished", extra={"event": "swap_done", "version": version,
                                         "from_version": live_before, **_flat(report.to_json())})
        return report

    def check(self, version: str, *, event: str = "check") -> SwapReport:
        """Verify, load and smoke-test ``version`` without serving it (the CLI's promote uses this)."""
        report = SwapReport(version=version, from_version=self.live_version, event=event)
        started = time.perf_counter()
        try:
            self._build(version, report).engine.close()
        except SwapFailed as exc:
            self.registry.record("swap_failed", version=version, actor="cli", outcome=exc.outcome,
                                 reason=exc.message, request=event)
            raise
        report.timings["total_s"] = time.perf_counter() - started
        return report

    def _build(self, version: str, report: SwapReport) -> LoadedModel:
        """Verify, load and smoke-test a candidate beside the live model; raise SwapFailed if not fit."""
        t = time.perf_counter()
        try:
            manifest = self.registry.verify(version)
            path = self.registry.version_dir(version)
        except VerificationFailed as exc:
            raise SwapFailed(exc.message, outcome="verify_failed") from exc
        report.timings["verify_s"] = self._phase("verify", t)

        fault = self._fault("LOAD")
        t = time.perf_counter()
        rss_before = self._rss()
        try:
            if fault:
                raise EngineLoadError(f"fault injected: {fault}")
            engine = Engine(path, model_file=manifest.model_file(self.settings.prefer_quantized),
                            threads=self.settings.intra_op_threads, device=self.settings.device)
        except EngineLoadError as exc:
            raise SwapFailed(f"version {version!r} failed to load: {exc}", outcome="load_failed") from exc
        load_s = self._phase("load", t)
        self.metrics.model_load.observe(load_s)
        report.timings["load_s"] = load_s
        memory = max(0, self._rss() - rss_before)
        report.memory["model_bytes"] = memory

        t = time.perf_counter()
        smoke = run_smoke(engine, manifest, path, cer_threshold=self.settings.smoke_cer_threshold,
                          latency_budget_s=self.settings.smoke_latency_budget_s)
        report.timings["smoke_s"] = self._phase("smoke", t)
        report.smoke = smoke.to_json()
        if not smoke.passed:
            engine.close()
            raise SwapFailed(f"version {version!r} failed its smoke test: {smoke.reason}",
                             outcome="smoke_failed")
        return LoadedModel(version=version, path=path, manifest=manifest, engine=engine,
                           loaded_at=time.time(), load_s=load_s, memory_bytes=memory, smoke=smoke)

    def _flip(self, candidate: LoadedModel) -> LoadedModel | None:
        with self._cond:
            old, self._live = self._live, candidate
        self.metrics.set_active_version(candidate.version, old.version if old else None)
        self.metrics.model_memory.set(candidate.memory_bytes)
        return old

    def _retire(self, old: LoadedModel, report: SwapReport) -> None:
        """Wait for the old version's requests, then free it and measure what came back."""
        t = time.perf_counter()
        deadline = time.monotonic() + self.settings.drain_timeout_s
        with self._cond:
            old.retired = True
            while old.leases > 0 and time.monotonic() < deadline:
                self._cond.wait(timeout=max(0.0, deadline - time.monotonic()))
            report.drained = old.leases == 0
            report.memory["in_flight_at_drain_end"] = old.leases
        report.timings["drain_s"] = self._phase("drain", t)
        t = time.perf_counter()
        rss_before = self._rss()
        if report.drained:
            old.engine.close()
        del old
        gc.collect()
        malloc_trim()
        rss_after = self._rss()
        report.timings["free_s"] = self._phase("free", t)
        freed = max(0, rss_before - rss_after)
        report.memory.update(rss_before_free_bytes=rss_before, rss_after_free_bytes=rss_after,
                             freed_bytes=freed)
        self.metrics.swap_freed.set(freed)
        if not report.drained:
            log.warning("drain timed out; the old engine is freed when its last request ends",
                        extra={"event": "drain_timeout", "version": report.from_version})

    def load_current(self, *, actor: str = "startup") -> SwapReport | None:
        """Load the registry's current version; if it is refused, fall back to the previous one."""
        state = self.registry.state()
        self.applied_generation = state.generation
        self.metrics.registry_generation.set(state.generation)
        if not state.current:
            self.last_error = "the registry has no current version; promote one"
            return None
        try:
            return self.swap_to(state.current, event="load", actor=actor, commit_registry=False)
        except SwapFailed as exc:
            fallback = state.previous
            reverted = self.registry.revert(state.current, to=fallback, reason=exc.message)
            self.applied_generation = reverted.generation
            if fallback and self._live is None:
                return self.swap_to(fallback, event="load_fallback", actor=actor, commit_registry=False)
            raise

    def follow_registry(self) -> SwapReport | None:
        """Called when state.json changed: converge on its current version, or refuse and revert it."""
        if self.held_by_operator or self.swapping:
            return None
        state = self.registry.state()
        if state.generation == self.applied_generation:
            return None
        self.metrics.registry_generation.set(state.generation)
        target = state.current
        if target is None or target == self.live_version:
            self.applied_generation = state.generation
            return None
        try:
            report = self.swap_to(target, event="follow_registry", actor="registry", commit_registry=False)
        except SwapInProgress:
            return None
        except SwapFailed as exc:
            reverted = self.registry.revert(target, to=self.live_version, reason=exc.message)
            self.applied_generation = reverted.generation
            return None
        self.applied_generation = state.generation
        return report

    def unload(self, *, actor: str = "api") -> dict[str, Any]:
        if not self._swap_lock.acquire(blocking=False):
            raise SwapInProgress("a swap is running; unload when it has finished", retry_after=2)
        try:
            with self._cond:
                old, self._live = self._live, None
            self.held_by_operator = True
            if old is None:
                return {"unloaded": None}
            self._state = ModelState.UNLOADING
            report = SwapReport(version=old.version, from_version=old.version, event="unload")
            self.metrics.set_active_version(None, old.version)
            self.metrics.model_memory.set(0)
            self._retire(old, report)
            self._state = ModelState.NOT_LOADED
            self.registry.record("unload", version=report.version, actor=actor, outcome="success",
                                 freed_bytes=report.memory.get("freed_bytes"))
            log.info("model unloaded", extra={"event": "unload", **_flat(report.to_json())})
            return {"unloaded": report.version, **report.to_json()}
        finally:
            self._swap_lock.release()

    def shutdown(self) -> None:
        with self._cond:
            live, self._live = self._live, None
        if live is not None:
            live.engine.close()
        self._state = ModelState.NOT_LOADED

    # -- helpers ----------------------------------------------------------------------------

    def _phase(self, phase: str, started: float) -> float:
        elapsed = time.perf_counter() - started
        self.metrics.swap_phase.labels(phase).observe(elapsed)
        return elapsed

    def _rss(self) -> int:
        return int(self._process.memory_info().rss)

    def _fault(self, kind: str) -> str | None:
        """Test-only fault hooks, honoured only with ``fault_injection`` on (see settings)."""
        if not self.settings.fault_injection:
            return None
        import os

        return os.environ.get(f"VOXSWAP_FAULT_{kind}") or None


def _flat(data: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key in ("outcome", "reason", "generation", "drained"):
        if data.get(key) not in (None, ""):
            flat[key] = data[key]
    for key, value in data.get("timings", {}).items():
        flat[key] = value
    for key, value in data.get("memory", {}).items():
        flat[key] = value
    return flat
