"""What a canary is on disk and how it is judged: its state file, its criteria, the split of clients,
the shadow comparison of transcripts, and the verdict.

Kept apart from the control loop (:mod:`server.lifecycle.canary`) so that the rules can be read,
and tested, without a model or a worker.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from server.lifecycle.stats import Thresholds, Window, compare
from server.settings import Settings

RUNNING = ("staging", "running")  # a canary in these states holds its candidate and refuses swaps
KEEP_CER = 1024  # comparisons a worker publishes (the newest)


@dataclass(frozen=True)
class Criteria:
    """When a candidate is worse than the live version over the same window."""

    min_requests: int
    max_error_rate_increase: float
    max_empty_rate_increase: float
    max_latency_ratio: float
    max_cer_mean: float
    cer_threshold: float
    max_cer_share: float

    @classmethod
    def of(cls, settings: Settings, overrides: dict[str, Any] | None = None) -> Criteria:
        """The settings' defaults (``canary_*``), with a request's overrides."""
        base = {f.name: getattr(settings, f"canary_{f.name}") for f in fields(cls)}
        return cls(**{**base, **(overrides or {})})

    def thresholds(self) -> Thresholds:
        return Thresholds(self.min_requests, self.max_error_rate_increase, self.max_empty_rate_increase,
                          self.max_latency_ratio)


@dataclass
class CanaryState:
    """``canary.json`` beside the model's registry: every worker routes by it, any worker answers
    ``GET .../canary`` from it, and a canary whose coordinator died is found out through it."""

    id: str
    model: str
    version: str
    live_version: str | None
    mode: str  # canary | shadow
    percent: float
    duration_s: float
    on_pass: str  # promote | hold
    criteria: dict[str, Any]
    state: str  # staging | running | passed | promoted | failed | inconclusive | stopped | interrupted
    reason: str = ""
    created_at: float = 0.0
    started_at: float | None = None
    until: float | None = None
    finished_at: float | None = None
    rollout_id: str = ""
    coordinator_id: str = ""
    coordinator_pid: int = 0
    comparison: dict[str, Any] = field(default_factory=dict)

    @property
    def running(self) -> bool:
        return self.state in RUNNING

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CanaryState:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def on_candidate(canary_id: str, client_key: str, percent: float) -> bool:
    """Whether a client is in the canary's share: a stable hash of the key (and the canary, so
    that each canary samples its own clients), so one client always sees one version."""
    digest = hashlib.sha256(f"{canary_id}\x00{client_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10_000 < percent * 100


class ShadowTally:
    """This worker's mirrored requests of one canary: compared, dropped, failed."""

    def __init__(self) -> None:
        self.canary_id = ""
        self.cer: list[float] = []
        self.mirrored = self.dropped = self.failed = 0
        self._lock = threading.Lock()

    def reset(self, canary_id: str) -> None:
        with self._lock:
            if self.canary_id != canary_id:
                self.canary_id, self.cer, self.mirrored, self.dropped, self.failed = canary_id, [], 0, 0, 0

    def add(self, canary_id: str, *, cer: float | None = None, dropped: bool = False, failed: bool = False) -> None:
        self.reset(canary_id)
        with self._lock:
            if dropped:
                self.dropped += 1
                return
            self.mirrored += 1
            if failed:
                self.failed += 1
            elif cer is not None:
                self.cer = [*self.cer[-(KEEP_CER - 1):], cer]

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            return {"canary": self.canary_id, "cer": [round(c, 4) for c in self.cer], "mirrored": self.mirrored,
                    "dropped": self.dropped, "failed": self.failed}


def shadow_summary(tallies: list[dict[str, Any]], canary_id: str, criteria: Criteria) -> dict[str, Any]:
    """Every worker's comparisons of one canary, summed."""
    mine = [t for t in tallies if t.get("canary") == canary_id]
    cer = [c for t in mine for c in t.get("cer", [])]
    above = sum(1 for c in cer if c > criteria.cer_threshold)
    return {"compared": len(cer), "cer_mean": round(sum(cer) / len(cer), 4) if cer else None,
            "cer_above_threshold": round(above / len(cer), 4) if cer else None,
            "mirrored": sum(int(t.get("mirrored", 0)) for t in mine),
            "dropped": sum(int(t.get("dropped", 0)) for t in mine),
            "failed": sum(int(t.get("failed", 0)) for t in mine)}


def judge(candidate: Window, live: Window, shadow: dict[str, Any] | None, criteria: Criteria) -> str | None:
    """Why the candidate is worse than the live version over the same window, or None.

    A shadow's latency is not judged: its mirrors run at low priority, when live requests leave a
    core free, so their time says how busy the server was rather than how fast the candidate is.
    """
    rules = criteria.thresholds()
    if shadow is not None:
        rules = replace(rules, max_latency_ratio=float("inf"))
    reason = compare(candidate, live, rules, against="on the live version")
    if reason is not None or shadow is None or shadow["compared"] < criteria.min_requests:
        return reason
    if shadow["cer_mean"] >= criteria.max_cer_mean:
        return f"its transcripts differ from the live ones by a mean CER of {shadow['cer_mean']:.3f}"
    if shadow["cer_above_threshold"] > criteria.max_cer_share:
        return (f"{shadow['cer_above_threshold']:.1%} of its transcripts differ from the live ones by a CER above "
                f"{criteria.cer_threshold:g}")
    return None


def comparison(candidate: Window, live: Window, shadow: dict[str, Any] | None) -> dict[str, Any]:
    """The live comparison ``GET .../canary`` shows: per role, and the shadow's transcripts."""
    return {"live": live.to_json(), "candidate": candidate.to_json(), **({"shadow": shadow} if shadow else {})}
