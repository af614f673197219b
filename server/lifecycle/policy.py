"""Blue/green model loading: leases for requests, one swap at a time, proof that memory came back.

A request takes a lease on the live version (``with lifecycle.lease() as model:``) and is answered
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
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import psutil

from server.engines.sensevoice import Engine, EngineLoadError
from server.errors import (
    NotFound,
    NotReady,
    SwapFailed,
    SwapInProgress,
    UnexpectedCurrent,
    VerificationFailed,
    VersionNotLoaded,
)
from server.lifecycle.board import Rollout, Staged, WorkerBoard, WorkerInfo
from server.lifecycle.smoke import SmokeReport, run_smoke
from server.lifecycle.watch import PostSwapWatch, VersionStats
from server.metrics import Metrics
from server.settings import Settings
from server.storage.registry import ANY_CURRENT, Manifest, Registry

log = logging.getLogger("voxswap.lifecycle")
RETRY_FIRST_S, RETRY_MAX_S = 1.0, 60.0  # backoff of a load that failed in this process only


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
    workers: list[dict[str, Any]] = field(default_factory=list)
    converged: bool | None = None
    watch: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "watch": self.watch,
            "workers": self.workers,
            "converged": self.converged,
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


class ModelLifecycle:
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
        self.board = WorkerBoard(registry)
        self.draining = False  # shutting down: serve on, but take part in no rollout
        self.after_swap: Callable[[SwapReport], None] = lambda report: None
        self._staged: Staged | None = None
        self._retry_at = 0.0  # a load that failed here while peers serve the version: retry then
        self._retry_backoff_s = RETRY_FIRST_S
        self._handled_rollout: str | None = None
        self._started_at = time.time()
        self._process = psutil.Process()
        self.stats = VersionStats()
        self.watch = PostSwapWatch(self)

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
        watch_seconds: float | None = None,
    ) -> SwapReport:
        """Blue/green switch to ``version``; raises :class:`SwapFailed` and keeps the old on failure.

        With ``commit_registry`` (promote, rollback) this process coordinates a two-phase rollout:
        every live worker sharing the registry stages the version first, and the registry pointer
        moves only when all of them are ready. Without it (following the registry, reload, load)
        only this process changes. ``expected_current`` is compared with what the swap changes: the
        registry's current version with ``commit_registry`` (a worker that lags behind it must not
        turn a safe retry into a 409), else this process's live version.
        """
        if not self._swap_lock.acquire(blocking=False):
            raise SwapInProgress("another swap is running; retry when it has finished", retry_after=2)
        try:
            live_before = self.live_version
            committed = self.registry.state().current
            if expected_current is not ANY_CURRENT:
                actual, what = (committed, "current") if commit_registry else (live_before, "live")
                if actual != expected_current:
                    raise UnexpectedCurrent(f"{what} version is {actual!r}, not {expected_current!r}; nothing changed")
            report = SwapReport(version=version, from_version=live_before, event=event)
            if commit_registry:
                self._run(report, actor, lambda: self._coordinated(report, actor, committed))
            else:
                self._run(report, actor, lambda: self._local(report, actor))
        finally:
            self._swap_lock.release()
        seconds = self.settings.watch_seconds if watch_seconds is None else watch_seconds
        if commit_registry and seconds > 0 and live_before and live_before != version:
            report.watch = self.watch.start(version, live_before, seconds).to_json()
        return report

    def _run(self, report: SwapReport, actor: str, body: Callable[[], None]) -> SwapReport:
        """Shared bookkeeping of every swap: state, metrics, log, history on failure."""
        started = time.perf_counter()
        previous_state = self._state
        self._state = ModelState.SWAPPING if self._live else ModelState.LOADING
        log.info("swap started", extra={"event": "swap_start", "version": report.version,
                                         "from_version": report.from_version, "reason": report.event})
        try:
            body()
        except SwapFailed as exc:
            self._state = previous_state if self._live else ModelState.NOT_LOADED
            self.metrics.swaps.labels(exc.outcome).inc()
            report.outcome, report.reason = exc.outcome, exc.message
            report.timings["total_s"] = time.perf_counter() - started
            exc.report = report.to_json()
            if self._live is None:
                self.last_error = exc.message
            self.registry.record("swap_failed", version=report.version, from_version=report.from_version,
                                 actor=actor, outcome=exc.outcome, reason=exc.message, request=report.event,
                                 timings=exc.report["timings"], workers=report.workers or None)
            log.warning("swap refused", extra={"event": "swap_failed", "version": report.version,
                                               "outcome": exc.outcome, "reason": exc.message})
            raise
        except UnexpectedCurrent as exc:
            self._state = previous_state if self._live else ModelState.NOT_LOADED
            self.metrics.swaps.labels("conflict").inc()
            report.outcome, report.reason = "conflict", exc.message
            raise
        except BaseException:
            self._state = ModelState.READY if self._live else ModelState.NOT_LOADED
            raise
        report.timings["total_s"] = time.perf_counter() - started
        outcome = "rolled_back" if report.event in ("rollback", "auto_rollback") else "success"
        self.metrics.swaps.labels(outcome).inc()
        log.info("swap finished", extra={"event": "swap_done", "version": report.version,
                                         "from_version": report.from_version, **_flat(report.to_json())})
        self.after_swap(report)
        return report

    def _local(self, report: SwapReport, actor: str) -> None:
        started = time.perf_counter()
        candidate = self._build(report.version, report)
        self._commit_local(candidate, report, started)

    def _coordinated(self, report: SwapReport, actor: str, committed: str | None) -> None:
        """``committed``: the registry's current version when the swap began, which the commit
        expects to find (compare-and-swap: a promote that landed meanwhile aborts this one)."""
        started = time.perf_counter()
        rollout = self.board.begin(report.version, report.from_version, self.settings.rollout_timeout_s)
        try:
            try:
                candidate = self._build(report.version, report)
            except SwapFailed as exc:
                self.board.set_phase(rollout, "aborted", exc.message)
                raise
            self._stage(candidate, rollout.id)
            t = time.perf_counter()
            failure = self._await_peers_staged(rollout, report)
            report.timings["peers_staged_s"] = time.perf_counter() - t
            if failure is not None:
                self.board.set_phase(rollout, "aborted", failure.message)
                self._discard_candidate()
                raise failure
            try:
                state = self.registry.promote(report.version, expected_current=committed, actor=actor,
                                              event=report.event, details={"timings": report.to_json()["timings"]})
            except UnexpectedCurrent:
                self.board.set_phase(rollout, "aborted", "the registry changed underneath the rollout")
                self._discard_candidate()
                raise
            report.generation = state.generation
            self.applied_generation = state.generation
            self.metrics.registry_generation.set(state.generation)
            self.board.set_phase(rollout, "committed")
            self._commit_local(candidate, report, started)
            t = time.perf_counter()
            report.converged = self._await_peers_serving(report.version, report)
            report.timings["peers_converged_s"] = time.perf_counter() - t
        finally:
            self.board.end(rollout)

    def _commit_local(self, candidate: LoadedModel, report: SwapReport, started: float) -> None:
        report.memory["rss_with_both_bytes"] = self._rss()
        old = self._flip(candidate)
        report.timings["time_to_flip_s"] = time.perf_counter() - started
        self.last_error = None
        self.held_by_operator = False
        self._state = ModelState.READY
        self.publish()
        if old is not None and old is not candidate:
            self._retire(old, report)

    def _stage(self, candidate: LoadedModel, rollout_id: str) -> None:
        """Hold a smoke-tested candidate beside the live version (pinnable) and tell the peers."""
        with self._cond:
            previous, self._candidate = self._candidate, candidate
        if previous is not None and previous is not candidate:
            self._free_when_idle(previous)
        self._staged = Staged(rollout_id, candidate.version, "ready")
        self.publish()

    def _discard_candidate(self) -> None:
        with self._cond:
            candidate, self._candidate = self._candidate, None
        self._staged = None
        if candidate is not None:
            self._free_when_idle(candidate)
            malloc_trim()
        self.publish()

    def _free_when_idle(self, model: LoadedModel) -> None:
        """Close a model nobody may lease any more: now, or when its last pinned request ends."""
        with self._cond:
            model.retired = True
            idle = model.leases == 0
        if idle:
            model.engine.close()

    def _await_peers_staged(self, rollout: Rollout, report: SwapReport) -> SwapFailed | None:
        """Phase one: every live peer has built and smoke-tested the version, or one has not."""
        while True:
            peers = self.board.peers()
            ours = {p.pid: p.staged for p in peers
                    if p.staged is not None and p.staged.rollout_id == rollout.id}
            report.workers = [{"pid": p.pid, "staged": asdict(ours[p.pid]) if p.pid in ours else None}
                              for p in peers]
            failed = [(pid, s) for pid, s in ours.items() if s.status == "failed"]
            if failed:
                pid, staged = failed[0]
                return SwapFailed(f"worker {pid} refused version {rollout.version!r}: {staged.reason}; "
                                  "no worker switched", outcome=staged.outcome or "load_failed")
            if all(p.pid in ours and ours[p.pid].status == "ready" for p in peers):
                return None
            if time.time() > rollout.deadline:
                waiting = [p.pid for p in peers if p.pid not in ours or ours[p.pid].status != "ready"]
                return SwapFailed(f"workers {waiting} did not stage {rollout.version!r} within "
                                  f"{self.settings.rollout_timeout_s:g} s; no worker switched", outcome="timeout")
            time.sleep(0.05)

    def _await_peers_serving(self, version: str, report: SwapReport) -> bool:
        """Phase two: the answer waits until every live worker serves the committed version."""
        deadline = time.monotonic() + self.settings.rollout_timeout_s
        while True:
            peers = self.board.peers()
            report.workers = [{"pid": self.board.pid, "version": self.live_version}] + \
                [{"pid": p.pid, "version": p.version} for p in peers]
            if all(p.version == version for p in peers):
                return True
            if time.monotonic() > deadline:
                log.warning("workers did not converge", extra={"event": "converge_timeout", "version": version,
                                                               "workers": report.workers})
                return False
            time.sleep(0.05)

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

    def _build(self, version: str, report: SwapReport, role: str = "coordinator") -> LoadedModel:
        """Verify, load and smoke-test a candidate beside the live model; raise SwapFailed if not fit."""
        t = time.perf_counter()
        try:
            manifest = self.registry.verify(version)
            path = self.registry.version_dir(version)
        except (VerificationFailed, NotFound) as exc:
            raise SwapFailed(exc.message, outcome="verify_failed") from exc
        except ValueError as exc:  # a manifest that is not valid JSON
            raise SwapFailed(f"version {version!r} has an unreadable manifest: {exc}",
                             outcome="verify_failed") from exc
        report.timings["verify_s"] = self._phase("verify", t)

        fault = self._fault(version, role)
        t = time.perf_counter()
        rss_before = self._rss()
        try:
            if fault:
                raise EngineLoadError(f"fault injected: {fault}")
            engine = Engine(path, model_file=manifest.model_file(self.settings.prefer_quantized),
                            threads=self.settings.intra_op_threads, device=self.settings.device)
        except EngineLoadError as exc:
            # onnxruntime names the file it failed on; clients get the version, not our disk layout
            reason = str(exc).replace(str(path), f"<{version}>")
            raise SwapFailed(f"version {version!r} failed to load: {reason}", outcome="load_failed") from exc
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
            if self._candidate is candidate:
                self._candidate = None
                self._staged = None
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
        # No gc.collect(): the session has no reference cycles, so closing it frees it, and a full
        # collection would hold the GIL for tens of milliseconds while requests are being served.
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
        if state.held:
            self.held_by_operator = True
            return None
        if not state.current:
            self.last_error = "the registry has no current version; promote one"
            return None
        try:
            return self.swap_to(state.current, event="load", actor=actor, commit_registry=False)
        except SwapFailed as exc:
            if self._failed_only_here(state.current, exc):
                self.applied_generation = -1  # not applied: the watcher retries after the backoff
                return None
            fallback = state.previous
            reverted = self.registry.revert(state.current, to=fallback, reason=exc.message)
            self.applied_generation = reverted.generation
            if fallback and self._live is None:
                return self.swap_to(fallback, event="load_fallback", actor=actor, commit_registry=False)
            raise

    def follow_registry(self) -> bool:
        """Converge on state.json's current version, or refuse and revert it. False: try again later.

        A version this worker already staged for a rollout is flipped to without building it again.
        """
        if self.registry.state().generation == self.applied_generation:
            return True  # the usual tick: nothing to do, and no lock an admin call could trip over
        if time.monotonic() < self._retry_at:
            return False
        if not self._swap_lock.acquire(blocking=False):
            return False
        try:
            state = self.registry.state()
            if state.generation == self.applied_generation:
                return True
            self.metrics.registry_generation.set(state.generation)
            if state.held:
                if self._live is not None:
                    self._unload_local(actor="registry")
                self.held_by_operator = True
                self.applied_generation = state.generation
                return True
            self.held_by_operator = False
            target = state.current
            if target is None or target == self.live_version:
                self.applied_generation = state.generation
                return True
            report = SwapReport(version=target, from_version=self.live_version, event="follow_registry")
            staged = self._candidate if self._candidate and self._candidate.version == target else None
            try:
                if staged is not None:
                    self._run(report, "registry", lambda: self._commit_local(staged, report, time.perf_counter()))
                else:
                    self._run(report, "registry", lambda: self._local(report, "registry"))
            except SwapFailed as exc:
                if self._failed_only_here(target, exc):
                    return False
                reverted = self.registry.revert(target, to=self.live_version, reason=exc.message)
                self.applied_generation = reverted.generation
                return True
            self.applied_generation = state.generation
            self._retry_backoff_s = RETRY_FIRST_S
            return True
        finally:
            self._swap_lock.release()

    def _failed_only_here(self, version: str, exc: SwapFailed) -> bool:
        """True when live peers serve ``version``: the failure is this process's own (memory, a slow
        start beside busy peers), and reverting the registry would roll every worker back."""
        serving = [p.pid for p in self.board.peers() if p.version == version]
        if not serving:
            return False
        self.last_error = f"{exc.message}; workers {serving} serve it, retrying in {self._retry_backoff_s:g} s"
        self._retry_at = time.monotonic() + self._retry_backoff_s
        self._retry_backoff_s = min(self._retry_backoff_s * 2, RETRY_MAX_S)
        self.registry.record("load_retry", version=version, actor="server", outcome=exc.outcome,
                             reason=exc.message, pid=os.getpid(), peers_serving=serving)
        log.warning("version refused here but served by peers: retrying, registry left alone",
                    extra={"event": "local_load_failed", "version": version, "peers": serving,
                           "reason": exc.message})
        return True

    def follow_rollout(self) -> None:
        """As a peer: stage the rollout another worker coordinates, or drop a candidate it aborted."""
        rollout = self.board.rollout()
        if rollout is not None and rollout.stale():
            self.board.clear_stale()  # its coordinator died: a staging one will never be committed
            rollout = None
        if rollout is None or rollout.coordinator_pid == self.board.pid:
            if rollout is None and self._candidate is not None and not self.swapping \
                    and self.registry.state().current != self._candidate.version:
                self._discard_candidate()  # the coordinator went away without committing
            return
        if rollout.phase == "aborted" and self._staged and self._staged.rollout_id == rollout.id:
            self._discard_candidate()
        if rollout.phase != "staging" or self._handled_rollout == rollout.id or self.draining:
            return
        if not self._swap_lock.acquire(blocking=False):
            return
        try:
            self._handled_rollout = rollout.id
            self._staged = Staged(rollout.id, rollout.version, "loading")
            self.publish()
            report = SwapReport(version=rollout.version, from_version=self.live_version, event="stage")
            try:
                candidate = self._build(rollout.version, report, role="follower")
            except SwapFailed as exc:
                self.metrics.swaps.labels(exc.outcome).inc()
                self._staged = Staged(rollout.id, rollout.version, "failed", exc.message, exc.outcome)
                self.publish()
                log.warning("staging refused", extra={"event": "stage_failed", "version": rollout.version,
                                                      "outcome": exc.outcome, "reason": exc.message})
                return
            self._stage(candidate, rollout.id)
            log.info("staged", extra={"event": "staged", "version": rollout.version, "rollout": rollout.id,
                                      **_flat(report.to_json())})
        finally:
            self._swap_lock.release()

    def convergence_problem(self) -> str | None:
        """Why this instance is not ready although it serves: a worker stuck on another version."""
        state = self.registry.state()
        if state.held or not state.current or time.time() - state.updated_at < self.settings.convergence_grace_s:
            return None
        for worker in self.board.workers():
            if not worker.draining and worker.version != state.current:
                return (f"worker {worker.pid} serves {worker.version!r} but the registry's current version "
                        f"is {state.current!r} (committed {time.time() - state.updated_at:.0f} s ago)")
        return None

    def heartbeat(self) -> WorkerInfo:
        return WorkerInfo(pid=self.board.pid, host=self.board.host, version=self.live_version,
                          state=self._state.value, in_flight=self.in_flight(), rss_bytes=self._rss(),
                          started_at=self._started_at, draining=self.draining, staged=self._staged,
                          stats=self.stats.summary())

    def stats_of_all_workers(self) -> list[dict[str, Any]]:
        """Recent per-version request outcomes of this process and every live peer."""
        return [self.stats.summary()] + [w.stats for w in self.board.peers()]

    def publish(self) -> None:
        self.board.publish(self.heartbeat())

    @property
    def has_candidate(self) -> bool:
        return self._candidate is not None

    def unload(self, *, actor: str = "api") -> dict[str, Any]:
        """Free the model in every process following the registry; readiness then says why."""
        if not self._swap_lock.acquire(blocking=False):
            raise SwapInProgress("a swap is running; unload when it has finished", retry_after=2)
        try:
            state = self.registry.set_held(True, actor=actor)
            self.applied_generation = state.generation
            self.held_by_operator = True
            return self._unload_local(actor=actor)
        finally:
            self._swap_lock.release()

    def load(self, *, actor: str = "api") -> SwapReport | None:
        """Undo an unload: every process loads the registry's current version again."""
        if not self._swap_lock.acquire(blocking=False):
            raise SwapInProgress("a swap is running; load when it has finished", retry_after=2)
        try:
            # this process loads it below: its own watcher must not race it to the swap lock
            self.applied_generation = self.registry.set_held(False, actor=actor).generation
            self.held_by_operator = False
        finally:
            self._swap_lock.release()
        return self.load_current(actor=actor)

    def _unload_local(self, *, actor: str) -> dict[str, Any]:
        with self._cond:
            old, self._live = self._live, None
        if old is None:
            return {"unloaded": None}
        self._state = ModelState.UNLOADING
        report = SwapReport(version=old.version, from_version=old.version, event="unload")
        self.metrics.set_active_version(None, old.version)
        self.metrics.model_memory.set(0)
        self._retire(old, report)
        self._state = ModelState.NOT_LOADED
        self.publish()
        log.info("model unloaded", extra={"event": "unload", "actor": actor, **_flat(report.to_json())})
        return {"unloaded": report.version, **report.to_json()}

    def shutdown(self) -> None:
        with self._cond:
            live, self._live = self._live, None
            candidate, self._candidate = self._candidate, None
        for model in (live, candidate):
            if model is not None:
                model.engine.close()
        self._state = ModelState.NOT_LOADED
        self.board.withdraw()

    # -- helpers ----------------------------------------------------------------------------

    def _phase(self, phase: str, started: float) -> float:
        elapsed = time.perf_counter() - started
        self.metrics.swap_phase.labels(phase).observe(elapsed)
        return elapsed

    def _rss(self) -> int:
        return int(self._process.memory_info().rss)

    def _fault(self, version: str, role: str) -> str | None:
        """Test-only: ``faults/load.json`` ({"version", "role"}) makes ONE worker fail its load.

        Honoured only with ``fault_injection`` on. The first matching worker claims the file by
        renaming it, so exactly one process fails, whichever it is.
        """
        if not self.settings.fault_injection:
            return None
        path = self.registry.root / "faults" / "load.json"
        try:
            fault = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return None
        if fault.get("version") not in (None, version) or fault.get("role") not in (None, role):
            return None
        try:
            os.rename(path, path.with_name(f"load.claimed.{os.getpid()}.json"))
        except FileNotFoundError:
            return None  # another worker claimed it first
        return f"injected load failure in worker {os.getpid()}"


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
