"""Rollouts between the workers that share a registry, at the level of one worker's lifecycle.

The end-to-end behaviour (real gunicorn workers, kill -9 mid-swap) is in tests/e2e/test_gunicorn.py;
these pin down two rules a worker follows whatever its peers do.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from server.errors import SwapInProgress, VersionNotLoaded
from server.lifecycle.board import Rollout, WorkerBoard
from server.lifecycle.policy import ModelLifecycle
from server.metrics import Metrics
from server.settings import Settings
from server.storage.files import write_json_atomic
from server.storage.registry import Registry
from server.testing import synth
from tests.conftest import TEXT_B


def _announce(board: WorkerBoard, rollout_id: str, version: str) -> None:
    """What a coordinating peer writes when it starts a rollout (the peer is our parent process)."""
    now = time.time()
    rollout = Rollout(id=rollout_id, version=version, from_version="a", phase="staging",
                      coordinator_pid=os.getppid(), started_at=now, deadline=now + 60,
                      coordinator_id="the-parent", coordinator_host=board.host, coordinator_ns=board.pid_ns)
    write_json_atomic(board.rollout_path, rollout.to_json())


def test_a_request_pinned_to_a_staged_version_finishes_when_a_newer_rollout_replaces_it(
    registry: Registry, settings: Settings, model_dir: Callable[..., Path]
) -> None:
    registry.add(model_dir("model c is newer"), "c")
    lifecycle = ModelLifecycle(registry, settings, Metrics().for_model("sensevoice"))
    lifecycle.load_current()
    try:
        _announce(lifecycle.board, "r1", "b")
        lifecycle.rollouts.follow()
        assert lifecycle.loaded_versions() == ["a", "b"]
        with lifecycle.lease("b") as pinned:  # a long request pinned with X-Model-Version: b
            _announce(lifecycle.board, "r2", "c")  # b's rollout was abandoned, c's begins
            lifecycle.rollouts.follow()
            assert lifecycle.loaded_versions() == ["a", "c"]
            raw = pinned.engine.transcribe(synth.speech_like(1.5, seed=1))
            assert raw.endswith(TEXT_B)  # its next batch still runs on b
        with pytest.raises(VersionNotLoaded), lifecycle.lease("b"):  # b went with its last request
            pass
    finally:
        lifecycle.shutdown()


def test_a_second_rollout_waits_until_the_first_has_converged(registry: Registry) -> None:
    """Two coordinators at once would each wait on the other's swap lock until both timed out."""
    board = WorkerBoard(registry)
    first = board.begin("b", "a", 60)
    board.set_phase(first, "committed")
    with pytest.raises(SwapInProgress, match="still converging"):
        board.begin("a", "b", 60)
    board.end(first)
    board.end(board.begin("a", "b", 60))
