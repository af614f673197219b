"""Two named models under a real gunicorn with two workers: each model rolls out on its own.

The default model ("sensevoice", at the registry root) and "meeting" (under models/meeting/) each
have two versions that say different texts, so every answer shows which model and version made it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.storage.catalog import ModelCatalog
from server.testing import synth
from testkit.harness import LoadGenerator, Outcome, wait_until
from testkit.processes import ServerProcess, start_server

pytestmark = pytest.mark.e2e
DEFAULT, MEETING = "sensevoice", "meeting"
TEXT = {"a": "default model alpha", "b": "default model bravo", "m1": "meeting one", "m2": "meeting two"}
CLIP = synth.wav_bytes(synth.speech_like(1.0))


@pytest.fixture
def catalog(tmp_path: Path, model_dir: Callable[..., Path]) -> ModelCatalog:
    catalog = ModelCatalog(tmp_path / "registry")
    default = catalog.default_registry.ensure()
    default.add(model_dir(TEXT["a"], compute_ms=20), "a")
    default.add(model_dir(TEXT["b"], compute_ms=20), "b")
    default.promote("a")
    meeting = catalog.create(MEETING, "sensevoice")
    meeting.add(model_dir(TEXT["m1"], compute_ms=20), "m1")
    meeting.add(model_dir(TEXT["m2"], compute_ms=20), "m2")
    meeting.promote("m1")
    return catalog


@pytest.fixture
def serve(catalog: ModelCatalog, tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """``serve(**env)`` -> voxswap under gunicorn with 2 workers, both models served by both."""
    started: list[ServerProcess] = []

    def start(**env: str) -> ServerProcess:
        server = start_server(catalog.root, tmp_path / f"run{len(started)}", workers=2, env=env)
        started.append(server)
        wait_until(lambda: _versions(server, MEETING) == {"m1"} and len(_workers(server, MEETING)) == 2
                   and httpx.get(f"{server.url}/health/ready", params={"model": MEETING}).status_code == 200,
                   timeout_s=60, message="both workers serving meeting")
        assert _workers(server, DEFAULT).keys() == _workers(server, MEETING).keys()  # one heartbeat per model
        return server

    yield start
    for server in started:
        server.stop()


def _model(server: ServerProcess, name: str) -> dict[str, Any]:
    return next(m for m in server.status()["models"] if m["name"] == name)


def _workers(server: ServerProcess, name: str) -> dict[int, str | None]:
    """Every worker's heartbeat for one model: pid -> the version it serves."""
    return {w["pid"]: w["version"] for w in _model(server, name)["workers"]}


def _versions(server: ServerProcess, name: str) -> set[str | None]:
    return set(_workers(server, name).values())


def _update(server: ServerProcess, model: str, version: str) -> httpx.Response:
    return httpx.post(f"{server.url}/admin/models/{model}/update", json={"version": version},
                      headers=server.auth, timeout=300)


def _answers(server: ServerProcess, model: str, n: int = 30) -> list[httpx.Response]:
    """``n`` transcriptions, each on a fresh connection so gunicorn spreads them over the workers."""
    form = {"model": model} if model != DEFAULT else {}
    return [httpx.post(f"{server.url}/api/transcribe", files={"file": ("c.wav", CLIP, "audio/wav")}, data=form,
                       timeout=30) for _ in range(n)]


def _assert_serves(server: ServerProcess, model: str, version: str) -> None:
    """Every worker's heartbeat and every answer say ``version`` of ``model``, with its text."""
    assert _versions(server, model) == {version} and len(_workers(server, model)) == 2
    for r in _answers(server, model):
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["model"], body["model_version"], body["text"]) == (model, version, TEXT[version])
        assert (r.headers["x-model"], r.headers["x-model-version"]) == (model, version)


def _check_load(outcomes: list[Outcome], model: str, versions: set[str]) -> None:
    assert outcomes and all(o.ok for o in outcomes), [o.error for o in outcomes if not o.ok][:3]
    assert {o.model for o in outcomes} == {model}
    assert {o.version for o in outcomes} <= versions
    assert all(o.text == TEXT[o.version or ""] for o in outcomes)


def test_updating_one_model_converges_every_worker_on_it_and_leaves_the_other_alone(
    serve: Callable[..., ServerProcess], catalog: ModelCatalog
) -> None:
    server = serve()
    pids = set(_workers(server, DEFAULT))
    with LoadGenerator(server.url, CLIP, concurrency=2) as default_load, \
            LoadGenerator(server.url, CLIP, concurrency=2, form={"model": MEETING}) as meeting_load:
        wait_until(lambda: default_load.count() >= 10 and meeting_load.count() >= 10, message="traffic before")
        r = _update(server, MEETING, "m2")
        done = time.monotonic()
        assert r.status_code == 200, r.text
        report = r.json()
        assert report["converged"] is True and report["model"] == MEETING
        assert sorted(w["version"] for w in report["workers"]) == ["m2", "m2"]
        seen = meeting_load.count()
        wait_until(lambda: meeting_load.count() >= seen + 20, message="meeting traffic after the update")
    _check_load(default_load.outcomes, DEFAULT, {"a"})
    _check_load(meeting_load.outcomes, MEETING, {"m1", "m2"})
    after = [o for o in meeting_load.outcomes if o.started > done]
    assert after and {o.version for o in after} == {"m2"}  # converged: no worker answers m1 any more
    assert set(_workers(server, MEETING)) == set(_workers(server, DEFAULT)) == pids  # nobody restarted
    _assert_serves(server, MEETING, "m2")
    _assert_serves(server, DEFAULT, "a")
    assert (catalog.registry(MEETING).state().current, catalog.default_registry.state().current) == ("m2", "a")
    assert not any(e["event"] == "promote" and e.get("actor") == "admin" for e in catalog.default_registry.history())


def test_a_cli_promote_of_one_model_reaches_both_workers_and_only_that_model(
    serve: Callable[..., ServerProcess], catalog: ModelCatalog
) -> None:
    server = serve()
    generation = catalog.default_registry.state().generation
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOXSWAP_")}
    with LoadGenerator(server.url, CLIP, concurrency=2, form={"model": MEETING}) as load:
        wait_until(lambda: load.count() >= 5, message="meeting traffic before the promote")
        cli = subprocess.run([sys.executable, "-m", "server", "registry", "promote", "m2", "--model", MEETING,
                              "--registry", str(catalog.root)], env=env, capture_output=True, text=True, timeout=120)
        assert cli.returncode == 0, cli.stderr
        assert "m2 is current for model meeting" in cli.stdout
        wait_until(lambda: _versions(server, MEETING) == {"m2"} and len(_workers(server, MEETING)) == 2,
                   timeout_s=30, message="both workers to follow the CLI promote of meeting")
        seen = load.count()
        wait_until(lambda: load.count() >= seen + 10, message="meeting traffic after the promote")
    _check_load(load.outcomes, MEETING, {"m1", "m2"})
    _assert_serves(server, MEETING, "m2")
    _assert_serves(server, DEFAULT, "a")
    assert catalog.default_registry.state().generation == generation  # the default model's pointer never moved
    wait_until(server.ready, timeout_s=10, message="readiness after the promote")


def test_a_worker_refusing_one_models_candidate_stops_only_that_models_rollout(
    serve: Callable[..., ServerProcess], catalog: ModelCatalog
) -> None:
    server = serve(VOXSWAP_FAULT_INJECTION="true")
    meeting = catalog.registry(MEETING)
    faults = meeting.root / "faults"  # models/meeting/faults: the default model never reads it
    faults.mkdir()
    (faults / "load.json").write_text(json.dumps({"version": "m2", "role": "follower"}))
    r = _update(server, MEETING, "m2")
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["report"]["outcome"] == "load_failed" and error["report"]["model"] == MEETING
    assert "refused version 'm2'" in error["message"] and "no worker switched" in error["message"]
    claimed = list(faults.glob("load.claimed.*.json"))
    assert len(claimed) == 1  # exactly one worker took the fault
    refuser = int(claimed[0].name.split(".")[2])
    assert meeting.state().current == "m1" and meeting.history()[-1]["event"] == "swap_failed"
    assert _versions(server, MEETING) == {"m1"}
    # the default model's rollout right after is untouched by meeting's refusal
    r = _update(server, DEFAULT, "b")
    assert r.status_code == 200, r.text
    assert r.json()["converged"] is True and sorted(w["version"] for w in r.json()["workers"]) == ["b", "b"]
    assert not (catalog.root / "faults").exists()
    # no worker holds a meeting candidate (the refuser's heartbeat may still say why it refused)
    staged = {w["pid"]: w["staged"] for w in _model(server, MEETING)["workers"]}
    assert all(s is None or (pid == refuser and s["status"] == "failed") for pid, s in staged.items()), staged
    _assert_serves(server, DEFAULT, "b")
    _assert_serves(server, MEETING, "m1")
    assert (catalog.default_registry.state().current, meeting.state().current) == ("b", "m1")


def test_an_unknown_model_is_a_404_in_the_error_envelope(serve: Callable[..., ServerProcess]) -> None:
    server = serve()
    answers = {
        "transcribe": httpx.post(f"{server.url}/api/transcribe", files={"file": ("c.wav", CLIP, "audio/wav")},
                                 data={"model": "nope"}, timeout=30),
        "update": httpx.post(f"{server.url}/admin/models/nope/update", json={"version": "m2"}, headers=server.auth,
                             timeout=30),
        "ready": httpx.get(f"{server.url}/health/ready", params={"model": "nope"}, timeout=30),
    }
    for route, r in answers.items():
        assert r.status_code == 404, (route, r.text)
        assert r.headers["content-type"].startswith("application/json"), route
        error = r.json()["error"]
        assert (error["code"], error["type"], error["param"]) == ("not_found", "invalid_request_error", "model")
        assert "no model 'nope'" in error["message"] and error["request_id"], (route, error)
    assert [m["name"] for m in server.status()["models"]] == [DEFAULT, MEETING]
    assert _versions(server, MEETING) == {"m1"} and _versions(server, DEFAULT) == {"a"}
