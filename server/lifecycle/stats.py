"""Recent request outcomes per version in this process, and their sum over every worker.

Each request records ok or failed, empty transcript or not, and latency under the version that
answered it; the summary travels in the worker's heartbeat, so the post-swap watch (and later the
canary) can judge a version on the traffic of every worker, not only the one that swapped.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

KEEP_S = 600.0


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


ALL_EMPTY = 0.95  # with no baseline to compare with, only this empty share is damning


@dataclass(frozen=True)
class Thresholds:
    """How much worse a version may be than its baseline; the watch's and the canary's rules."""

    min_requests: int
    max_error_rate_increase: float
    max_empty_rate_increase: float
    max_latency_ratio: float


def compare(new: Window, old: Window, t: Thresholds, *, against: str) -> str | None:
    """Why ``new`` is worse than ``old`` (``against`` names the baseline in the reason), or None.
    Needs ``min_requests`` answers from the new version.

    The old version's rates count only when it answered as many: a handful of requests (or none,
    after a quiet minute) is no baseline. Without one, errors are compared with zero, an empty
    share only when nearly every answer is empty (silence is normal traffic), and latency not at all.
    """
    if new.requests < t.min_requests:
        return None
    baseline = old.requests >= t.min_requests
    old_errors = old.error_rate if baseline else 0.0
    if new.error_rate > old_errors + t.max_error_rate_increase:
        return f"error rate {new.error_rate:.1%} vs {old_errors:.1%} {against}"
    if baseline and new.empty_rate > old.empty_rate + t.max_empty_rate_increase:
        return f"empty transcripts {new.empty_rate:.1%} vs {old.empty_rate:.1%} {against}"
    if not baseline and new.empty_rate >= ALL_EMPTY:
        return f"empty transcripts {new.empty_rate:.1%} (no traffic {against} to compare with)"
    new_p95, old_p95 = new.p95_s, old.p95_s
    if new_p95 is not None and old_p95 is not None and baseline \
            and new_p95 > old_p95 * t.max_latency_ratio and new_p95 - old_p95 > 0.05:
        return f"p95 latency {new_p95 * 1000:.0f} ms vs {old_p95 * 1000:.0f} ms {against}"
    return None
