"""Several named models in one server, each with its own versions, pointer, history and swaps."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings
from server.storage.catalog import ModelCatalog
from server.storage.registry import Registry
from server.testing import synth
from server.tools.cli import main as cli
from testkit.harness import LoadGenerator, serve_in_thread, wait_until
from tests.conftest import AUTH, MEET_1, MEET_2, TEXT_A, TEXT_B, TOKEN

FIXTURE = Path(__file__).parent / "fixtures" / "registry-previous-release"


@pytest.fixture
def two_models(catalog: ModelCatalog, make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings())) as c:
        yield c


def _transcribe(c: TestClient, clip: bytes, path: str = "/api/transcribe", **form: str) -> httpx.Response:
    return c.post(path, files={"file": ("clip.wav", clip, "audio/wav")}, data=form)


def test_requests_choose_a_model_by_name_alias_or_pinned_version(two_models: TestClient, speech_wav: bytes) -> None:
    c = two_models
    r = _transcribe(c, speech_wav, model="meeting")
    assert r.status_code == 200, r.text
    assert (r.json()["text"], r.json()["model"], r.json()["model_version"]) == (MEET_1, "meeting", "m1")
    assert (r.headers["x-model"], r.headers["x-model-version"]) == ("meeting", "m1")
    r = _transcribe(c, speech_wav)
    assert (r.json()["text"], r.json()["model"], r.headers["x-model-version"]) == (TEXT_A, "sensevoice", "a")
    for spelling, expected in [("meeting", MEET_1), ("meeting@m1", MEET_1), ("whisper-1", TEXT_A),
                               ("default", TEXT_A), ("sensevoice@a", TEXT_A), ("a", TEXT_A)]:
        r = _transcribe(c, speech_wav, "/v1/audio/transcriptions", model=spelling, response_format="verbose_json")
        assert r.status_code == 200, (spelling, r.text)
        assert r.json()["text"] == expected, spelling
    # pinned but not loaded here: 409, as for a pinned version of the default model
    assert _transcribe(c, speech_wav, "/v1/audio/transcriptions", model="meeting@m2").status_code == 409
    r = c.post("/api/transcribe", files={"file": ("c.wav", speech_wav, "audio/wav")}, data={"model": "meeting"},
               headers={"X-Model-Version": "m2"})
    assert r.status_code == 409
    for unknown in ("nope", "nope@m1", "meeting@nope", "meeting@"):
        r = _transcribe(c, speech_wav, "/v1/audio/transcriptions", model=unknown)
        assert r.status_code == 404, unknown
        assert r.json()["error"]["param"] == "model"
    ids = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
    assert {"sensevoice", "meeting", "sensevoice@a", "meeting@m1", "a", "b"} <= set(ids)
    assert ids["meeting"]["version"] == "m1" and ids["meeting@m1"]["model"] == "meeting"
    assert "m1" not in ids  # bare version ids are the default model's only


def test_each_model_has_its_own_admin_routes_history_status_and_metrics(two_models: TestClient,
                                                                         speech_wav: bytes) -> None:
    c = two_models
    listed = c.get("/admin/models", headers=AUTH).json()
    assert listed["default"] == "sensevoice"
    by_name = {m["name"]: m for m in listed["models"]}
    assert by_name["meeting"]["live_version"] == "m1" and by_name["sensevoice"]["live_version"] == "a"
    assert by_name["meeting"]["kind"] == "sensevoice" and by_name["meeting"]["generated"] is True
    r = c.post("/admin/models/meeting/update", json={"version": "m2", "expected_current": "m1"}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert (r.json()["model"], r.json()["version"], r.json()["from_version"]) == ("meeting", "m2", "m1")
    assert _transcribe(c, speech_wav, model="meeting").json()["text"] == MEET_2
    assert _transcribe(c, speech_wav).json()["text"] == TEXT_A  # the default model never moved
    assert c.get("/admin/model/versions", headers=AUTH).json()["current"] == "a"
    assert c.get("/admin/models/meeting/versions", headers=AUTH).json()["current"] == "m2"
    assert c.post("/admin/models/meeting/rollback", headers=AUTH).json()["version"] == "m1"
    assert c.post("/admin/models/nope/update", json={"version": "x"}, headers=AUTH).status_code == 404
    meeting_history = c.get("/admin/history", params={"model": "meeting"}, headers=AUTH).json()["events"]
    assert {e["model"] for e in meeting_history} == {"meeting"}
    assert [e["event"] for e in meeting_history][-2:] == ["promote", "rollback"]
    everything = c.get("/admin/history", headers=AUTH).json()["events"]
    assert {e["model"] for e in everything} == {"sensevoice", "meeting"}
    assert [e["ts"] for e in everything] == sorted(e["ts"] for e in everything)
    status = c.get("/api/system/status").json()
    assert [m["name"] for m in status["models"]] == ["sensevoice", "meeting"]
    assert status["models_memory_bytes"] >= sum(m["model_memory_bytes"] for m in status["models"])
    metrics = c.get("/metrics").text
    assert 'voxswap_model_active{model="meeting",version="m1"} 1.0' in metrics
    assert 'voxswap_model_active{model="sensevoice",version="a"} 1.0' in metrics
    assert 'voxswap_swaps_total{model="meeting",outcome="rolled_back"} 1.0' in metrics
    assert 'voxswap_swaps_total{model="sensevoice",outcome="rolled_back"} 0.0' in metrics


def test_unloading_one_model_frees_only_it_and_readiness_can_be_scoped(
        catalog: ModelCatalog, make_settings: Callable[..., Settings], speech_wav: bytes) -> None:
    with TestClient(create_app(make_settings(ready_models="sensevoice"))) as c:
        unloaded = c.post("/admin/models/meeting/unload", headers=AUTH).json()
        assert unloaded["unloaded"] == "m1" and unloaded["model"] == "meeting"
        r = _transcribe(c, speech_wav, model="meeting")
        assert r.status_code == 503 and "unloaded by an operator" in r.json()["error"]["message"]
        assert _transcribe(c, speech_wav).status_code == 200
        assert c.get("/health/ready").status_code == 200  # meeting is not one of VOXSWAP_READY_MODELS
        scoped = c.get("/health/ready", params={"model": "meeting"})
        assert scoped.status_code == 503 and "meeting" in scoped.json()["reason"]
        assert c.get("/health/ready", params={"model": "nope"}).status_code == 404
        status = {m["name"]: m for m in c.get("/api/system/status").json()["models"]}
        # a load's memory is what the process grew by (0 in a process warm from earlier loads); unloaded is 0
        assert status["meeting"]["model_memory_bytes"] == 0 and status["meeting"]["live_version"] is None
        assert status["meeting"]["generated"] is True  # told by the current version's manifest while unloaded
    with TestClient(create_app(make_settings())) as c:  # default: every model with a current version
        ready = c.get("/health/ready")
        assert ready.status_code == 503 and "meeting" in ready.json()["reason"]
        assert c.post("/admin/models/meeting/load", headers=AUTH).status_code == 200
        assert c.get("/health/ready").status_code == 200


def test_a_model_created_while_the_server_runs_is_served(client: TestClient, registry: Registry,
                                                         model_dir: Callable[..., Path], speech_wav: bytes) -> None:
    assert _transcribe(client, speech_wav, model="meeting").status_code == 404
    assert cli(["registry", "add", str(model_dir(MEET_1)), "--model", "meeting", "--version", "m1",
                "--registry", str(registry.root)]) == 0
    assert cli(["registry", "promote", "m1", "--model", "meeting", "--registry", str(registry.root)]) == 0
    wait_until(lambda: _transcribe(client, speech_wav, model="meeting").status_code == 200,
               message="the new model is followed")
    assert _transcribe(client, speech_wav, model="meeting").json()["text"] == MEET_1


def test_upload_creates_a_named_model(client: TestClient, registry: Registry, tmp_path: Path,
                                      model_dir: Callable[..., Path]) -> None:
    source = Registry(tmp_path / "elsewhere").ensure()
    source.add(model_dir(MEET_1), "m1")
    archive = source.export_archive("m1", tmp_path / "m1.tar.gz").read_bytes()
    r = client.post("/admin/models/meeting/versions", data={"version": "m1"}, headers=AUTH,
                    files={"file": ("m1.tar.gz", archive, "application/gzip")})
    assert r.status_code == 201, r.text
    assert r.json()["kind"] == "sensevoice"
    assert client.post("/admin/models/meeting/update", json={"version": "m1"}, headers=AUTH).status_code == 200
    for bad, status in (("default", 400), ("a@b", 400)):
        r = client.post(f"/admin/models/{bad}/versions", data={"version": "m1"}, headers=AUTH,
                        files={"file": ("m1.tar.gz", archive, "application/gzip")})
        assert r.status_code in (status, 404), (bad, r.text)


def test_cli_manages_each_model(registry: Registry, model_dir: Callable[..., Path],
                                capsys: pytest.CaptureFixture[str]) -> None:
    reg = ["--registry", str(registry.root)]
    assert cli(["registry", "add", str(model_dir(MEET_1)), "--model", "meeting", "--version", "m1", *reg]) == 0
    assert cli(["registry", "add", str(model_dir(MEET_2)), "--model", "meeting", "--version", "m2",
                "--kind", "sensevoice", *reg]) == 0
    assert cli(["registry", "promote", "m1", "--model", "meeting", *reg]) == 0
    assert cli(["registry", "promote", "m2", "--model", "meeting", *reg]) == 0
    assert cli(["registry", "rollback", "--model", "meeting", *reg]) == 0
    assert cli(["registry", "verify", "m2", "--model", "meeting", *reg]) == 0
    assert cli(["registry", "add", str(model_dir(MEET_1)), "--model", "x", "--version", "v", "--kind", "nope",
                *reg]) == 1
    assert "unknown model kind 'nope'" in capsys.readouterr().err
    assert cli(["registry", "add", str(model_dir(MEET_1)), "--model", "whisper-1", "--version", "v", *reg]) == 1
    assert "alias" in capsys.readouterr().err
    assert cli(["registry", "promote", "m2", *reg]) == 1  # without --model: the default model, which has no m2
    capsys.readouterr()
    assert cli(["registry", "list", "--json", *reg]) == 0
    listing = json.loads(capsys.readouterr().out)
    models = {m["name"]: m for m in listing["models"]}
    assert (models["meeting"]["kind"], models["meeting"]["current"], models["meeting"]["previous"]) == \
        ("sensevoice", "m1", "m2")
    assert [v["name"] for v in models["meeting"]["versions"]] == ["m1", "m2"]
    assert listing["state"]["current"] == "a" and models["sensevoice"]["current"] == "a"
    assert cli(["registry", "remove", "m2", "--model", "meeting", *reg]) == 1  # previous: kept
    assert cli(["registry", "list", "--model", "meeting", *reg]) == 0
    out = capsys.readouterr().out
    assert "model meeting" in out and "* m1" in out and "sensevoice" in out.split("\n")[0]


def test_a_registry_the_previous_release_wrote_opens_with_nothing_lost(
        tmp_path: Path, model_dir: Callable[..., Path], speech_wav: bytes) -> None:
    root = shutil.copytree(FIXTURE, tmp_path / "registry")
    before = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    old_history = [json.loads(line) for line in (root / "history.jsonl").read_text().splitlines()]
    settings = Settings(registry=root, admin_token=TOKEN, seed_demo=False, watch_interval_s=0.05)  # type: ignore[arg-type]
    with TestClient(create_app(settings)) as c:
        r = _transcribe(c, speech_wav)
        assert (r.json()["text"], r.json()["model"], r.json()["model_version"]) == ("legacy one", "sensevoice", "v1")
        versions = c.get("/admin/model/versions", headers=AUTH).json()
        assert (versions["current"], versions["previous"], versions["generation"]) == ("v1", "v2", 3)
        assert [v["name"] for v in versions["versions"]] == ["v1", "v2"]
        assert all(v["kind"] == "sensevoice" for v in versions["versions"])
        history = c.get("/admin/history", params={"model": "sensevoice"}, headers=AUTH).json()["events"]
        assert [{k: v for k, v in e.items() if k != "model"} for e in history] == old_history
        assert {e["model"] for e in history} == {"sensevoice"}
        # a new named model beside it changes none of the files the previous release reads
        meeting = ModelCatalog(root).create("meeting", "sensevoice")
        meeting.add(model_dir(MEET_1), "m1")
        meeting.promote("m1")
        wait_until(lambda: _transcribe(c, speech_wav, model="meeting").status_code == 200,
                   message="the new model beside the old layout")
    after = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    assert {k: v for k, v in after.items() if k in before} == before
    added = {str(k) for k in after if k not in before}
    # new files only: the new model, heartbeats, locks, and each loaded version's prepared graph (which
    # the previous release never reads)
    assert all(name.startswith(("models/meeting/", "workers/", ".lock")) or "/prepared/" in name
               for name in added), added
    assert cli(["registry", "verify", "v2", "--registry", str(root)]) == 0


@pytest.fixture
def slow_catalog(tmp_path: Path, model_dir: Callable[..., Path]) -> ModelCatalog:
    """Two models whose versions take a while to load (heavy weights) and compute like the real one."""
    cat = ModelCatalog(tmp_path / "slow")
    default = cat.default_registry.ensure()
    default.add(model_dir(TEXT_A, compute_ms=20, weights_mb=120), "a")
    default.add(model_dir(TEXT_B, compute_ms=20, weights_mb=120), "b")
    default.promote("a")
    meeting = cat.create("meeting", "sensevoice")
    meeting.add(model_dir(MEET_1, compute_ms=20, weights_mb=120), "m1")
    meeting.add(model_dir(MEET_2, compute_ms=20, weights_mb=120), "m2")
    meeting.promote("m1")
    return cat


def test_two_models_swap_at_once_under_load_and_every_answer_names_its_model_and_version(
        slow_catalog: ModelCatalog) -> None:
    settings = Settings(registry=slow_catalog.root, admin_token=TOKEN, seed_demo=False,  # type: ignore[arg-type]
                        inference_workers=2, intra_op_threads=1, max_queue=32, drain_timeout_s=30)
    texts = {("sensevoice", "a"): TEXT_A, ("sensevoice", "b"): TEXT_B, ("meeting", "m1"): MEET_1,
             ("meeting", "m2"): MEET_2}
    clip = synth.wav_bytes(synth.speech_like(2.0, seed=5))
    answers: dict[str, dict[str, Any]] = {}

    def update(url: str, path: str, version: str) -> None:
        sent = time.monotonic()
        r = httpx.post(f"{url}{path}", json={"version": version}, headers=AUTH, timeout=120)
        answers[path] = {"status": r.status_code, "body": r.json(), "sent": sent, "answered": time.monotonic()}

    with serve_in_thread(create_app(settings)) as url, \
            LoadGenerator(url, clip, concurrency=2) as default_load, \
            LoadGenerator(url, clip, concurrency=2, form={"model": "meeting"}) as meeting_load:
        wait_until(lambda: default_load.count() >= 5 and meeting_load.count() >= 5, message="traffic on both")
        swaps = [threading.Thread(target=update, args=(url, "/admin/model/update", "b")),
                 threading.Thread(target=update, args=(url, "/admin/models/meeting/update", "m2"))]
        for t in swaps:
            t.start()
        for t in swaps:
            t.join()
        settled = default_load.count() + meeting_load.count()
        wait_until(lambda: default_load.count() + meeting_load.count() >= settled + 10, message="traffic after")
    assert {a["status"] for a in answers.values()} == {200}, answers
    outcomes = default_load.outcomes + meeting_load.outcomes
    assert default_load.failures() == [] and meeting_load.failures() == []
    for o in outcomes:
        assert o.text == texts[(o.model or "", o.version or "")], o  # labelled with what computed it
    assert {o.model for o in default_load.outcomes} == {"sensevoice"}
    assert {o.model for o in meeting_load.outcomes} == {"meeting"}
    # the builds overlapped: one global swap lock would have made the second one 409 or wait its turn
    windows = [(a["sent"], a["sent"] + a["body"]["timings"]["time_to_flip_s"]) for a in answers.values()]
    (start_1, flip_1), (start_2, flip_2) = windows
    assert start_1 < flip_2 and start_2 < flip_1, windows
    overlap = min(flip_1, flip_2) - max(start_1, start_2)
    load_s = [a["body"]["timings"]["load_s"] for a in answers.values()]
    assert overlap > 0.5 * min(load_s), (windows, load_s)
