"""Canary and shadow rollouts of one model: a candidate earns traffic before it takes it all.

The worker that is asked coordinates, in a thread of its own, with the model's swap lock held:

1. the candidate is built beside the live version and smoke-tested on every worker, through the
   two-phase rollout's staging phase (a refusal anywhere ends it: nothing served it);
2. ``canary.json`` says ``running``: each worker sends ``percent`` of clients (canary, by a stable
   hash of the client key) to its staged candidate, or mirrors ``percent`` of requests to it off
   the request path (shadow, compared transcript by transcript);
3. over the window every worker's figures are summed (the heartbeats' per-version outcomes, and
   the shadow comparisons each worker publishes under ``canary/``) and judged against the live
   version's over the same window; a candidate that is worse fails at once;
4. the verdict: promote (the rollout is committed: a normal flip to the candidate every worker
   already holds), hold (the verdict is recorded and the candidate dropped), failed, inconclusive
   or stopped (the rollout is aborted: every worker drops it, the live version never left).

A coordinator killed mid-canary leaves its rollout stale; the followers drop their candidates as for
any abandoned rollout, and the first worker to look marks the canary ``interrupted``.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
import uuid
from typing import Any, Protocol

from server.errors import Conflict, NotFound, NotReady, SwapInProgress, UnexpectedCurrent, VoxswapError
from server.lifecycle.board import WorkerBoard
from server.lifecycle.builder import CandidateBuilder
from server.lifecycle.holder import LoadedModel, ModelHolder
from server.lifecycle.report import SwapReport
from server.lifecycle.rollout import Coordination, Rollouts
from server.lifecycle.stats import aggregate
from server.lifecycle.swaplock import SwapLock
from server.lifecycle.verdict import CanaryState, Criteria, ShadowTally, comparison, judge, on_candidate, shadow_summary
from server.settings import Settings
from server.storage.files import write_json_atomic
from server.storage.registry import ANY_CURRENT, Registry
from server.vocab import HistoryEvent

log = logging.getLogger("voxswap.canary")
TICK_S = 0.25
GRACE_S = 30.0  # beyond the window, how long the rollout of a canary may take to finish


class CanaryHost(Protocol):
    """What a canary needs of its model's lifecycle (the lifecycle provides it)."""

    name: str
    registry: Registry
    settings: Settings
    board: WorkerBoard
    holder: ModelHolder
    builder: CandidateBuilder
    rollouts: Rollouts
    swap_lock: SwapLock

    @property
    def live_version(self) -> str | None: ...

    def stats_of_all_workers(self) -> list[dict[str, dict[str, Any]]]: ...

    def promote_staged(self, coordination: Coordination, candidate: LoadedModel, report: SwapReport) -> None: ...

    def swap_to(self, version: str, *, expected_current: str | None, event: str, actor: str) -> SwapReport: ...


class CanaryControl:
    """This process's part in its model's canaries: coordinating one, routing by the one running."""

    def __init__(self, host: CanaryHost):
        self.host = host
        self.path = host.registry.root / "canary.json"
        self.dir = host.registry.root / "canary"
        self.tally = ShadowTally()
        self._cache: tuple[tuple[int, int, int] | None, CanaryState | None] = (None, None)
        self._thread: threading.Thread | None = None

    # -- reading ---------------------------------------------------------------------------

    def _read(self) -> CanaryState | None:
        try:
            return CanaryState.from_json(json.loads(self.path.read_text()))
        except (FileNotFoundError, ValueError, TypeError):
            return None

    def active(self) -> CanaryState | None:
        """The running canary, if any: one ``stat`` per call, the file read only when it changed."""
        try:
            st = self.path.stat()
            signature: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            signature = None
        cached_signature, cached = self._cache
        if signature != cached_signature:
            cached = self._read() if signature else None
            self._cache = (signature, cached)
        return cached if cached is not None and cached.running else None

    def current(self) -> CanaryState | None:
        """The last canary of this model, with a dead coordinator's marked ``interrupted``."""
        self.check()
        return self._read()

    def refuse_swaps(self) -> None:
        """409 naming the canary: while one runs, the model changes only through its verdict (which
        its own thread carries out)."""
        state = self.active()
        if state is not None and threading.current_thread() is not self._thread:  # its own promotion passes
            raise SwapInProgress(
                f"a {state.mode} of version {state.version!r} is running on model {self.host.name!r}; it ends with "
                f"its verdict, or DELETE /admin/models/{self.host.name}/canary stops it", retry_after=5)

    # -- routing (every worker) --------------------------------------------------------------

    def route(self, client_key: str) -> str | None:
        """The candidate's version for a client in the canary's share, else None (the live one).
        Without a staged candidate there is nothing to route to, and the file is not even looked at:
        the common case costs no ``stat``."""
        candidate = self.host.holder.candidate
        if candidate is None:
            return None
        state = self.active()
        if state is None or state.mode != "canary" or state.state != "running" or candidate is None \
                or candidate.version != state.version:
            return None
        return state.version if on_candidate(state.id, client_key, state.percent) else None

    def mirror(self) -> tuple[str, str] | None:
        """(canary id, version) when this request is one of the shadow's share, else None."""
        candidate = self.host.holder.candidate
        if candidate is None:
            return None
        state = self.active()
        if state is None or state.mode != "shadow" or state.state != "running" or candidate is None \
                or candidate.version != state.version or random.random() * 100 >= state.percent:
            return None
        return state.id, state.version

    def publish(self) -> None:
        """This worker's shadow comparisons, beside its heartbeat, while a shadow runs."""
        state = self.active()
        if state is None or state.mode != "shadow":
            return
        self.tally.reset(state.id)
        self.dir.mkdir(exist_ok=True)
        write_json_atomic(self.dir / f"{self.host.board.id}.json", self.tally.to_json())

    # -- coordinating (the worker that was asked) ------------------------------------------

    def start(self, version: str, *, mode: str, percent: float, duration_s: float, on_pass: str,
              criteria: dict[str, Any] | None = None, expected_current: Any = ANY_CURRENT) -> CanaryState:
        """Blocking: build and stage the candidate on every worker, then let it earn traffic in the
        background. Answers once the candidate serves its share, or raises why it never will."""
        self.refuse_swaps()
        host = self.host
        host.registry.manifest(version)  # 404 before any work
        live = host.live_version
        if live is None:
            raise NotReady(f"model {host.name!r} has no live version to compare a candidate with")
        if version == live:
            raise Conflict(f"version {version!r} is already live on model {host.name!r}")
        current = host.registry.state().current
        if expected_current is not ANY_CURRENT and current != expected_current:
            raise UnexpectedCurrent(f"current version is {current!r}, not {expected_current!r}; nothing changed")
        rules = Criteria.of(host.settings, criteria)
        state = CanaryState(id=uuid.uuid4().hex[:12], model=host.name, version=version, live_version=live, mode=mode,
                            percent=percent, duration_s=duration_s, on_pass=on_pass, criteria=rules.__dict__.copy(),
                            state="staging", created_at=time.time(), coordinator_id=host.board.id,
                            coordinator_pid=os.getpid())
        started = threading.Event()
        failure: list[VoxswapError] = []
        self._thread = threading.Thread(target=self._run, args=(state, rules, started, failure),
                                        name=f"voxswap-canary-{host.name}", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            raise failure[0]
        return state

    def _run(self, state: CanaryState, rules: Criteria, started: threading.Event,
             failure: list[VoxswapError]) -> None:
        try:
            outcome, reason, afresh = self._trial(state, rules, started)
            if afresh:
                outcome, reason = self._promote_afresh(state)
            self._finish(state, outcome, reason)
        except VoxswapError as exc:
            if not started.is_set():
                failure.append(exc)
            self._finish(state, "failed" if state.state != "stopped" else "stopped", exc.message)
        except BaseException as exc:
            if not started.is_set():
                failure.append(Conflict(f"the canary could not start: {type(exc).__name__}: {exc}"))
            self._finish(state, "failed", f"{type(exc).__name__}: {exc}")
            raise
        finally:
            started.set()

    def _trial(self, state: CanaryState, rules: Criteria, started: threading.Event) -> tuple[str, str, bool]:
        """Stage everywhere, observe, judge; a canary's promotion is committed here. Returns the
        outcome, its reason, and whether a passed shadow is to be promoted by a fresh update."""
        host = self.host
        report = SwapReport(version=state.version, from_version=state.live_version, event="canary", model=host.name)
        with host.swap_lock.hold("another swap is running; start the canary when it has finished"):
            self._write(state)  # before the rollout: a follower staging it must know it shadows (lean build)
            with host.rollouts.coordinate(report, hold_s=state.duration_s + GRACE_S) as coordination:
                candidate = host.builder.build(state.version, report)
                coordination.stage(candidate)
                coordination.await_peers_staged()
                self._begin(state, coordination.rollout.id, report)
                started.set()
                outcome, reason = self._observe(state, rules)
                if outcome != "passed" or state.on_pass != "promote":
                    coordination.abort(reason or f"the {state.mode} ended: {outcome}")
                    return outcome, reason, False
                if state.mode == "shadow":
                    coordination.abort("the shadow passed; its lean candidate gives way to a fresh build")
                    return outcome, reason, True
                host.promote_staged(coordination, candidate, report)
                return "promoted", "", False

    def _begin(self, state: CanaryState, rollout_id: str, report: SwapReport) -> None:
        """Every worker holds the candidate: from now on it takes its share."""
        state.rollout_id, state.state = rollout_id, "running"
        state.started_at = time.time()
        state.until = state.started_at + state.duration_s
        self._clear_tallies()
        self._write(state)
        self.host.registry.record(HistoryEvent.CANARY_START, version=state.version, live_version=state.live_version,
                                  mode=state.mode, percent=state.percent, duration_s=state.duration_s,
                                  canary=state.id, actor="admin", timings=report.to_json()["timings"])

    def shadows(self, version: str) -> bool:
        """Whether ``version`` is being built to shadow: then with one intra-op thread, so that the
        mirrors' low priority holds for all their compute (onnxruntime's pool threads would run at
        normal priority, spinning for cores the live requests need)."""
        state = self.active()
        return state is not None and state.mode == "shadow" and state.version == version

    def _promote_afresh(self, state: CanaryState) -> tuple[str, str]:
        try:
            self.host.swap_to(state.version, expected_current=state.live_version, event="promote", actor="canary")
        except VoxswapError as exc:
            return "failed", f"it passed, but the promotion failed: {exc.message}"
        return "promoted", ""

    def _observe(self, state: CanaryState, rules: Criteria) -> tuple[str, str]:
        """Judge every tick until the window ends, the candidate proves worse, or the canary is stopped."""
        assert state.started_at is not None and state.until is not None
        while True:
            time.sleep(TICK_S)
            on_disk = self._read()
            if on_disk is None or on_disk.id != state.id or on_disk.state == "stopped":
                return "stopped", on_disk.reason if on_disk else "its state file was removed"
            if self.host.registry.state().current != state.live_version:
                return "stopped", f"the registry's current version changed to {self.host.registry.state().current!r}"
            candidate, live, shadow = self._windows(state, rules)
            state.comparison = comparison(candidate, live, shadow)
            verdict = judge(candidate, live, shadow, rules)
            if verdict is not None:
                return "failed", verdict
            if time.time() >= state.until:
                short = [f"{role} answered {w.requests}" for role, w in (("the candidate", candidate), ("live", live))
                         if w.requests < rules.min_requests]
                if state.mode == "shadow" and shadow is not None and shadow["compared"] < rules.min_requests:
                    short.append(f"{shadow['compared']} transcripts were compared")
                if short:
                    return "inconclusive", f"{' and '.join(short)} (need {rules.min_requests} each)"
                return "passed", ""
            self._write(state)

    def _windows(self, state: CanaryState, rules: Criteria) -> tuple[Any, Any, dict[str, Any] | None]:
        assert state.started_at is not None
        summaries = self.host.stats_of_all_workers()
        now = time.time() + 1
        candidate = aggregate(summaries, state.version, state.started_at, now)
        live = aggregate(summaries, state.live_version or "", state.started_at, now)
        shadow = shadow_summary(self._tallies(), state.id, rules) if state.mode == "shadow" else None
        return candidate, live, shadow

    def _tallies(self) -> list[dict[str, Any]]:
        """The shadow comparisons of every live worker, this one included."""
        self.publish()
        found = []
        for worker in self.host.board.workers():
            try:
                found.append(json.loads((self.dir / f"{worker.id}.json").read_text()))
            except (FileNotFoundError, ValueError):
                continue
        return found

    def _clear_tallies(self) -> None:
        if self.dir.is_dir():
            for path in self.dir.glob("*.json"):
                path.unlink(missing_ok=True)

    def _finish(self, state: CanaryState, outcome: str, reason: str) -> None:
        state.state, state.reason, state.finished_at = outcome, reason, time.time()
        self._write(state)
        self.host.registry.record(HistoryEvent(f"canary_{outcome}"), version=state.version, canary=state.id,
                                  live_version=state.live_version, mode=state.mode, percent=state.percent,
                                  reason=reason, comparison=state.comparison, actor="canary")
        log.info("canary finished", extra={"event": f"canary_{outcome}", "model": state.model,
                                           "version": state.version, "reason": reason})

    def _write(self, state: CanaryState) -> None:
        with self.host.registry.lock:
            on_disk = self._read()
            if on_disk is not None and on_disk.id == state.id and on_disk.state == "stopped" and state.running:
                state.state, state.reason = "stopped", on_disk.reason  # a DELETE elsewhere won
            write_json_atomic(self.path, state.to_json())

    # -- stopping (any worker) ---------------------------------------------------------------

    def stop(self, *, reason: str = "stopped by an operator") -> CanaryState:
        """End the running canary: every worker drops the candidate; the live version never left."""
        with self.host.registry.lock:
            state = self._read()
            if state is None:
                raise NotFound(f"model {self.host.name!r} has had no canary")
            if not state.running:
                raise Conflict(f"the canary of {state.version!r} already ended: {state.state}")
            state.state, state.reason = "stopped", reason
            write_json_atomic(self.path, state.to_json())
            rollout = self.host.board.rollout()
            if rollout is not None and rollout.id == state.rollout_id:
                self.host.board.set_phase(rollout, "aborted", reason)
        self._cache = (None, None)
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=10)  # the coordinator here: its verdict is written when it returns
        return self._read() or state

    def check(self) -> None:
        """A running canary whose coordinator is gone is ``interrupted`` (its rollout went stale, and
        every worker dropped the candidate as for any abandoned rollout)."""
        state = self.active()
        if state is None or (self._thread is not None and self._thread.is_alive()):
            return
        board = self.host.board
        rollout = board.rollout()
        if state.coordinator_id == board.id:
            orphaned = True  # this process coordinated it, and its thread is gone
        elif rollout is not None and rollout.id == state.rollout_id:
            orphaned = board.stale(rollout)
        else:
            orphaned = state.state == "running" or time.time() - state.created_at > self.host.settings.rollout_timeout_s
        if not orphaned:
            return
        with self.host.registry.lock:
            again = self._read()
            if again is None or again.id != state.id or not again.running:
                return
            again.state, again.finished_at = "interrupted", time.time()
            again.reason = (f"worker {again.coordinator_pid}, which coordinated it, is gone; every worker dropped "
                            "the candidate")
            write_json_atomic(self.path, again.to_json())
            self.host.registry.record(HistoryEvent.CANARY_INTERRUPTED, version=again.version, canary=again.id,
                                      reason=again.reason, comparison=again.comparison, actor="server")
        self._cache = (None, None)
