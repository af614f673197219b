"""Canary rollouts under a real gunicorn with two workers: one split, one verdict, one state file.

The candidate is staged on every worker through the two-phase rollout; each worker routes by the
same ``canary.json`` and the same hash of ``X-Canary-Key``, so a client sees one version whichever
worker answers it. Which worker answered is known for sure: a keep-alive connection stays on the
worker that accepted it, and ``/api/system/status`` on that connection names the worker's pid.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.lifecycle.verdict import on_candidate
from server.storage.registry import Registry
from server.testing import synth
from testkit.harness import LoadGenerator, Outcome, post_clip, wait_until
from testkit.processes import ServerProcess, start_server

pytestmark = [pytest.mark.e2e, pytest.mark.long]
TEXT = {"a": "canary live alpha", "b": "canary candidate bravo"}
CLIP = synth.wav_bytes(synth.speech_like(1.0))
# Both stand-ins cost the same, but two workers, the load and the test share the machine's cores:
# a latency verdict on a few dozen requests would judge the machine, not the candidate. These tests
# are about routing, promotion and recovery; tests/test_canary.py judges slow and empty candidates.
CRITERIA = {"min_requests": 5, "max_latency_ratio": 50.0}
KEYS = 160  # clients of the 25% split: binomial mean 40, sigma sqrt(160 * 0.25 * 0.75) = 5.5


@pytest.fixture
def reg(tmp_path: Path, model_dir: Callable[..., Path]) -> Registry:
    registry = Registry(tmp_path / "registry").ensure()
    registry.add(model_dir(TEXT["a"], compute_ms=20), "a")
    registry.add(model_dir(TEXT["b"], compute_ms=20), "b")
    registry.promote("a")
    return registry


@pytest.fixture
def server(reg: Registry, tmp_path: Path) -> Iterator[ServerProcess]:
    started = start_server(reg.root, tmp_path / "run", workers=2)
    try:
        yield started
    finally:
        started.stop()


@dataclass
class KeyedLoad(LoadGenerator):
    """The load generator's closed-loop clients, each cycling through ``keys`` canary keys of its own
    (so that a canary's split has many clients to split: the default key, the address, is one), and
    spread over ``workers``: client i keeps its first connection only once it reached worker
    i % len(workers) (connections opened at once tend to land on one worker). ``bound`` says which
    worker each client's connection was on, and from when; after a connection error it reconnects."""

    keys: int = 20
    workers: tuple[int, ...] = ()
    bound: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    by_client: dict[str, list[Outcome]] = field(default_factory=dict)

    def __enter__(self) -> KeyedLoad:
        self.start()
        return self

    def _client(self) -> None:
        name = threading.current_thread().name
        index = int(name.rsplit("-", 1)[1])  # LoadGenerator names its threads load-<i>
        target = self.workers[index % len(self.workers)] if self.workers else None
        mine = self.by_client.setdefault(name, [])
        i = tries = 0
        while not self._stop.is_set():
            with httpx.Client(base_url=self.base_url, timeout=self.timeout_s) as client:
                try:
                    pid = _pid(client)
                except httpx.HTTPError:
                    time.sleep(0.05)
                    continue
                tries += 1
                if target is not None and pid != target and not self.bound.get(name) and tries < 200:
                    continue
                self.bound.setdefault(name, []).append((time.monotonic(), pid))
                while not self._stop.is_set():
                    key = {"X-Canary-Key": f"{name}-{i % self.keys}"}
                    outcome = post_clip(client, self.path, self.clip, headers=key, **self.form)
                    self._record(outcome)
                    mine.append(outcome)
                    i += 1
                    if outcome.status == 0:
                        break  # the connection died: a new one, to whichever worker takes it

    def worker_at(self, name: str, when: float) -> int:
        """The worker client ``name``'s connection was on at ``when`` (monotonic)."""
        return [pid for at, pid in self.bound[name] if at <= when][-1]


def _canary(server: ServerProcess, **body: Any) -> httpx.Response:
    return httpx.post(f"{server.url}/admin/model/canary", json=body, headers=server.auth, timeout=300)


def _state(server: ServerProcess) -> dict[str, Any]:
    r = httpx.get(f"{server.url}/admin/model/canary", headers=server.auth, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def _finished(server: ServerProcess) -> dict[str, Any] | None:
    state = _state(server)
    return state if state["state"] not in ("staging", "running") else None


def _heartbeats(server: ServerProcess) -> dict[int, dict[str, Any]]:
    return {w["pid"]: w for w in server.status()["workers"]}


def _pid(client: httpx.Client) -> int:
    return int(client.get("/api/system/status").json()["pid"])


@contextlib.contextmanager
def _per_worker(server: ServerProcess) -> Iterator[dict[int, httpx.Client]]:
    """One keep-alive connection to each live worker, keyed by its pid: fresh connections until
    every worker has accepted one (the kernel hands each to whichever worker accepts first)."""
    wanted = set(_heartbeats(server))
    clients: dict[int, httpx.Client] = {}
    with contextlib.ExitStack() as stack:
        for _ in range(100):
            if set(clients) == wanted:
                break
            client = stack.enter_context(httpx.Client(base_url=server.url, headers=server.auth, timeout=60))
            clients.setdefault(_pid(client), client)
        assert set(clients) == wanted, f"connections reached workers {set(clients)} of {wanted}"
        yield clients


def _transcribe(client: httpx.Client, key: str) -> httpx.Response:
    return client.post("/api/transcribe", files={"file": ("c.wav", CLIP, "audio/wav")},
                       headers={"X-Canary-Key": key})


def _loaded(client: httpx.Client) -> list[str]:
    """The versions the worker behind this connection holds (its live one and a staged candidate)."""
    return [v["name"] for v in client.get("/admin/model/versions").json()["versions"] if v["loaded"]]


def _answers_since(heartbeat: dict[str, Any], version: str, since: float) -> int:
    """Requests a worker's heartbeat says ``version`` answered since ``since`` (unix time)."""
    return sum(1 for at in heartbeat["stats"].get(version, {}).get("at", []) if at >= since)


def _events(reg: Registry) -> list[str]:
    return [e["event"] for e in reg.history()]


def _check_texts(outcomes: list[Outcome]) -> None:
    """Every answer is labelled with the version that computed it."""
    assert all(o.text == TEXT[o.version or ""] for o in outcomes if o.ok), \
        [(o.version, o.text) for o in outcomes if o.ok and o.text != TEXT[o.version or ""]][:3]


def test_a_25_percent_canary_splits_clients_alike_on_both_workers_and_a_delete_drops_it_everywhere(
    reg: Registry, server: ServerProcess
) -> None:
    with _per_worker(server) as workers:
        assert len(workers) == 2
        r = _canary(server, version="b", mode="canary", percent=25, duration_s=600, criteria=CRITERIA)
        assert r.status_code == 200, r.text
        canary = r.json()
        assert (canary["state"], canary["live_version"], canary["mode"]) == ("running", "a", "canary")
        assert canary["coordinator_pid"] in workers
        # the candidate is staged beside the live version on both workers, for this canary's rollout
        for pid, heartbeat in _heartbeats(server).items():
            staged = heartbeat["staged"]
            assert staged and (staged["version"], staged["status"], staged["rollout_id"]) == \
                ("b", "ready", canary["rollout_id"]), (pid, staged)
            assert heartbeat["version"] == "a"
        assert {pid: sorted(_loaded(c)) for pid, c in workers.items()} == {pid: ["a", "b"] for pid in workers}

        # every client asks both workers; each answer's worker is the connection's
        seen: dict[str, dict[int, str]] = {}
        for i in range(KEYS):
            key = f"client-{i}"
            for pid, client in workers.items():
                answer = _transcribe(client, key)
                assert answer.status_code == 200, answer.text
                version = answer.headers["x-model-version"]
                assert answer.json()["text"] == TEXT[version]
                seen.setdefault(key, {})[pid] = version
        assert {pid: _pid(c) for pid, c in workers.items()} == {pid: pid for pid in workers}  # no reconnects

    # sticky across workers: both gave every client the version the canary's hash gives it
    assert [k for k, by_worker in seen.items() if len(set(by_worker.values())) != 1] == []
    assert all(set(by_worker.values()) == {"b" if on_candidate(canary["id"], key, 25) else "a"}
               for key, by_worker in seen.items())
    on_b = sum(1 for by_worker in seen.values() if set(by_worker.values()) == {"b"})
    sigma = math.sqrt(KEYS * 0.25 * 0.75)
    assert KEYS * 0.25 - 3 * sigma <= on_b <= KEYS * 0.25 + 3 * sigma, f"{on_b} of {KEYS} clients on the candidate"

    # each worker's heartbeat counted its own answers; the coordinator's comparison sums both workers'
    started = float(canary["started_at"])
    wait_until(lambda: {pid: (_answers_since(h, "b", started), _answers_since(h, "a", started))
                        for pid, h in _heartbeats(server).items()} == {pid: (on_b, KEYS - on_b) for pid in workers},
               timeout_s=15, message="each worker's heartbeat to count its answers of either version")
    wait_until(lambda: (_state(server)["comparison"]["candidate"]["requests"],
                        _state(server)["comparison"]["live"]["requests"]) == (2 * on_b, 2 * (KEYS - on_b)),
               timeout_s=15, message="the canary's comparison to count both workers' answers")
    refused = server.update("b")
    assert refused.status_code == 409 and "canary of version 'b' is running" in refused.json()["error"]["message"]

    stopped = httpx.delete(f"{server.url}/admin/model/canary", headers=server.auth, timeout=60)
    assert stopped.status_code == 200 and stopped.json()["state"] == "stopped", stopped.text
    wait_until(lambda: all(h["staged"] is None and h["version"] == "a" for h in _heartbeats(server).values())
               and not (reg.root / "rollout.json").exists(), timeout_s=30,
               message="both workers to drop the candidate and the rollout to end")
    with _per_worker(server) as workers:
        assert set(workers) == set(seen["client-0"])  # the same two workers, neither restarted
        assert {pid: _loaded(c) for pid, c in workers.items()} == {pid: ["a"] for pid in workers}
        candidates = [k for k, by_worker in seen.items() if set(by_worker.values()) == {"b"}][:20]
        for pid, client in workers.items():
            answers = [_transcribe(client, key) for key in candidates]
            assert {(a.status_code, a.headers["x-model-version"]) for a in answers} == {(200, "a")}, pid
    assert (reg.state().current, _state(server)["state"]) == ("a", "stopped")
    events = _events(reg)
    assert events.count("canary_start") == 1 and events[-1] == "canary_stopped", events[-5:]


def test_a_good_candidate_under_load_is_promoted_and_both_workers_converge_on_it(
    reg: Registry, server: ServerProcess
) -> None:
    pids = tuple(_heartbeats(server))
    with KeyedLoad(server.url, CLIP, concurrency=4, workers=pids) as load:
        wait_until(lambda: load.count() >= 20, message="traffic before the canary")
        assert sorted(pid for bound in load.bound.values() for _, pid in bound) == sorted(pids * 2)
        r = _canary(server, version="b", percent=50, duration_s=4, on_pass="promote", criteria=CRITERIA)
        assert r.status_code == 200, r.text
        started = float(r.json()["started_at"])
        final = wait_until(lambda: _finished(server), timeout_s=120, interval_s=0.2, message="the canary's verdict")
        decided = time.monotonic()
        seen = load.count()
        wait_until(lambda: load.count() >= seen + 40, message="traffic after the promotion")
    outcomes = load.outcomes
    assert final["state"] == "promoted", final
    comparison = final["comparison"]
    assert comparison["candidate"]["requests"] >= 5 and comparison["live"]["requests"] >= 5, comparison
    assert comparison["candidate"]["errors"] == comparison["live"]["errors"] == 0, comparison
    assert [(o.status, o.error) for o in outcomes if not o.ok] == []
    _check_texts(outcomes)
    during = [o for o in outcomes if o.started < decided]
    assert {o.version for o in during} == {"a", "b"}  # the candidate answered its share before the verdict
    assert {o.version for o in outcomes if o.started > decided} == {"b"}  # promoted: nobody answers a
    # both workers answered both versions under the canary (each serves two of the load's clients)
    beats = _heartbeats(server)
    assert set(beats) == set(pids)
    assert all(_answers_since(h, "a", started) > 0 and _answers_since(h, "b", started) > 0 for h in beats.values())
    assert (reg.state().current, reg.state().previous) == ("b", "a")
    assert list(server.worker_versions().values()) == ["b", "b"]
    with _per_worker(server) as workers:
        for pid, client in workers.items():
            assert _loaded(client) == ["b"], pid  # the old live version was freed on both workers
            answers = [_transcribe(client, f"after-{i}") for i in range(10)]
            assert {(a.status_code, a.headers["x-model-version"]) for a in answers} == {(200, "b")}, pid
    wait_until(lambda: all(h["staged"] is None for h in _heartbeats(server).values()), timeout_s=15,
               message="no worker showing a staged candidate")
    events = _events(reg)
    assert "canary_start" in events and events.count("canary_promoted") == 1, events[-6:]
    wait_until(server.ready, timeout_s=15, message="readiness after the promotion")


def test_kill_9_of_the_coordinator_mid_canary_interrupts_it_and_the_live_version_keeps_answering(
    reg: Registry, server: ServerProcess
) -> None:
    generation = reg.state().generation
    concurrency = 4
    pids = tuple(_heartbeats(server))
    with KeyedLoad(server.url, CLIP, concurrency=concurrency, workers=pids) as load:
        wait_until(lambda: load.count() >= 20, message="traffic before the canary")
        r = _canary(server, version="b", percent=50, duration_s=600, criteria=CRITERIA)
        assert r.status_code == 200, r.text
        canary = r.json()
        coordinator = int(canary["coordinator_pid"])
        survivors = set(_heartbeats(server)) - {coordinator}
        assert len(survivors) == 1
        started = load.count()
        wait_until(lambda: {o.version for o in load.outcomes[started:]} >= {"a", "b"}, timeout_s=30,
                   message="both versions answering under the canary")

        os.kill(coordinator, signal.SIGKILL)
        # the moment its sockets are gone: the kernel tears a killed process down in a few ms, and a
        # request written to one of its connections meanwhile is reset like one in flight
        killed_at = wait_until(lambda: _gone(coordinator) and time.monotonic(), timeout_s=10, interval_s=0.001,
                               message="the killed worker to be torn down")
        interrupted = wait_until(lambda: (s := _state(server))["state"] == "interrupted" and s, timeout_s=30,
                                 interval_s=0.1, message="GET /admin/model/canary to say interrupted")
        noticed_s = time.monotonic() - killed_at

        def settled() -> bool:
            beats = _heartbeats(server)
            return (len(beats) == 2 and coordinator not in beats and survivors < set(beats)
                    and all(h["version"] == "a" and h["staged"] is None for h in beats.values())
                    and not (reg.root / "rollout.json").exists())

        wait_until(settled, timeout_s=90, message="a replacement worker and no candidate anywhere")
        settled_at = time.monotonic()
        seen = load.count()
        wait_until(lambda: load.count() >= seen + 40, timeout_s=30, message="traffic after the interruption")
    outcomes = list(load.outcomes)

    assert f"worker {coordinator}" in interrupted["reason"], interrupted
    assert noticed_s < 10, f"the interruption took {noticed_s:.1f} s to be noticed"
    assert (reg.state().current, reg.state().generation) == ("a", generation)  # the pointer never moved
    events = _events(reg)
    assert events.count("canary_interrupted") == 1, events[-6:]  # one worker marked it, once
    interrupted_event = next(e for e in reversed(reg.history()) if e["event"] == "canary_interrupted")
    assert interrupted_event["canary"] == canary["id"] and interrupted_event["version"] == "b"

    # the only failures: the request each of the killed worker's clients had in flight when it died
    # (an accepted connection dies with its process: the other worker cannot take it over); a
    # connection error each, none started after the kill, and none on the surviving worker
    on_killed = sorted(name for name in load.by_client if load.worker_at(name, killed_at) == coordinator)
    assert len(on_killed) == concurrency // 2  # the load was spread: two clients on each worker
    failed = {name: [o for o in mine if not o.ok] for name, mine in load.by_client.items()}
    for name, mine in failed.items():
        assert all(o.status == 0 and o.started < killed_at < o.finished for o in mine), \
            (name, [(o.status, o.error, o.started - killed_at) for o in mine])
        assert len(mine) <= (1 if name in on_killed else 0), (name, [o.error for o in mine])
    lost = sum(len(mine) for mine in failed.values())
    print(f"\n{lost} of {len(outcomes)} requests failed: the ones in flight on the killed coordinator "
          f"({len(on_killed)} clients were on it); interrupted {noticed_s:.2f} s after the kill")
    _check_texts(outcomes)
    after = [o for o in outcomes if o.started > settled_at]
    assert after and all(o.ok for o in after) and {o.version for o in after} == {"a"}

    with _per_worker(server) as workers:  # the survivor and gunicorn's replacement: neither holds b
        assert survivors < set(workers) and coordinator not in workers
        assert {pid: _loaded(c) for pid, c in workers.items()} == {pid: ["a"] for pid in workers}
    # the model is free again: the next canary starts on both workers (and is stopped)
    again = _canary(server, version="b", percent=10, duration_s=600, criteria=CRITERIA)
    assert again.status_code == 200 and again.json()["state"] == "running", again.text
    stopped = httpx.delete(f"{server.url}/admin/model/canary", headers=server.auth, timeout=60)
    assert stopped.status_code == 200 and stopped.json()["state"] == "stopped", stopped.text
    assert Counter(_events(reg))["canary_start"] == 2


def _gone(pid: int) -> bool:
    """Exited (a zombie its parent has not reaped yet, or no process at all): its sockets are closed."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True
