"""The board knows workers by an id unique to each process: pids repeat across containers."""

from __future__ import annotations

import os
import time

from server.lifecycle.board import Rollout, WorkerBoard, WorkerInfo
from server.storage.files import write_json_atomic
from server.storage.registry import Registry


def _heartbeat(board: WorkerBoard, *, worker_id: str, pid: int, host: str, pid_ns: str, age_s: float = 0.0) -> None:
    info = WorkerInfo(pid=pid, host=host, version="a", state="ready", heartbeat_at=time.time() - age_s,
                      id=worker_id, pid_ns=pid_ns)
    board.dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(board.dir / f"{worker_id}.json", info.to_json())


def test_a_worker_in_another_container_with_our_pid_is_a_peer_not_us(registry: Registry) -> None:
    board = WorkerBoard(registry)
    board.publish(WorkerInfo(pid=board.pid, host=board.host, version="a", state="ready"))
    # another pod: the same small pid, its own host name and PID namespace
    _heartbeat(board, worker_id="pod-2-7", pid=board.pid, host="pod-2", pid_ns="pid:[1]")
    # a pid that does not exist here means nothing about a process in another namespace
    _heartbeat(board, worker_id="pod-3-999999", pid=999_999_999, host="pod-3", pid_ns="pid:[2]")
    assert sorted(w.id for w in board.peers()) == ["pod-2-7", "pod-3-999999"]
    assert len(board.workers()) == 3


def test_sweep_removes_our_dead_workers_at_once_and_others_only_when_long_silent(registry: Registry) -> None:
    board = WorkerBoard(registry)
    _heartbeat(board, worker_id="here-dead", pid=999_999_999, host=board.host, pid_ns=board.pid_ns)
    _heartbeat(board, worker_id="pod-2-quiet", pid=7, host="pod-2", pid_ns="pid:[1]", age_s=10)
    _heartbeat(board, worker_id="pod-3-gone", pid=7, host="pod-3", pid_ns="pid:[2]", age_s=600)
    board.sweep()
    assert sorted(p.stem for p in board.dir.glob("*.json")) == ["pod-2-quiet"]


def test_a_rollout_coordinated_elsewhere_is_stale_only_when_its_coordinator_falls_silent(
    registry: Registry,
) -> None:
    board = WorkerBoard(registry)
    now = time.time()
    rollout = Rollout(id="r", version="b", from_version="a", phase="staging", coordinator_pid=os.getpid(),
                      started_at=now - 30, deadline=now + 60, coordinator_id="pod-2-7", coordinator_host="pod-2",
                      coordinator_ns="pid:[1]")
    _heartbeat(board, worker_id="pod-2-7", pid=os.getpid(), host="pod-2", pid_ns="pid:[1]")
    assert not board.stale(rollout)  # alive by its heartbeat, whatever our pid table says
    (board.dir / "pod-2-7.json").unlink()
    assert board.stale(rollout)
    assert not board.coordinates(rollout)
