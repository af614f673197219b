"""voxswap under a real gunicorn with several workers: every worker converges, nothing is lost."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from server.storage.registry import Registry
from server.testing import synth
from testkit.harness import LoadGenerator, wait_until
from testkit.processes import ServerProcess, start_server

pytestmark = pytest.mark.e2e
TEXT = {"a": "gunicorn model a", "b": "gunicorn model b", "heavy": "heavy model"}


@pytest.fixture
def reg(tmp_path: Path, model_dir: Callable[..., Path]) -> Registry:
    registry = Registry(tmp_path / "registry").ensure()
    registry.add(model_dir(TEXT["a"], compute_ms=20), "a")
    registry.add(model_dir(TEXT["b"], compute_ms=20), "b")
    registry.promote("a")
    return registry


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[list[ServerProcess]]:
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.stop()


def _start(servers: list[ServerProcess], reg: Registry, tmp_path: Path, **kwargs: object) -> ServerProcess:
    server = start_server(reg.root, tmp_path / f"run{len(servers)}", **kwargs)  # type: ignore[arg-type]
    servers.append(server)
    return server


def test_an_update_under_load_reaches_every_worker_and_fails_nothing(
    reg: Registry, servers: list[ServerProcess], tmp_path: Path
) -> None:
    server = _start(servers, reg, tmp_path, workers=2)
    assert set(server.worker_versions().values()) == {"a"} and len(server.worker_versions()) == 2
    clip = synth.wav_bytes(synth.speech_like(2.0))
    with LoadGenerator(server.url, clip, concurrency=4) as load:
        wait_until(lambda: load.count() >= 10, message="traffic before the update")
        r = server.update("b")
        assert r.status_code == 200, r.text
        report = r.json()
        assert report["converged"] is True
        assert sorted(w["version"] for w in report["workers"]) == ["b", "b"]
        answered = load.count()
        wait_until(lambda: load.count() >= answered + 10, message="traffic after the update")
    assert load.failures() == []
    assert all(o.text == TEXT[o.version or ""] for o in load.outcomes)
    assert set(server.worker_versions().values()) == {"b"}
    metrics = httpx.get(f"{server.url}/metrics").text
    active = [line for line in metrics.splitlines()
              if line.startswith("voxswap_model_active{") and line.endswith(" 1.0")]
    assert len(active) == 2 and all('version="b"' in line for line in active)


def test_one_worker_failing_its_load_means_no_worker_switches(
    reg: Registry, servers: list[ServerProcess], tmp_path: Path
) -> None:
    server = _start(servers, reg, tmp_path, workers=2, env={"VOXSWAP_FAULT_INJECTION": "true"})
    faults = reg.root / "faults"
    faults.mkdir()
    (faults / "load.json").write_text(json.dumps({"version": "b", "role": "follower"}))
    r = server.update("b")
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["report"]["outcome"] == "load_failed"
    assert "refused version 'b'" in error["message"] and "no worker switched" in error["message"]
    claimed = list(faults.glob("load.claimed.*.json"))
    assert len(claimed) == 1  # exactly one worker took the fault
    assert set(server.worker_versions().values()) == {"a"}
    assert reg.state().current == "a"
    assert reg.history()[-1]["event"] == "swap_failed"
    # with the fault gone the same update goes through: the fault, not the version, was the cause
    r = server.update("b")
    assert r.status_code == 200 and set(server.worker_versions().values()) == {"b"}


def test_kill_9_of_a_worker_mid_swap_converges_on_the_committed_version(
    reg: Registry, servers: list[ServerProcess], tmp_path: Path, model_dir: Callable[..., Path]
) -> None:
    reg.add(model_dir(TEXT["heavy"], weights_mb=150), "heavy")  # loading takes long enough to aim at
    server = _start(servers, reg, tmp_path, workers=2)
    answer: dict[str, httpx.Response] = {}
    thread = threading.Thread(target=lambda: answer.setdefault("r", server.update("heavy")))
    thread.start()

    def a_follower_is_staging() -> int | None:
        for worker in server.status()["workers"]:
            staged = worker.get("staged")
            if staged and staged["version"] == "heavy" and worker["pid"] != _coordinator(reg):
                return int(worker["pid"])
        return None

    victim = wait_until(a_follower_is_staging, timeout_s=60, interval_s=0.02, message="a follower staging")
    os.kill(victim, signal.SIGKILL)
    thread.join(300)
    assert answer["r"].status_code in (200, 422), answer["r"].text

    def converged() -> bool:
        versions = server.worker_versions()
        return len(versions) == 2 and victim not in versions and set(versions.values()) == {reg.state().current}

    wait_until(converged, timeout_s=90, message="every worker on the committed version")
    wait_until(server.ready, timeout_s=30, message="readiness back")


def _coordinator(reg: Registry) -> int | None:
    try:
        return int(json.loads((reg.root / "rollout.json").read_text())["coordinator_pid"])
    except (FileNotFoundError, ValueError, KeyError):
        return None


def test_a_crashed_worker_is_replaced_by_one_that_loads_the_committed_version_first(
    reg: Registry, servers: list[ServerProcess], tmp_path: Path
) -> None:
    server = _start(servers, reg, tmp_path, workers=2)
    assert server.update("b").status_code == 200
    victim = next(iter(server.worker_versions()))
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: victim not in server.worker_versions() and len(server.worker_versions()) == 2,
               timeout_s=60, message="gunicorn to replace the worker")
    assert set(server.worker_versions().values()) == {"b"}
    metrics = httpx.get(f"{server.url}/metrics").text
    assert f'pid="{victim}"' not in metrics  # a dead worker's live gauges are gone


def test_a_replacement_worker_failing_its_load_retries_instead_of_rolling_every_worker_back(
    reg: Registry, servers: list[ServerProcess], tmp_path: Path
) -> None:
    """The other worker serves the version, so it works: a failure in the new worker alone (memory,
    a slow start beside busy peers) must not revert the registry and roll the whole fleet back."""
    server = _start(servers, reg, tmp_path, workers=2, env={"VOXSWAP_FAULT_INJECTION": "true"})
    assert server.update("b").status_code == 200
    faults = reg.root / "faults"
    faults.mkdir()
    (faults / "load.json").write_text(json.dumps({"version": "b"}))
    victim = next(iter(server.worker_versions()))
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: list(faults.glob("load.claimed.*.json")), timeout_s=60,
               message="the replacement worker to hit the fault")
    wait_until(lambda: len(server.worker_versions()) == 2 and victim not in server.worker_versions()
               and set(server.worker_versions().values()) == {"b"}, timeout_s=60,
               message="the replacement worker to load b on its retry")
    assert (reg.state().current, reg.state().previous) == ("b", "a")
    events = [e["event"] for e in reg.history()]
    assert "load_retry" in events and "refused" not in events
    wait_until(server.ready, timeout_s=30, message="readiness")


def test_sigterm_turns_readiness_503_keeps_serving_then_exits_0(
    reg: Registry, servers: list[ServerProcess], tmp_path: Path
) -> None:
    server = _start(servers, reg, tmp_path, workers=2, env={"VOXSWAP_SHUTDOWN_DELAY_S": "2"})
    long_clip = synth.wav_bytes(synth.speech_like(25.0))  # ~0.5 s of model time, spans the stop
    results: list[httpx.Response] = []

    def long_request() -> None:
        results.append(httpx.post(f"{server.url}/api/transcribe", files={"file": ("c.wav", long_clip)}, timeout=60))

    server.proc.send_signal(signal.SIGTERM)
    wait_until(lambda: httpx.get(f"{server.url}/health/ready").status_code == 503, timeout_s=5,
               message="readiness to turn 503")
    # still serving while the load balancer takes note
    r = httpx.post(f"{server.url}/api/transcribe", files={"file": ("c.wav", synth.wav_bytes(synth.speech_like(1.0)))})
    assert r.status_code == 200
    assert r.headers["connection"] == "close"  # so no client reuses a connection the stop will close
    inflight = [threading.Thread(target=long_request) for _ in range(2)]
    for t in inflight:
        t.start()
    for t in inflight:
        t.join(60)
    assert [res.status_code for res in results] == [200, 200]
    assert server.proc.wait(60) == 0
    assert not (Path(server.env["HOME"]) / ".gunicorn").exists()  # gunicorn 27's control socket is off


def test_workers_over_their_memory_budget_are_recycled_one_at_a_time(
    reg: Registry, servers: list[ServerProcess], tmp_path: Path
) -> None:
    server = _start(servers, reg, tmp_path, workers=2, env={"VOXSWAP_MEMORY_BUDGET_MB": "1"})
    before = set(server.worker_versions())
    clip = synth.wav_bytes(synth.speech_like(1.0))
    with LoadGenerator(server.url, clip, concurrency=2) as load:
        wait_until(lambda: load.count() >= 10, message="a baseline for the watch")
        assert server.update("b", watch_seconds=3).status_code == 200

        def recycled() -> bool:
            versions = server.worker_versions()
            return len(versions) == 2 and not (set(versions) & before) and set(versions.values()) == {"b"}

        wait_until(recycled, timeout_s=120, message="both workers recycled and back on b")
    events = reg.history()
    recycles = [e for e in events if e["event"] == "recycle"]
    assert sorted(e["pid"] for e in recycles) == sorted(before)
    assert all("exceeds the 1 MiB budget" in e["reason"] for e in recycles)
    # the worker that swapped (and watched) was recycled only after the watch's verdict
    watcher = next(e["pid"] for e in events if e["event"] == "watch_start")
    verdict = next(i for i, e in enumerate(events) if e["event"].startswith("watch_") and e["event"] != "watch_start")
    assert events[verdict]["event"] == "watch_passed"
    assert next(i for i, e in enumerate(events) if e["event"] == "recycle" and e["pid"] == watcher) > verdict
    assert load.failures() == []


def test_a_rollout_whose_coordinator_dies_is_abandoned_and_peers_free_their_candidate(
    reg: Registry, servers: list[ServerProcess], tmp_path: Path, model_dir: Callable[..., Path]
) -> None:
    reg.add(model_dir(TEXT["heavy"], weights_mb=150), "heavy")
    server = _start(servers, reg, tmp_path, workers=2)
    thread = threading.Thread(target=lambda: _swallow(server.update, "heavy"))
    thread.start()

    def follower_still_loading() -> int | None:
        # the coordinator cannot commit before every peer is ready: killed now, it never will
        coordinator = _coordinator(reg)
        for worker in server.status()["workers"]:
            staged = worker.get("staged")
            if coordinator and worker["pid"] != coordinator and staged and staged["status"] == "loading":
                return coordinator
        return None

    coordinator = wait_until(follower_still_loading, timeout_s=60, interval_s=0.01, message="a follower staging")
    os.kill(coordinator, signal.SIGKILL)
    thread.join(60)

    def settled() -> bool:
        workers = server.status()["workers"]
        return (len(workers) == 2 and coordinator not in [w["pid"] for w in workers]
                and all(w["version"] == "a" and not w["staged"] for w in workers)
                and not (reg.root / "rollout.json").exists())

    wait_until(settled, timeout_s=60, message="the abandoned rollout cleared and candidates freed")
    assert reg.state().current == "a"
    assert any(e["event"] == "rollout_abandoned" for e in reg.history())
    assert server.update("b").status_code == 200  # the registry is free for the next rollout


def _swallow(fn: Callable[..., object], *args: object) -> None:
    with contextlib.suppress(httpx.HTTPError):  # the coordinator is killed while answering
        fn(*args)
