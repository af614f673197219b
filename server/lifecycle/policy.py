"""The lifecycle of one model in one process: every change to what it serves, read top to bottom.

A swap (update, rollback, reload, load) always goes the same way:

1. build the candidate beside the live engine (:class:`CandidateBuilder`: verify, load, smoke);
2. with the registry: stage it on every worker that shares the registry and commit the pointer
   only when all are ready (:class:`Rollouts`); without: only this process changes;
3. flip the live pointer (:class:`ModelHolder`), then drain the old engine's requests, free it and
   measure the memory that came back;
4. optionally watch the new version and roll back by itself if it is worse (:class:`PostSwapWatch`).

A failure in steps 1-2 discards the candidate: the old version never stops serving, and the
failure goes to the caller, the log, the metrics and the registry's history. Background followers
bring this process to what the registry says (a CLI promote, a peer's rollout, an unload).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from enum import StrEnum
from typing import Any

from server.errors import SwapFailed, UnexpectedCurrent
from server.lifecycle.board import WorkerBoard, WorkerInfo
from server.lifecycle.builder import CandidateBuilder
from server.lifecycle.canary import CanaryControl
from server.lifecycle.holder import LoadedModel, ModelHolder, resident_bytes
from server.lifecycle.report import SwapReport
from server.lifecycle.rollout import Coordination, Rollouts
from server.lifecycle.stats import VersionStats
from server.lifecycle.swaplock import SwapLock
from server.lifecycle.watch import PostSwapWatch
from server.metrics import ModelMetrics
from server.settings import Settings
from server.storage.registry import ANY_CURRENT, Registry
from server.vocab import HistoryEvent

log = logging.getLogger("voxswap.loader")
RETRY_FIRST_S, RETRY_MAX_S = 1.0, 60.0  # backoff of a load that failed in this process only
BUSY = "another swap is running; retry when it has finished"


class ModelState(StrEnum):
    NOT_LOADED = "not_loaded"
    LOADING = "loading"
    READY = "ready"
    SWAPPING = "swapping"
    UNLOADING = "unloading"


class ModelLifecycle:
    """Holds the live version of one named model in this process and performs every change to it.

    Each model has its own: a swap of one never waits for another's, and its failure stays its own.
    """

    def __init__(self, registry: Registry, settings: Settings, metrics: ModelMetrics):
        self.name = registry.model
        self.registry = registry
        self.settings = settings
        self.metrics = metrics
        self.holder = ModelHolder(drain_timeout_s=settings.drain_timeout_s, unavailable=self.not_ready_reason)
        self.builder = CandidateBuilder(registry, settings, metrics)
        self.board = WorkerBoard(registry)
        self.swap_lock = SwapLock()
        self.rollouts = Rollouts(registry=registry, board=self.board, holder=self.holder, builder=self.builder,
                                 swap_lock=self.swap_lock, metrics=metrics, timeout_s=settings.rollout_timeout_s)
        self.rollouts.publish = self.publish
        self.stats = VersionStats()
        self.watch = PostSwapWatch(self, registry, settings)
        self.canary = CanaryControl(self)
        self.builder.lean = self.canary.shadows
        self.after_swap: Callable[[SwapReport], None] = lambda report: None
        self.held_by_operator = False  # unloaded on purpose: do not follow the registry back in
        self.last_error: str | None = None
        self.applied_generation = 0
        self._state = ModelState.NOT_LOADED
        self._retry_at = 0.0  # a load that failed here while peers serve the version: retry then
        self._retry_backoff_s = RETRY_FIRST_S
        self._started_at = time.time()

    # -- reading ----------------------------------------------------------------------------

    @property
    def state(self) -> ModelState:
        return self._state

    @property
    def live(self) -> LoadedModel | None:
        return self.holder.live

    @property
    def live_version(self) -> str | None:
        live = self.holder.live
        return live.version if live else None

    @property
    def swapping(self) -> bool:
        return self.swap_lock.held

    @property
    def has_candidate(self) -> bool:
        return self.holder.candidate is not None

    @property
    def draining(self) -> bool:
        return self.rollouts.draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self.rollouts.draining = value

    def in_flight(self) -> int:
        return self.holder.in_flight()

    def loaded_versions(self) -> list[str]:
        return self.holder.loaded_versions()

    def lease(self, version: str | None = None) -> AbstractContextManager[LoadedModel]:
        """The live version (or a pinned loaded one) for the duration of one request."""
        return self.holder.lease(version)

    def not_ready_reason(self) -> str:
        if self._state == ModelState.LOADING:
            return "the model is loading"
        if self._state == ModelState.UNLOADING:
            return "the model is being unloaded"
        if self.held_by_operator:
            return (f"model {self.name!r} was unloaded by an operator; POST /admin/models/{self.name}/load "
                    "to load it")
        if self.last_error:
            return f"model {self.name!r} is not loaded: {self.last_error}"
        return f"model {self.name!r} is not loaded"

    # -- swaps ------------------------------------------------------------------------------

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
        self.canary.refuse_swaps()
        with self.swap_lock.hold(BUSY):
            live_before = self.live_version
            committed = self.registry.state().current
            if expected_current is not ANY_CURRENT:
                actual, what = (committed, "current") if commit_registry else (live_before, "live")
                if actual != expected_current:
                    raise UnexpectedCurrent(f"{what} version is {actual!r}, not {expected_current!r}; nothing changed")
            with self._swapping(SwapReport(version=version, from_version=live_before, event=event, model=self.name),
                                actor, announce=False) as report:
                if commit_registry:
                    self._roll_out(report, actor, committed)
                else:
                    self._go_live(self.builder.build(version, report), report)
        seconds = self.settings.watch_seconds if watch_seconds is None else watch_seconds
        if commit_registry and seconds > 0 and live_before and live_before != version:
            report.watch = self.watch.start(version, live_before, seconds).to_json()
        # only now: a listener that recycles this worker must already see the watch running
        self.after_swap(report)
        return report

    def roll_back_to(self, version: str, *, from_version: str) -> None:
        """The post-swap watch's verdict: back to ``version``, unless ``from_version`` was replaced."""
        self.swap_to(version, expected_current=from_version, event="auto_rollback", actor="watch",
                     watch_seconds=0)

    def _roll_out(self, report: SwapReport, actor: str, committed: str | None) -> None:
        """Every worker stages the version; the registry moves (compare-and-swap with ``committed``,
        the current version when the swap began) only when all are ready; then all flip."""
        with self.rollouts.coordinate(report) as rollout:
            candidate = self.builder.build(report.version, report)
            rollout.stage(candidate)
            rollout.await_peers_staged()
            self._commit(rollout, candidate, report, committed, actor)

    def _commit(self, rollout: Coordination, candidate: LoadedModel, report: SwapReport, committed: str | None,
                actor: str) -> None:
        """Phase two: the registry names the version, every worker flips to the candidate it holds."""
        state = self.registry.promote(report.version, expected_current=committed, actor=actor,
                                      event=HistoryEvent(report.event),
                                      details={"timings": report.to_json()["timings"]})
        report.generation = self.applied_generation = state.generation
        self.metrics.generation(state.generation)
        rollout.commit()
        self._go_live(candidate, report)
        report.converged = rollout.await_peers_serving(self.live_version)

    def promote_staged(self, coordination: Coordination, candidate: LoadedModel, report: SwapReport) -> None:
        """A passed canary's promotion: the commit of a rollout whose candidate every worker holds
        (its coordinator holds the swap lock already)."""
        report.event = HistoryEvent.PROMOTE
        with self._swapping(report, "canary"):
            self._commit(coordination, candidate, report, report.from_version, "canary")

    @contextmanager
    def _swapping(self, report: SwapReport, actor: str, *, announce: bool = True) -> Iterator[SwapReport]:
        """The bookkeeping of every swap: state, metrics, log, and history when it is refused;
        ``after_swap`` is told of a success unless the caller (``swap_to``) tells it later."""
        previous_state = self._state
        self._state = ModelState.SWAPPING if self.live else ModelState.LOADING
        log.info("swap started", extra={"event": "swap_start", "model": self.name, "version": report.version,
                                         "from_version": report.from_version, "reason": report.event})
        try:
            yield report
        except SwapFailed as exc:
            self._state = previous_state if self.live else ModelState.NOT_LOADED
            self.metrics.swap(exc.outcome)
            report.outcome, report.reason = exc.outcome, exc.message
            report.timings["total_s"] = time.perf_counter() - report.started
            exc.report = report.to_json()
            if self.live is None:
                self.last_error = exc.message
            self.registry.record(HistoryEvent.SWAP_FAILED, version=report.version, from_version=report.from_version,
                                 actor=actor, outcome=exc.outcome, reason=exc.message, request=report.event,
                                 timings=exc.report["timings"], workers=report.workers or None)
            log.warning("swap refused", extra={"event": "swap_failed", "model": self.name, "version": report.version,
                                               "outcome": exc.outcome, "reason": exc.message})
            raise
        except UnexpectedCurrent as exc:
            self._state = previous_state if self.live else ModelState.NOT_LOADED
            self.metrics.swap("conflict")
            report.outcome, report.reason = "conflict", exc.message
            raise
        except BaseException:
            self._state = ModelState.READY if self.live else ModelState.NOT_LOADED
            raise
        report.timings["total_s"] = time.perf_counter() - report.started
        self.metrics.swap("rolled_back" if report.event in ("rollback", "auto_rollback") else "success")
        log.info("swap finished", extra={"event": "swap_done", "version": report.version,
                                         "from_version": report.from_version, **report.log_fields()})
        if announce:
            self.after_swap(report)

    def _go_live(self, candidate: LoadedModel, report: SwapReport) -> None:
        """Flip to ``candidate``, then drain, free and measure the version it replaced."""
        report.memory["rss_with_both_bytes"] = resident_bytes()
        was_staged = self.holder.candidate is candidate
        old = self.holder.flip(candidate)
        if was_staged:
            self.rollouts.staged = None
        report.timings["time_to_flip_s"] = time.perf_counter() - report.started
        self.metrics.active_version(candidate.version, old.version if old else None)
        self.metrics.memory(candidate.memory_bytes)
        self.last_error = None
        self.held_by_operator = False
        self._state = ModelState.READY
        self.publish()
        if old is not None:
            self._retire(old, report)

    def _retire(self, old: LoadedModel, report: SwapReport) -> None:
        done = self.holder.retire(old)
        done.record_in(report)
        self.metrics.phase("drain", done.drain_s)
        self.metrics.phase("free", done.free_s)
        self.metrics.freed(done.freed_bytes)
        if not done.drained:
            log.warning("drain timed out; the old engine is freed when its last request ends",
                        extra={"event": "drain_timeout", "model": self.name,
                                                     "version": report.from_version})

    # -- following the registry -------------------------------------------------------------

    def load_current(self, *, actor: str = "startup") -> SwapReport | None:
        """Load the registry's current version; if it is refused, fall back to the previous one."""
        state = self.registry.state()
        self.applied_generation = state.generation
        self.metrics.generation(state.generation)
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
            if fallback and self.live is None:
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
        with self.swap_lock.try_hold() as ours:
            return ours and self._follow_registry()

    def _follow_registry(self) -> bool:
        state = self.registry.state()
        if state.generation == self.applied_generation:
            return True
        self.metrics.generation(state.generation)
        if state.held:
            if self.live is not None:
                self._unload_local(actor="registry")
            self.held_by_operator = True
            self.applied_generation = state.generation
            return True
        self.held_by_operator = False
        target = state.current
        if target is None or target == self.live_version:
            self.applied_generation = state.generation
            return True
        staged = self.holder.candidate
        try:
            with self._swapping(SwapReport(version=target, from_version=self.live_version,
                                           event="follow_registry", model=self.name), "registry") as report:
                if staged is not None and staged.version == target:
                    self._go_live(staged, report)
                else:
                    self._go_live(self.builder.build(target, report), report)
        except SwapFailed as exc:
            if self._failed_only_here(target, exc):
                return False
            reverted = self.registry.revert(target, to=self.live_version, reason=exc.message)
            self.applied_generation = reverted.generation
            return True
        self.applied_generation = state.generation
        self._retry_backoff_s = RETRY_FIRST_S
        return True

    def _failed_only_here(self, version: str, exc: SwapFailed) -> bool:
        """True when live peers serve ``version``: the failure is this process's own (memory, a slow
        start beside busy peers), and reverting the registry would roll every worker back."""
        serving = [p.pid for p in self.board.peers() if p.version == version]
        if not serving:
            return False
        self.last_error = f"{exc.message}; workers {serving} serve it, retrying in {self._retry_backoff_s:g} s"
        self._retry_at = time.monotonic() + self._retry_backoff_s
        self._retry_backoff_s = min(self._retry_backoff_s * 2, RETRY_MAX_S)
        self.registry.record(HistoryEvent.LOAD_RETRY, version=version, actor="server", outcome=exc.outcome,
                             reason=exc.message, pid=os.getpid(), peers_serving=serving)
        log.warning("version refused here but served by peers: retrying, registry left alone",
                    extra={"event": "local_load_failed", "model": self.name, "version": version, "peers": serving,
                           "reason": exc.message})
        return True

    def convergence_problem(self) -> str | None:
        """Why this instance is not ready although it serves: a worker stuck on another version."""
        return self.board.convergence_problem(grace_s=self.settings.convergence_grace_s)

    # -- heartbeat --------------------------------------------------------------------------

    def publish(self) -> None:
        """This process's heartbeat on the board: what it serves, how busy it is, what it staged."""
        self.board.publish(WorkerInfo(
            pid=self.board.pid, host=self.board.host, version=self.live_version, state=self._state.value,
            in_flight=self.in_flight(), rss_bytes=resident_bytes(), started_at=self._started_at,
            draining=self.draining, staged=self.rollouts.staged, stats=self.stats.summary()))
        self.canary.publish()

    def stats_of_all_workers(self) -> list[dict[str, dict[str, Any]]]:
        """Recent per-version request outcomes of this process and every live peer."""
        return [self.stats.summary()] + [w.stats for w in self.board.peers()]

    # -- load and unload --------------------------------------------------------------------

    def unload(self, *, actor: str = "api") -> dict[str, Any]:
        """Free the model in every process following the registry; readiness then says why."""
        self.canary.refuse_swaps()
        with self.swap_lock.hold("a swap is running; unload when it has finished"):
            state = self.registry.set_held(True, actor=actor)
            self.applied_generation = state.generation
            self.held_by_operator = True
            return self._unload_local(actor=actor)

    def load(self, *, actor: str = "api") -> SwapReport | None:
        """Undo an unload: every process loads the registry's current version again."""
        self.canary.refuse_swaps()
        with self.swap_lock.hold("a swap is running; load when it has finished"):
            # this process loads it below: its own watcher must not race it to the swap lock
            self.applied_generation = self.registry.set_held(False, actor=actor).generation
            self.held_by_operator = False
        return self.load_current(actor=actor)

    def _unload_local(self, *, actor: str) -> dict[str, Any]:
        old = self.holder.take_live()
        if old is None:
            return {"unloaded": None}
        self._state = ModelState.UNLOADING
        report = SwapReport(version=old.version, from_version=old.version, event="unload", model=self.name)
        self.metrics.active_version(None, old.version)
        self.metrics.memory(0)
        self._retire(old, report)
        self._state = ModelState.NOT_LOADED
        self.publish()
        log.info("model unloaded", extra={"event": "unload", "actor": actor, **report.log_fields()})
        return {"unloaded": report.version, **report.to_json()}

    def shutdown(self) -> None:
        self.holder.close_all()
        self._state = ModelState.NOT_LOADED
        self.board.withdraw()
