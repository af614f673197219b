"""The two-phase rollout across the workers that share a registry, both sides of it in one place.

An admin update reaches one worker, the *coordinator*; the others *follow* through the files of the
:class:`WorkerBoard` (``rollout.json`` and each worker's heartbeat):

1. the coordinator claims ``rollout.json`` (phase ``staging``), builds and stages the candidate;
2. every follower sees the rollout, builds and smoke-tests the version beside its live one, stages
   it and reports ``ready`` (or ``failed``, with the reason) in its heartbeat;
3. when every live peer is ready, the coordinator commits ``state.json`` (compare-and-swap) and
   marks the rollout ``committed``; every worker then flips to the engine it already built;
4. if any peer fails or the deadline passes, the phase becomes ``aborted``: each worker drops its
   candidate and nobody switched.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict

from server.errors import SwapFailed, UnexpectedCurrent, VoxswapError
from server.lifecycle.board import Rollout, Staged, WorkerBoard
from server.lifecycle.builder import CandidateBuilder
from server.lifecycle.holder import LoadedModel, ModelHolder
from server.lifecycle.report import SwapReport
from server.lifecycle.swaplock import SwapLock
from server.metrics import ModelMetrics
from server.storage.registry import Registry

log = logging.getLogger("voxswap.lifecycle")
POLL_S = 0.05


class Rollouts:
    """This worker's part in rollouts: coordinating the ones it was asked for, following the rest."""

    def __init__(self, *, registry: Registry, board: WorkerBoard, holder: ModelHolder, builder: CandidateBuilder,
                 swap_lock: SwapLock, metrics: ModelMetrics, timeout_s: float):
        self.registry = registry
        self.board = board
        self.holder = holder
        self.builder = builder
        self.swap_lock = swap_lock
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.publish: Callable[[], None] = lambda: None  # the lifecycle's heartbeat, set by its owner
        self.staged: Staged | None = None  # how far this worker got with the rollout being staged
        self.draining = False  # shutting down: serve on, but take part in no rollout
        self._handled: str | None = None  # the last rollout this worker staged (or failed to)

    # -- the coordinator's side ----------------------------------------------------------------

    @contextmanager
    def coordinate(self, report: SwapReport, *, hold_s: float = 0.0) -> Iterator[Coordination]:
        """Claim the registry for one rollout (409 while another holds it) and release it after.

        Anything that goes wrong before the commit aborts the rollout with its reason, so every
        follower drops its candidate; the exception goes on to the caller. ``hold_s``: how long
        the staged candidates may be held before the commit (a canary's window).
        """
        rollout = self.board.begin(report.version, report.from_version, self.timeout_s + hold_s)
        coordination = Coordination(self, rollout, report)
        try:
            yield coordination
        except BaseException as exc:
            if rollout.phase == "staging":
                self.board.set_phase(rollout, "aborted", coordination.abort_reason(exc))
                if coordination.staged:
                    self.discard()
            raise
        finally:
            self.board.end(rollout)

    def discard(self) -> None:
        """Drop the staged candidate and say so in the heartbeat."""
        self.holder.discard_candidate()
        self.staged = None
        self.publish()

    def stage(self, candidate: LoadedModel, rollout_id: str) -> None:
        self.holder.stage(candidate)
        self.staged = Staged(rollout_id, candidate.version, "ready")
        self.publish()

    # -- the follower's side -------------------------------------------------------------------

    def follow(self) -> None:
        """Stage the rollout another worker coordinates, or drop a candidate it aborted."""
        rollout = self.board.rollout()
        if rollout is not None and self.board.stale(rollout):
            self.board.clear_stale()  # its coordinator died: a staging one will never be committed
            rollout = None
        if rollout is None or self.board.coordinates(rollout):
            candidate = self.holder.candidate
            if rollout is None and candidate is not None and not self.swap_lock.held \
                    and self.registry.state().current != candidate.version:
                self.discard()  # the coordinator went away without committing
            elif rollout is None and candidate is None and self.staged is not None and not self.swap_lock.held:
                self.staged = None  # a refusal of a rollout that is over: the heartbeat stops showing it
                self.publish()
            return
        if rollout.phase == "aborted" and self.staged and self.staged.rollout_id == rollout.id:
            self.discard()
        if rollout.phase != "staging" or self._handled == rollout.id or self.draining:
            return
        with self.swap_lock.try_hold() as ours:
            if ours:
                self._stage_for(rollout)

    def _stage_for(self, rollout: Rollout) -> None:
        self._handled = rollout.id
        self.staged = Staged(rollout.id, rollout.version, "loading")
        self.publish()
        live = self.holder.live
        report = SwapReport(version=rollout.version, from_version=live.version if live else None, event="stage",
                            model=self.registry.model)
        try:
            candidate = self.builder.build(rollout.version, report, role="follower")
        except SwapFailed as exc:
            self.metrics.swap(exc.outcome)
            self.staged = Staged(rollout.id, rollout.version, "failed", exc.message, exc.outcome)
            self.publish()
            log.warning("staging refused", extra={"event": "stage_failed", "version": rollout.version,
                                                  "outcome": exc.outcome, "reason": exc.message})
            return
        self.stage(candidate, rollout.id)
        log.info("staged", extra={"event": "staged", "version": rollout.version, "rollout": rollout.id,
                                  **report.log_fields()})


class Coordination:
    """One rollout this worker coordinates, phase by phase (see the module's docstring)."""

    def __init__(self, rollouts: Rollouts, rollout: Rollout, report: SwapReport):
        self.rollouts = rollouts
        self.rollout = rollout
        self.report = report
        self.staged = False

    def stage(self, candidate: LoadedModel) -> None:
        """Hold our own candidate beside the live version (pinnable) and tell the peers."""
        self.rollouts.stage(candidate, self.rollout.id)
        self.staged = True

    def abort(self, reason: str) -> None:
        """End the rollout uncommitted: every worker drops its candidate; nobody switched."""
        self.rollouts.board.set_phase(self.rollout, "aborted", reason)
        if self.staged:
            self.rollouts.discard()
            self.staged = False

    def await_peers_staged(self) -> None:
        """Phase one: every live peer has built and smoke-tested the version, or raise why not."""
        started = time.perf_counter()
        deadline = min(self.rollout.deadline, time.time() + self.rollouts.timeout_s)
        try:
            while True:
                peers = self.rollouts.board.peers()
                ours = {p.id: p.staged for p in peers
                        if p.staged is not None and p.staged.rollout_id == self.rollout.id}
                self.report.workers = [{"pid": p.pid, "staged": asdict(ours[p.id]) if p.id in ours else None}
                                       for p in peers]
                failed = [p for p in peers if p.id in ours and ours[p.id].status == "failed"]
                if failed:
                    staged = ours[failed[0].id]
                    raise SwapFailed(f"worker {failed[0].pid} refused version {self.rollout.version!r}: "
                                     f"{staged.reason}; no worker switched", outcome=staged.outcome or "load_failed")
                if all(p.id in ours and ours[p.id].status == "ready" for p in peers):
                    return
                if time.time() > deadline:
                    waiting = [p.pid for p in peers if p.id not in ours or ours[p.id].status != "ready"]
                    raise SwapFailed(f"workers {waiting} did not stage {self.rollout.version!r} within "
                                     f"{self.rollouts.timeout_s:g} s; no worker switched", outcome="timeout")
                time.sleep(POLL_S)
        finally:
            self.report.timings["peers_staged_s"] = time.perf_counter() - started

    def commit(self) -> None:
        """The registry now names the version: followers flip to what they staged."""
        self.rollouts.board.set_phase(self.rollout, "committed")

    def await_peers_serving(self, own_version: str | None) -> bool:
        """Phase two: the answer waits until every live worker serves the committed version."""
        started = time.perf_counter()
        deadline = time.monotonic() + self.rollouts.timeout_s
        board = self.rollouts.board
        try:
            while True:
                peers = board.peers()
                self.report.workers = [{"pid": board.pid, "version": own_version}] + \
                    [{"pid": p.pid, "version": p.version} for p in peers]
                if all(p.version == self.rollout.version for p in peers):
                    return True
                if time.monotonic() > deadline:
                    log.warning("workers did not converge", extra={"event": "converge_timeout",
                                                                   "version": self.rollout.version,
                                                                   "workers": self.report.workers})
                    return False
                time.sleep(POLL_S)
        finally:
            self.report.timings["peers_converged_s"] = time.perf_counter() - started

    @staticmethod
    def abort_reason(exc: BaseException) -> str:
        if isinstance(exc, UnexpectedCurrent):
            return "the registry changed underneath the rollout"
        return exc.message if isinstance(exc, VoxswapError) else f"{type(exc).__name__}: {exc}"
