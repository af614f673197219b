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
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from server.errors import VoxswapError
from server.storage.registry import write_json_atomic

if TYPE_CHECKING:
    from server.lifecycle.policy import ModelLifecycle
    from server.settings import Settings

log = logging.getLogger("voxswap.watch")
KEEP_S = 600.0
LATENCY_SAMPLES = 256
ALL_EMPTY = 0.95  # with no traffic before the swap to compare with, only this empty share is damning


@dataclass
class Sample:
    at: float
    ok: bool
    empty: bool
    latency_s: float


class VersionStats:
    """Recent request outcomes per version, in this process."""

    def __init__(self) -> None:
        self._samples: dict[str, deque[Sample]] = {}
        self._lock = threading.Lock()

    def record(self, version: str, *, ok: bool, empty: bool, latency_s: float) -> None:
        with self._lock:
            samples = self._samples.setdefault(version, deque(maxlen=4096))
            samples.append(Sample(time.time(), ok, empty, latency_s))

    def summary(self) -> dict[str, dict[str, Any]]:
        """What goes into the heartbeat: per version, timestamps and outcomes of recent requests."""
        cutoff = time.time() - KEEP_S
        with self._lock:
            return {
                version: {"at": [round(s.at, 3) for s in samples if s.at >= cutoff][-1024:],
                          "ok": [s.ok for s in samples if s.at >= cutoff][-1024:],
                          "empty": [s.empty for s in samples if s.at >= cutoff][-1024:],
                          "latency": [round(s.latency_s, 4) for s in samples if s.at >= cutoff][-1024:]}
                for version, samples in self._samples.items()
            }


@dataclass
class Window:
    requests: int = 0
    errors: int = 0
    empty: int = 0
    latencies: list[float] = field(default_factory=list)

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def empty_rate(self) -> float:
        return self.empty / self.requests if self.requests else 0.0

    @property
    def p95_s(self) -> float | None:
        ok = sorted(self.latencies)
        return ok[min(len(ok) - 1, int(0.95 * len(ok)))] if ok else None

    def to_json(self) -> dict[str, Any]:
        p95 = self.p95_s
        return {"requests": self.requests, "errors": self.errors, "empty": self.empty,
                "error_rate": round(self.error_rate, 4), "empty_rate": round(self.empty_rate, 4),
                "p95_ms": round(p95 * 1000, 2) if p95 is not None else None}


def aggregate(summaries: list[dict[str, dict[str, Any]]], version: str, since: float, until: float) -> Window:
    window = Window()
    for summary in summaries:
        data = summary.get(version)
        if not data:
            continue
        for at, ok, empty, latency in zip(data["at"], data["ok"], data["empty"], data["latency"], strict=True):
            if since <= at < until:
                window.requests += 1
                window.errors += 0 if ok else 1
                window.empty += 1 if (ok and empty) else 0
                if ok:
                    window.latencies.append(latency)
    return window


def judge(new: Window, old: Window, s: Settings) -> str | None:
    """The reason to roll back, or None. Needs ``watch_min_requests`` answers from the new version.

    The old version's rates count only when it answered as many before the swap: a handful of
    requests (or none, after a quiet minute) is no baseline. Without one, errors are compared
    with zero, an empty share only when nearly every answer is empty (silence is normal
    traffic), and latency not at all.
    """
    if new.requests < s.watch_min_requests:
        return None
    baseline = old.requests >= s.watch_min_requests
    old_errors = old.error_rate if baseline else 0.0
    if new.error_rate > old_errors + s.watch_max_error_rate_increase:
        return f"error rate {new.error_rate:.1%} vs {old_errors:.1%} before the swap"
    if baseline and new.empty_rate > old.empty_rate + s.watch_max_empty_rate_increase:
        return f"empty transcripts {new.empty_rate:.1%} vs {old.empty_rate:.1%} before the swap"
    if not baseline and new.empty_rate >= ALL_EMPTY:
        return f"empty transcripts {new.empty_rate:.1%} (no traffic before the swap to compare with)"
    new_p95, old_p95 = new.p95_s, old.p95_s
    if new_p95 is not None and old_p95 is not None and baseline \
            and new_p95 > old_p95 * s.watch_max_latency_ratio and new_p95 - old_p95 > 0.05:
        return f"p95 latency {new_p95 * 1000:.0f} ms vs {old_p95 * 1000:.0f} ms before the swap"
    return None


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
    def __init__(self, lifecycle: ModelLifecycle):
        self.lifecycle = lifecycle
        self.settings = lifecycle.settings
        self.path = lifecycle.registry.root / "watch.json"
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
        self.lifecycle.registry.record("watch_start", version=version, previous=previous, seconds=seconds,
                                    pid=os.getpid())
        self._thread = threading.Thread(target=self._run, args=(state,), name="voxswap-watch", daemon=True)
        self._thread.start()
        return state

    def _run(self, state: WatchState) -> None:
        # the baseline is taken once, now: heartbeats keep only KEEP_S of samples, and a long watch
        # would otherwise see the old version's numbers age away and compare with nothing
        baseline_from = state.started_at - max(60.0, state.until - state.started_at)
        old = aggregate(self.lifecycle.stats_of_all_workers(), state.previous, baseline_from, state.started_at)
        while True:
            time.sleep(0.25)
            if self.lifecycle.live_version != state.version:
                self._finish(state, "superseded", f"{self.lifecycle.live_version!r} is live now")
                return
            summaries = self.lifecycle.stats_of_all_workers()
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
            self.lifecycle.swap_to(state.previous, expected_current=state.version, event="auto_rollback",
                                actor="watch", watch_seconds=0)
        except VoxswapError as exc:
            self._finish(state, "rollback_failed", f"{reason}; rolling back failed: {exc.message}")
            return
        self._finish(state, "rolled_back", reason)

    def _finish(self, state: WatchState, outcome: str, reason: str) -> None:
        state.state, state.reason = outcome, reason
        write_json_atomic(self.path, state.to_json())
        self.lifecycle.registry.record("watch_" + outcome, version=state.version, previous=state.previous,
                                    reason=reason, new=state.new, old=state.old)
        log.info("watch finished", extra={"event": "watch_" + outcome, "version": state.version, "reason": reason})
