"""The two-phase rollout between a coordinator and a follower that share one registry.

Both run in this process, each with its own worker id, so each sees the other as a live peer
through the heartbeat files exactly as two workers would.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from server.errors import SwapFailed
from server.lifecycle.policy import ModelLifecycle
from server.lifecycle.report import SwapReport
from server.metrics import Metrics
from server.settings import Settings
from server.storage.registry import Registry


@pytest.fixture
def pair(registry: Registry, make_settings: Callable[..., Settings]) -> Iterator[tuple[ModelLifecycle, ModelLifecycle]]:
    settings = make_settings(fault_injection=True, rollout_timeout_s=20)
    coordinator = ModelLifecycle(registry, settings, Metrics().for_model("sensevoice"))
    follower = ModelLifecycle(registry, settings, Metrics().for_model("sensevoice"))
    for lifecycle in (coordinator, follower):
        lifecycle.load_current()
        lifecycle.publish()
    yield coordinator, follower
    for lifecycle in (coordinator, follower):
        lifecycle.shutdown()


def _follow_until(follower: ModelLifecycle, done: threading.Event) -> None:
    """The follower's background ticks: heartbeat, follow rollouts and the registry."""
    while not done.is_set():
        follower.publish()
        follower.rollouts.follow()
        follower.follow_registry()
        time.sleep(0.02)


def _update_while_following(
    coordinator: ModelLifecycle, follower: ModelLifecycle, version: str
) -> SwapReport | SwapFailed:
    done = threading.Event()
    ticks = threading.Thread(target=_follow_until, args=(follower, done))
    ticks.start()
    try:
        return coordinator.swap_to(version, watch_seconds=0)
    except SwapFailed as exc:
        return exc
    finally:
        done.set()
        ticks.join(10)


def test_both_workers_stage_then_flip_together(
    pair: tuple[ModelLifecycle, ModelLifecycle], registry: Registry
) -> None:
    coordinator, follower = pair
    report = _update_while_following(coordinator, follower, "b")
    assert isinstance(report, SwapReport), report
    assert registry.state().current == "b"
    assert coordinator.live_version == follower.live_version == "b"
    assert report.converged is True
    assert not coordinator.has_candidate and not follower.has_candidate


def test_a_follower_whose_stage_fails_aborts_the_rollout_and_nobody_flips(
    pair: tuple[ModelLifecycle, ModelLifecycle], registry: Registry
) -> None:
    coordinator, follower = pair
    faults = registry.root / "faults"
    faults.mkdir()
    (faults / "load.json").write_text(json.dumps({"version": "b", "role": "follower"}))
    refused = _update_while_following(coordinator, follower, "b")
    assert isinstance(refused, SwapFailed)
    assert f"worker {follower.board.pid} refused version 'b'" in refused.message
    assert "no worker switched" in refused.message
    assert registry.state().current == "a"
    assert coordinator.live_version == follower.live_version == "a"
    assert not coordinator.has_candidate and not follower.has_candidate  # the coordinator's is dropped
    assert coordinator.board.rollout() is None
    assert [e["event"] for e in registry.history()][-1] == "swap_failed"
