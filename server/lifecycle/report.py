"""What one swap did, phase by phase: the answer to an admin call, a history line, a log event."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


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
    model: str = ""  # the named model swapped (the lifecycle's name)
    started: float = field(default_factory=time.perf_counter, repr=False)  # when the swap began

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
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

    def log_fields(self) -> dict[str, Any]:
        """The report flattened for one structured log line: outcome, timings and memory figures."""
        data = self.to_json()
        flat: dict[str, Any] = {"model": self.model}
        for key in ("outcome", "reason", "generation", "drained"):
            if data.get(key) not in (None, ""):
                flat[key] = data[key]
        flat.update(data["timings"])
        flat.update(data["memory"])
        return flat
