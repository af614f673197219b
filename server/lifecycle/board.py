"""Processes that share one registry: heartbeats, and the two-phase rollout that moves them together.

An admin update reaches one worker, so nothing is said worker to worker: everything goes through
files next to the registry.

``workers/<id>.json``
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
from pathlib import Path
from typing import Any

from server.errors import SwapInProgress
from server.storage.files import write_json_atomic
from server.storage.registry import Registry
from server.vocab import HistoryEvent

HEARTBEAT_STALE_S = 5.0
SWEEP_SILENT_S = 60.0  # a heartbeat of another namespace silent this long belongs to nobody


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
    id: str = ""  # unique per process, wherever it runs (see WorkerBoard)
    pid_ns: str = ""  # the PID namespace ``pid`` means something in

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkerInfo:
        staged = data.get("staged")
        info = cls(**{**data, "staged": Staged(**staged) if staged else None})
        info.id = info.id or f"{info.host}-{info.pid}"  # a heartbeat written by an older release
        return info


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
    coordinator_id: str = ""  # the coordinator's WorkerBoard.id
    coordinator_host: str = ""
    coordinator_ns: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class WorkerBoard:
    """Reads and writes the shared heartbeat and rollout files of one registry.

    Processes that share a registry may live in different containers or pods, each with its own
    PID namespace, where the same small pids repeat: a worker is therefore known by an id unique
    to the process (host, pid and a random part), and a pid is asked whether it is alive only by a
    process in the same host and PID namespace. Others are judged by their heartbeat's age.
    """

    def __init__(self, registry: Registry, *, stale_s: float = HEARTBEAT_STALE_S):
        self.registry = registry
        self.dir = registry.root / "workers"
        self.rollout_path = registry.root / "rollout.json"
        self.stale_s = stale_s
        self.pid = os.getpid()
        self.host = socket.gethostname()
        self.pid_ns = _pid_namespace()
        self.id = f"{self.host}-{self.pid}-{uuid.uuid4().hex[:8]}"

    def _dead_here(self, host: str, pid_ns: str, pid: int) -> bool:
        """Certainly gone: a process of our host and PID namespace whose pid no longer runs."""
        return host == self.host and pid_ns == self.pid_ns and not _alive(pid)

    # -- heartbeats ------------------------------------------------------------------------

    def publish(self, info: WorkerInfo) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        info.heartbeat_at = time.time()
        info.id, info.pid_ns = self.id, self.pid_ns
        write_json_atomic(self.dir / f"{self.id}.json", info.to_json())

    def withdraw(self) -> None:
        with suppress(FileNotFoundError):
            (self.dir / f"{self.id}.json").unlink()

    def withdraw_pid(self, pid: int) -> None:
        """The heartbeat of a worker of ours that exited (the gunicorn master knows only its pid)."""
        for path, info in self._heartbeats():
            if info.pid == pid and info.host == self.host and info.pid_ns == self.pid_ns:
                with suppress(FileNotFoundError):
                    path.unlink()

    def _heartbeats(self) -> list[tuple[Path, WorkerInfo]]:
        if not self.dir.is_dir():
            return []
        found = []
        for path in sorted(self.dir.glob("*.json")):
            try:
                found.append((path, WorkerInfo.from_json(json.loads(path.read_text()))))
            except (OSError, ValueError, TypeError):
                continue  # a file being replaced, or one from an older layout
        return found

    def workers(self) -> list[WorkerInfo]:
        """Live processes: a fresh heartbeat and, where we can tell, a pid that still runs."""
        now = time.time()
        return [info for _, info in self._heartbeats()
                if now - info.heartbeat_at <= self.stale_s and not self._dead_here(info.host, info.pid_ns, info.pid)]

    def peers(self) -> list[WorkerInfo]:
        return [w for w in self.workers() if w.id != self.id and not w.draining]

    def sweep(self) -> None:
        """Remove heartbeat files of processes that are gone (a crashed worker leaves one behind):
        ours when their pid is gone, any other's once its heartbeat is long silent."""
        now = time.time()
        for path, info in self._heartbeats():
            silent = now - info.heartbeat_at > SWEEP_SILENT_S
            if silent or self._dead_here(info.host, info.pid_ns, info.pid):
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

    def coordinates(self, rollout: Rollout) -> bool:
        return rollout.coordinator_id == self.id

    def stale(self, rollout: Rollout) -> bool:
        """Its coordinator died or ran out of time: if still staging, nobody will ever commit it.

        A coordinator in our PID namespace is dead when its pid is; one elsewhere when its
        heartbeat has been silent for longer than a live worker's ever is."""
        if time.time() > rollout.deadline + 5:
            return True
        if not rollout.coordinator_id:  # written by an older release: only its pid is known
            return not _alive(rollout.coordinator_pid)
        if rollout.coordinator_host == self.host and rollout.coordinator_ns == self.pid_ns:
            return not _alive(rollout.coordinator_pid)
        alive = {w.id for w in self.workers()}
        return rollout.coordinator_id not in alive and time.time() - rollout.started_at > self.stale_s

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
            if current and current.phase in ("staging", "committed") and not self.stale(current):
                raise SwapInProgress(
                    f"a rollout of {current.version!r} is still "
                    f"{'being staged' if current.phase == 'staging' else 'converging'} "
                    f"(coordinated by worker {current.coordinator_pid})",
                    retry_after=2,
                )
            now = time.time()
            rollout = Rollout(id=uuid.uuid4().hex[:12], version=version, from_version=from_version,
                              phase="staging", coordinator_pid=self.pid, started_at=now,
                              deadline=now + timeout_s, coordinator_id=self.id, coordinator_host=self.host,
                              coordinator_ns=self.pid_ns)
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
            if current and self.stale(current):
                self.rollout_path.unlink()
                if current.phase == "staging":
                    self.registry.record(HistoryEvent.ROLLOUT_ABANDONED, version=current.version, outcome="aborted",
                                         coordinator_pid=current.coordinator_pid, rollout=current.id)

    def end(self, rollout: Rollout) -> None:
        with self.registry.lock:
            current = self.rollout()
            if current and current.id == rollout.id:
                self.rollout_path.unlink()


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


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
