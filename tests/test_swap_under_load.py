"""Blue/green swaps on a real socket: no request fails, and every answer names the version that made it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from server.app import create_app
from server.settings import Settings
from server.storage.registry import Registry
from server.testing import synth
from testkit.harness import LoadGenerator, Outcome, post_clip, serve_in_thread, wait_until
from tests.conftest import AUTH

SLOW_A = "slow model a speaking"
SLOW_B = "slow model b speaking"


@pytest.fixture
def slow_registry(tmp_path: Path, model_dir: Callable[..., Path]) -> Registry:
    """Two versions that spend ~40 ms of CPU per audio second, like SenseVoice-small int8."""
    reg = Registry(tmp_path / "slow-registry").ensure()
    reg.add(model_dir(SLOW_A, compute_ms=40), "a")
    reg.add(model_dir(SLOW_B, compute_ms=40), "b")
    reg.promote("a")
    return reg


def _settings(reg: Registry) -> Settings:
    return Settings(registry=reg.root, admin_token="test-admin-token", seed_demo=False,  # type: ignore[arg-type]
                    inference_workers=2, intra_op_threads=1, max_queue=32, drain_timeout_s=30)


def test_swap_under_concurrent_load_fails_nothing_and_labels_every_answer(slow_registry: Registry) -> None:
    clip = synth.wav_bytes(synth.speech_like(3.0, seed=3))
    expected = {"a": SLOW_A, "b": SLOW_B}
    with serve_in_thread(create_app(_settings(slow_registry))) as url, \
            LoadGenerator(url, clip, concurrency=4) as load:
        wait_until(lambda: load.count() >= 12, message="traffic before the swap")
        update_started = time.monotonic()
        r = httpx.post(f"{url}/admin/model/update", json={"version": "b"}, headers=AUTH, timeout=120)
        update_answered = time.monotonic()
        assert r.status_code == 200, r.text
        flipped_at = update_started + r.json()["timings"]["time_to_flip_s"]
        settled = load.count()
        wait_until(lambda: load.count() >= settled + 12, message="traffic after the swap")
    outcomes = load.outcomes
    assert load.failures() == [], load.failures()[:3]
    for o in outcomes:
        assert o.text == expected[o.version or ""], o  # the version header names the model that answered
    after = [o for o in outcomes if o.started > update_answered]
    assert after and all(o.version == "b" for o in after)
    before = [o for o in outcomes if o.finished < update_started]
    assert before and all(o.version == "a" for o in before)
    spanning = [o for o in outcomes if o.started < flipped_at < o.finished]
    assert spanning, "no request was in flight across the flip; the test proved nothing"
    assert {o.version for o in outcomes} == {"a", "b"}


def test_a_request_in_flight_during_a_swap_is_answered_by_the_old_version(slow_registry: Registry) -> None:
    long_clip = synth.wav_bytes(synth.speech_like(28.0, seed=5))  # one window, ~1.2 s of model time
    short_clip = synth.wav_bytes(synth.speech_like(1.0, seed=6))
    result: dict[str, Outcome] = {}
    with serve_in_thread(create_app(_settings(slow_registry))) as url, httpx.Client(base_url=url, timeout=120) as c:
        def send_long() -> None:
            with httpx.Client(base_url=url, timeout=120) as own:
                result["long"] = post_clip(own, "/api/transcribe", long_clip)

        thread = threading.Thread(target=send_long)
        thread.start()
        wait_until(lambda: c.get("/api/system/status").json()["in_flight"] == 1, message="long request running")
        r = c.post("/admin/model/update", json={"version": "b"}, headers=AUTH)
        assert r.status_code == 200, r.text
        report = r.json()
        # the swap waited for the old version's request before freeing it
        assert report["drained"] is True and report["timings"]["drain_s"] > 0.05
        assert post_clip(c, "/api/transcribe", short_clip).version == "b"
        thread.join()
    long = result["long"]
    assert long.ok and long.version == "a" and long.text == SLOW_A


def test_a_second_update_while_one_runs_gets_409(slow_registry: Registry, model_dir: Callable[..., Path]) -> None:
    slow_registry.add(model_dir("heavy model c", weights_mb=64, compute_ms=40), "c")
    with serve_in_thread(create_app(_settings(slow_registry))) as url:
        answers: list[httpx.Response] = []

        def update(version: str) -> None:
            answers.append(httpx.post(f"{url}/admin/model/update", json={"version": version},
                                      headers=AUTH, timeout=120))

        first = threading.Thread(target=update, args=("c",))
        first.start()
        wait_until(lambda: httpx.get(f"{url}/api/system/status").json()["swapping"], message="swap running")
        update("b")
        first.join()
    codes = sorted(a.status_code for a in answers)
    assert codes == [200, 409]
    conflict = next(a for a in answers if a.status_code == 409)
    assert conflict.json()["error"]["code"] == "swap_in_progress" and conflict.headers["retry-after"]
