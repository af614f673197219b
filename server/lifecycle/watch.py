"""The post-swap watch: judge a newly promoted version against the one it replaced, and roll back
by itself when it is worse.

Every process records, per version, its recent requests (ok or failed, empty transcript or not,
latency) and publishes a summary in its heartbeat. The process that performed the swap runs the
watch: over the window it aggregates every worker's numbers for the new version, compares them
with the previous version's from before the flip, and past a threshold swaps back (with
``expected_current``, so a later deliberate update is never undone) and records why. The verdict
is written to ``watch.json`` next to the registry, where any worker, the admin API and
``deploy.sh`` read it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from server.errors import VoxswapError
from server.lifecycle.stats import Thresholds, Window, aggregate, compare
from server.settings import Settings
from server.storage.files import write_json_atomic
from server.storage.registry import Registry
from server.vocab import HistoryEvent

log = logging.getLogger("voxswap.watch")


class Watched(Protocol):
    """What the watch needs of the model it watches, and nothing more (the lifecycle provides it)."""

    @property
    def live_version(self) -> str | None: ...

    def stats_of_all_workers(self) -> list[dict[str, dict[str, Any]]]: ...

    def roll_back_to(self, version: str, *, from_version: str) -> None:
        """Swap back to ``version`` unless ``from_version`` is no longer current; raise if refused."""
def judge(new: Window, old: Window, s: Settings) -> str | None:
    """The reason to roll back, or None (see :func:`server.lifecycle.stats.compare`)."""
    rules = Thresholds(s.watch_min_requests, s.watch_max_error_rate_increase, s.watch_max_empty_rate_increase,
                       s.watch_max_latency_ratio)
    return compare(new, old, rules, against="before the swap")


@dataclass
class WatchState:
    version: str
    previous: str
    state: str  # watching | passed | rolled_back | inconclusive | superseded
    started_at: float
    until: float
    reason: str = ""
    new: dict[str, Any] = field(default_factory=dict)
    old: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class PostSwapWatch:
    """Runs one watch at a time, in a thread of the process that swapped."""

    def __init__(self, watched: Watched, registry: Registry, settings: Settings):
        self.watched = watched
        self.registry = registry
        self.settings = settings
        self.path = registry.root / "watch.json"
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def current(self) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads(self.path.read_text())
            return data
        except (FileNotFoundError, ValueError):
            return None

    def start(self, version: str, previous: str, seconds: float) -> WatchState:
        now = time.time()
        state = WatchState(version=version, previous=previous, state="watching", started_at=now,
                           until=now + seconds)
        write_json_atomic(self.path, state.to_json())
        self.registry.record(HistoryEvent.WATCH_START, version=version, previous=previous, seconds=seconds,
                                    pid=os.getpid())
        self._thread = threading.Thread(target=self._run, args=(state,), name="voxswap-watch", daemon=True)
        self._thread.start()
        return state

    def _run(self, state: WatchState) -> None:
        # the baseline is taken once, now: heartbeats keep only KEEP_S of samples, and a long watch
        # would otherwise see the old version's numbers age away and compare with nothing
        baseline_from = state.started_at - max(60.0, state.until - state.started_at)
        old = aggregate(self.watched.stats_of_all_workers(), state.previous, baseline_from, state.started_at)
        while True:
            time.sleep(0.25)
            if self.watched.live_version != state.version:
                self._finish(state, "superseded", f"{self.watched.live_version!r} is live now")
                return
            summaries = self.watched.stats_of_all_workers()
            new = aggregate(summaries, state.version, state.started_at, time.time() + 1)
            state.new, state.old = new.to_json(), old.to_json()
            verdict = judge(new, old, self.settings)
            if verdict is not None:
                self._roll_back(state, verdict)
                return
            if time.time() >= state.until:
                needed = self.settings.watch_min_requests
                if new.requests < needed:
                    self._finish(state, "inconclusive", f"only {new.requests} requests in the window (need {needed})")
                else:
                    self._finish(state, "passed", "")
                return
            write_json_atomic(self.path, state.to_json())

    def _roll_back(self, state: WatchState, reason: str) -> None:
        log.warning("watch failed; rolling back", extra={"event": "auto_rollback", "version": state.version,
                                                         "to_version": state.previous, "reason": reason})
        try:
            self.watched.roll_back_to(state.previous, from_version=state.version)
        except VoxswapError as exc:
            self._finish(state, "rollback_failed", f"{reason}; rolling back failed: {exc.message}")
            return
        self._finish(state, "rolled_back", reason)

    def _finish(self, state: WatchState, outcome: str, reason: str) -> None:
        state.state, state.reason = outcome, reason
        write_json_atomic(self.path, state.to_json())
        self.registry.record(HistoryEvent(f"watch_{outcome}"), version=state.version, previous=state.previous,
                                    reason=reason, new=state.new, old=state.old)
        log.info("watch finished", extra={"event": "watch_" + outcome, "version": state.version, "reason": reason})
