"""The post-swap watch rolls a worse version back by itself and says why; a good one passes."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import httpx

from server.app import create_app
from server.lifecycle.stats import VersionStats, Window, aggregate
from server.lifecycle.watch import judge
from server.settings import Settings
from server.storage.registry import Registry
from server.testing import synth
from testkit.harness import LoadGenerator, serve_in_thread, wait_until
from tests.conftest import AUTH, TEXT_A, TEXT_B


def _watch(url: str) -> dict[str, object] | None:
    return httpx.get(f"{url}/admin/model/watch", headers=AUTH).json()["watch"]  # type: ignore[no-any-return]


def test_a_version_that_transcribes_nothing_is_rolled_back_by_the_watch(
    registry: Registry, settings: Settings, model_dir: Callable[..., Path]
) -> None:
    # passes its smoke test (its golden clip expects silence from it) but answers speech with nothing
    registry.add(model_dir(""), "mute")
    clip = synth.wav_bytes(synth.speech_like(1.0))
    with serve_in_thread(create_app(settings)) as url, LoadGenerator(url, clip, concurrency=2) as load:
        wait_until(lambda: load.count() >= 15, message="a baseline for version a")
        r = httpx.post(f"{url}/admin/model/update", json={"version": "mute", "watch_seconds": 20},
                       headers=AUTH, timeout=60)
        assert r.status_code == 200 and r.json()["watch"]["state"] == "watching"
        verdict = wait_until(lambda: (w := _watch(url)) and w["state"] != "watching" and w, timeout_s=30,
                             message="the watch verdict")
        after = load.count()
        wait_until(lambda: load.count() >= after + 5, message="traffic after the rollback")
    assert verdict["state"] == "rolled_back"
    assert "empty transcripts" in str(verdict["reason"])
    assert registry.state().current == "a"
    assert load.failures() == []
    assert load.outcomes[-1].version == "a" and load.outcomes[-1].text == TEXT_A
    events = [e["event"] for e in registry.history()]
    assert "watch_start" in events and events[-1] == "watch_rolled_back"
    rollback = [e for e in registry.history() if e["event"] == "auto_rollback"]
    assert len(rollback) == 1 and rollback[0]["version"] == "a" and rollback[0]["actor"] == "watch"


def test_a_good_version_passes_the_watch_and_stays(registry: Registry, settings: Settings) -> None:
    clip = synth.wav_bytes(synth.speech_like(1.0))
    with serve_in_thread(create_app(settings)) as url, LoadGenerator(url, clip, concurrency=2) as load:
        wait_until(lambda: load.count() >= 15, message="a baseline")
        r = httpx.post(f"{url}/admin/model/update", json={"version": "b", "watch_seconds": 2},
                       headers=AUTH, timeout=60)
        assert r.status_code == 200
        verdict = wait_until(lambda: (w := _watch(url)) and w["state"] != "watching" and w, timeout_s=30,
                             message="the watch verdict")
    assert verdict["state"] == "passed", verdict
    assert registry.state().current == "b" and load.outcomes[-1].text == TEXT_B
    assert load.failures() == []


def _window(requests: int, *, errors: int = 0, empty: int = 0, latency_s: float = 0.05) -> Window:
    """What ``requests`` answers of one version look like to a watch, through the real bookkeeping."""
    stats = VersionStats()
    for i in range(requests):
        stats.record("v", ok=i >= errors, empty=errors <= i < errors + empty, latency_s=latency_s)
    return aggregate([stats.summary()], "v", 0, time.time() + 1)


def test_the_watch_verdicts_need_a_baseline_before_they_compare() -> None:
    rules = Settings(watch_min_requests=10)
    quiet = _window(0)  # nobody called the old version in the minute before the swap
    # a good version whose traffic has its usual quarter of silence is not mistaken for a mute one
    assert judge(_window(40, empty=10), quiet, rules) is None
    assert judge(_window(40, empty=10), _window(40, empty=10), rules) is None
    assert judge(_window(40, empty=40), quiet, rules) == (
        "empty transcripts 100.0% (no traffic before the swap to compare with)")
    assert "empty transcripts 75.0% vs 25.0%" in str(judge(_window(40, empty=30), _window(40, empty=10), rules))
    # three failures among three old requests are no baseline that excuses a failing new version
    assert "error rate 50.0% vs 0.0%" in str(judge(_window(40, errors=20), _window(3, errors=3), rules))
    # latency is compared only with a baseline, and a small absolute difference is never enough
    assert judge(_window(40, latency_s=0.9), quiet, rules) is None
    assert "p95 latency 900 ms vs 100 ms" in str(judge(_window(40, latency_s=0.9), _window(40, latency_s=0.1), rules))
    assert judge(_window(40, latency_s=0.03), _window(40, latency_s=0.01), rules) is None
    assert judge(_window(9, errors=9), quiet, rules) is None  # too few answers from the new version yet
