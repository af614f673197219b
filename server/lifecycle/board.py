"""Processes that share one registry: heartbeats, and the two-phase rollout that moves them together.

An admin update reaches one worker, so nothing is said worker to worker: everything goes through
files next to the registry.

``workers/<pid>.json``
    each process's heartbeat: the version it serves, its state, in-flight requests, resident
    memory, and how far it got with the rollout being staged.
``rollout.json``
    the rollout in progress, created exclusively by the worker that took the update (the
    coordinator). Phase ``staging``: every live worker builds and smoke-tests the version beside
    its live one and reports ready or failed. Only when all are ready does the coordinator commit
    ``state.json``; each worker then flips to the engine it already built. If any worker fails or
    times out, the phase becomes ``aborted`` and nobody switches.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from typing import Any

from server.errors import SwapInProgress
from server.storage.files import write_json_atomic
from server.storage.registry import Registry
from server.vocab import HistoryEvent

HEARTBEAT_STALE_S = 5.0


@dataclass
class Staged:
    rollout_id: str
    version: str
    status: str  # loading | ready | failed
    reason: str = ""
    outcome: str = ""


@dataclass
class WorkerInfo:
    pid: int
    host: str
    version: str | None
    state: str
    in_flight: int = 0
    rss_bytes: int = 0
    started_at: float = 0.0
    heartbeat_at: float = 0.0
    draining: bool = False
    staged: Staged | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkerInfo:
        staged = data.get("staged")
        return cls(**{**data, "staged": Staged(**staged) if staged else None})


@dataclass
class Rollout:
    id: str
    version: str
    from_version: str | None
    phase: str  # staging | committed | aborted
    coordinator_pid: int
    started_at: float
    deadline: float
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def stale(self) -> bool:
        """Its coordinator died or ran out of time: if still staging, nobody will ever commit it."""
        return not _alive(self.coordinator_pid) or time.time() > self.deadline + 5


class WorkerBoard:
    """Reads and writes the shared heartbeat and rollout files of one registry."""

    def __init__(self, registry: Registry, *, stale_s: float = HEARTBEAT_STALE_S):
        self.registry = registry
        self.dir = registry.root / "workers"
        self.rollout_path = registry.root / "rollout.json"
        self.stale_s = stale_s
        self.pid = os.getpid()
        self.host = socket.gethostname()

    # -- heartbeats ------------------------------------------------------------------------

    def publish(self, info: WorkerInfo) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        info.heartbeat_at = time.time()
        write_json_atomic(self.dir / f"{info.pid}.json", info.to_json())

    def withdraw(self, pid: int | None = None) -> None:
        with suppress(FileNotFoundError):
            (self.dir / f"{pid or self.pid}.json").unlink()

    def workers(self) -> list[WorkerInfo]:
        """Live processes: a fresh heartbeat and, on this host, a pid that still exists."""
        if not self.dir.is_dir():
            return []
        now = time.time()
        found = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                info = WorkerInfo.from_json(json.loads(path.read_text()))
            except (OSError, ValueError, TypeError):
                continue  # a file being replaced, or one from an older layout
            if now - info.heartbeat_at > self.stale_s or (info.host == self.host and not _alive(info.pid)):
                continue
            found.append(info)
        return found

    def peers(self) -> list[WorkerInfo]:
        return [w for w in self.workers() if w.pid != self.pid and not w.draining]

    def sweep(self) -> None:
        """Remove heartbeat files of processes that are gone (a crashed worker leaves one behind)."""
        if not self.dir.is_dir():
            return
        for path in self.dir.glob("*.json"):
            with suppress(ValueError):
                pid = int(path.stem)
                if not _alive(pid):
                    with suppress(FileNotFoundError):
                        path.unlink()

    def convergence_problem(self, *, grace_s: float) -> str | None:
        """A live worker still serving another version than the registry's, ``grace_s`` after the
        commit: the instance serves, but must not count as ready until it has converged."""
        state = self.registry.state()
        if state.held or not state.current or time.time() - state.updated_at < grace_s:
            return None
        for worker in self.workers():
            if not worker.draining and worker.version != state.current:
                return (f"worker {worker.pid} serves {worker.version!r} but the registry's current version "
                        f"is {state.current!r} (committed {time.time() - state.updated_at:.0f} s ago)")
        return None

    # -- rollouts --------------------------------------------------------------------------

    def rollout(self) -> Rollout | None:
        try:
            return Rollout(**json.loads(self.rollout_path.read_text()))
        except (FileNotFoundError, ValueError, TypeError):
            return None

    def begin(self, version: str, from_version: str | None, timeout_s: float) -> Rollout:
        """Claim the registry for one rollout; 409 while another live one holds it."""
        with self.registry.lock:
            current = self.rollout()
            # a committed rollout still waits for its peers to serve it: a second one now would have
            # each coordinator wait on the other's swap lock until both time out
            if current and current.phase in ("staging", "committed") and not current.stale():
                raise SwapInProgress(
                    f"a rollout of {current.version!r} is still "
                    f"{'being staged' if current.phase == 'staging' else 'converging'} "
                    f"(coordinated by worker {current.coordinator_pid})",
                    retry_after=2,
                )
            now = time.time()
            rollout = Rollout(id=uuid.uuid4().hex[:12], version=version, from_version=from_version,
                              phase="staging", coordinator_pid=self.pid, started_at=now,
                              deadline=now + timeout_s)
            write_json_atomic(self.rollout_path, rollout.to_json())
            return rollout

    def set_phase(self, rollout: Rollout, phase: str, reason: str = "") -> None:
        rollout.phase, rollout.reason = phase, reason
        with self.registry.lock:
            current = self.rollout()
            if current and current.id == rollout.id:
                write_json_atomic(self.rollout_path, rollout.to_json())

    def clear_stale(self) -> None:
        with self.registry.lock:
            current = self.rollout()
            if current and current.stale():
                self.rollout_path.unlink()
                if current.phase == "staging":
                    self.registry.record(HistoryEvent.ROLLOUT_ABANDONED, version=current.version, outcome="aborted",
                                         coordinator_pid=current.coordinator_pid, rollout=current.id)

    def end(self, rollout: Rollout) -> None:
        with self.registry.lock:
            current = self.rollout()
            if current and current.id == rollout.id:
                self.rollout_path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (exited, not yet reaped by gunicorn) still answers kill(0): check its state
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
