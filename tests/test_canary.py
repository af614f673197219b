"""Canary and shadow rollouts: a candidate earns traffic, is judged beside the live version, and is
promoted or dropped by itself; the live version's answers never fail meanwhile."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings
from server.storage.registry import Registry
from testkit.harness import serve_in_thread, wait_until
from tests.conftest import AUTH, TEXT_A, TEXT_B

FAST = {"min_requests": 5}


def _post(c: TestClient, clip: bytes, key: str) -> httpx.Response:
    return c.post("/api/transcribe", files={"file": ("c.wav", clip, "audio/wav")}, headers={"X-Canary-Key": key})


def _canary(c: TestClient, **body: Any) -> httpx.Response:
    return c.post("/admin/model/canary", json=body, headers=AUTH)


def _state(c: TestClient) -> dict[str, Any]:
    r = c.get("/admin/model/canary", headers=AUTH)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


@pytest.fixture
def canary_client(make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings())) as c:
        yield c


def _drive(c: TestClient, clip: bytes, until: Callable[[], bool], *, keys: int = 40,
           rounds: int = 200) -> list[httpx.Response]:
    """Requests from ``keys`` clients in turn until ``until()`` holds; every answer is kept."""
    answers: list[httpx.Response] = []
    for i in range(rounds * keys):
        answers.append(_post(c, clip, f"client-{i % keys}"))
        if i % 5 == 0 and until():
            return answers
    raise AssertionError("the canary never finished")


def test_a_canary_answers_its_share_of_clients_each_always_from_one_version(
        canary_client: TestClient, speech_wav: bytes) -> None:
    c = canary_client
    r = _canary(c, version="b", mode="canary", percent=25, duration_s=600, criteria=FAST)
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "running" and r.json()["live_version"] == "a"
    seen: dict[str, set[str]] = {}
    for round_ in range(2):
        for i in range(120):
            answer = _post(c, speech_wav, f"client-{i}")
            assert answer.status_code == 200, answer.text
            version = answer.headers["x-model-version"]
            assert answer.json()["text"] == {"a": TEXT_A, "b": TEXT_B}[version]  # labelled with what computed it
            seen.setdefault(f"client-{i}", set()).add(version)
        assert round_ == 0 or all(len(v) == 1 for v in seen.values())  # sticky: one client, one version
    on_candidate = sum(1 for v in seen.values() if v == {"b"})
    assert 25 - 3 * 4.7 <= on_candidate / 1.2 <= 25 + 3 * 4.7, on_candidate  # binomial, n=120, 3 sigma
    wait_until(lambda: _state(c)["comparison"]["candidate"]["requests"] == 2 * on_candidate,
               message="the comparison counts every candidate answer")
    refused = c.post("/admin/model/update", json={"version": "b"}, headers=AUTH)
    assert refused.status_code == 409 and "canary of version 'b' is running" in refused.json()["error"]["message"]
    assert c.post("/admin/model/reload", headers=AUTH).status_code == 409
    assert c.post("/admin/model/unload", headers=AUTH).status_code == 409
    stopped = c.delete("/admin/model/canary", headers=AUTH)
    assert stopped.status_code == 200 and stopped.json()["state"] == "stopped"
    assert c.get("/admin/model/versions", headers=AUTH).json()["live"] == "a"
    assert [v["name"] for v in c.get("/admin/model/versions", headers=AUTH).json()["versions"] if v["loaded"]] == ["a"]
    assert {_post(c, speech_wav, f"client-{i}").headers["x-model-version"] for i in range(20)} == {"a"}
    events = [e["event"] for e in c.get("/admin/history", headers=AUTH).json()["events"]]
    assert events[-2:] == ["canary_start", "canary_stopped"]
    assert c.delete("/admin/model/canary", headers=AUTH).status_code == 409


def test_a_good_candidate_is_promoted_by_itself(canary_client: TestClient, speech_wav: bytes) -> None:
    c = canary_client
    r = _canary(c, version="b", percent=50, duration_s=2, on_pass="promote", criteria=FAST)
    assert r.status_code == 200, r.text
    answers = _drive(c, speech_wav, lambda: _state(c)["state"] != "running")
    assert [a.status_code for a in answers if a.status_code != 200] == []
    final = _state(c)
    assert final["state"] == "promoted", final
    assert final["comparison"]["candidate"]["requests"] >= 5 and final["comparison"]["live"]["requests"] >= 5
    assert c.get("/admin/model/versions", headers=AUTH).json()["current"] == "b"
    assert {_post(c, speech_wav, f"k{i}").json()["text"] for i in range(10)} == {TEXT_B}
    history = c.get("/admin/history", headers=AUTH).json()["events"]
    assert "canary_promoted" in [e["event"] for e in history]


@pytest.mark.parametrize("fault", ["empty", "slow"])
def test_a_worse_candidate_is_dropped_by_itself_and_no_request_fails(
        fault: str, registry: Registry, model_dir: Callable[..., Path], make_settings: Callable[..., Settings],
        speech_wav: bytes) -> None:
    bad = model_dir("") if fault == "empty" else model_dir(TEXT_B, compute_ms=400)
    registry.add(bad, "bad")
    with TestClient(create_app(make_settings())) as c:
        r = _canary(c, version="bad", percent=50, duration_s=120, on_pass="promote", criteria=FAST)
        assert r.status_code == 200, r.text
        answers = _drive(c, speech_wav, lambda: _state(c)["state"] != "running")
        assert [a.status_code for a in answers if a.status_code != 200] == []
        final = _state(c)
        assert final["state"] == "failed", final
        assert ("empty transcripts" if fault == "empty" else "p95 latency") in final["reason"]
        assert c.get("/admin/model/versions", headers=AUTH).json()["current"] == "a"
        assert "bad" not in c.get("/api/system/status").json()["models"][0]["loaded_versions"]
        failed = [e for e in c.get("/admin/history", headers=AUTH).json()["events"] if e["event"] == "canary_failed"]
        assert failed and failed[-1]["comparison"]["candidate"]["requests"] >= 5  # the verdict with its figures


def test_a_candidate_that_fails_its_gate_never_answers(registry: Registry, tmp_path: Path,
                                                       make_settings: Callable[..., Settings]) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.yaml", "am.mvn", "chn_jpn_yue_eng_ko_spectok.bpe.model"):
        (broken / name).write_bytes((registry.version_dir("a") / name).read_bytes())
    (broken / "model.onnx").write_bytes(b"not an onnx graph")
    registry.add(broken, "broken")
    with TestClient(create_app(make_settings())) as c:
        r = _canary(c, version="broken", percent=50, duration_s=60)
        assert r.status_code == 422 and r.json()["error"]["code"] == "swap_failed"
        assert _state(c)["state"] == "failed"
        assert _canary(c, version="nope").status_code == 404
        assert _canary(c, version="a").status_code == 409  # already live


@pytest.mark.parametrize("same", [True, False])
def test_shadow_never_changes_an_answer_and_compares_the_transcripts(
        same: bool, registry: Registry, model_dir: Callable[..., Path], make_settings: Callable[..., Settings],
        speech_wav: bytes) -> None:
    registry.add(model_dir(TEXT_A if same else "a different sentence entirely"), "c")
    with TestClient(create_app(make_settings())) as c:
        r = _canary(c, version="c", mode="shadow", percent=100, duration_s=3, on_pass="promote", criteria=FAST)
        assert r.status_code == 200, r.text
        answers = _drive(c, speech_wav, lambda: _state(c)["state"] != "running")
        versions = [a.headers["x-model-version"] for a in answers]
        live_until = versions.index("c") if "c" in versions else len(versions)  # c only once promoted
        assert {(a.status_code, a.json()["text"]) for a in answers} == {(200, TEXT_A)}
        assert set(versions[:live_until]) == {"a"} and set(versions[live_until:]) <= {"c"}
        assert live_until >= 5  # the shadow's window was answered by the live version alone
        final = _state(c)
        shadow = final["comparison"]["shadow"]
        assert shadow["compared"] >= 5
        current = c.get("/admin/model/versions", headers=AUTH).json()["current"]
        if same:  # promoted by a fresh update: the shadow's lean candidate never serves
            assert (final["state"], shadow["cer_mean"], current) == ("promoted", 0.0, "c"), final["reason"]
            assert {_post(c, speech_wav, f"k{i}").headers["x-model-version"] for i in range(5)} == {"c"}
        else:
            assert final["state"] == "failed" and shadow["cer_mean"] > 0.5 and "CER" in final["reason"], final
            assert current == "a"  # the live version never left


def test_a_slow_shadow_drops_mirrors_instead_of_delaying_live_answers(
        registry: Registry, model_dir: Callable[..., Path], make_settings: Callable[..., Settings],
        speech_wav: bytes) -> None:
    registry.add(model_dir(TEXT_A, compute_ms=1500), "slow")
    with TestClient(create_app(make_settings(shadow_queue=1))) as c:
        assert _canary(c, version="slow", mode="shadow", percent=100, duration_s=600).status_code == 200
        results: list[int] = []

        def client(n: int) -> None:
            for i in range(12):
                results.append(_post(c, speech_wav, f"t{n}-{i}").status_code)

        threads = [threading.Thread(target=client, args=(n,)) for n in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [200] * 36
        shadow = _state(c)["comparison"].get("shadow") or {}
        metrics = c.get("/metrics").text
        dropped = [line for line in metrics.splitlines()
                   if line.startswith('voxswap_shadow_requests_total{model="sensevoice",outcome="dropped"}')]
        assert dropped and float(dropped[0].split()[-1]) > 0, dropped
        assert shadow.get("dropped", 1) > 0
        assert c.delete("/admin/model/canary", headers=AUTH).json()["state"] == "stopped"


@pytest.mark.parametrize("trusted", [True, False])
def test_behind_a_trusted_proxy_the_split_follows_the_forwarded_address(
        trusted: bool, make_settings: Callable[..., Settings], speech_wav: bytes) -> None:
    """Behind nginx every peer is nginx: only its X-Forwarded-For tells clients apart, and only a
    trusted proxy's is believed (anyone else could pick their side by sending one)."""
    settings = make_settings(trusted_proxies="127.0.0.1/32" if trusted else "")
    with serve_in_thread(create_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as http:
        assert http.post("/admin/model/canary", json={"version": "b", "percent": 50, "duration_s": 600},
                         headers=AUTH).status_code == 200
        versions = {}
        for i in range(40):
            got = {http.post("/api/transcribe", files={"file": ("c.wav", speech_wav, "audio/wav")},
                             headers={"X-Forwarded-For": f"10.0.{i}.1, 127.0.0.1"}).headers["x-model-version"]
                   for _ in range(2)}
            assert len(got) == 1
            versions[i] = got.pop()
        assert len(set(versions.values())) == (2 if trusted else 1)
        assert http.delete("/admin/model/canary", headers=AUTH).json()["state"] == "stopped"


def test_the_cli_starts_follows_and_stops_a_canary(make_settings: Callable[..., Settings], speech_wav: bytes,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from server.tools.cli import main as cli

    with serve_in_thread(create_app(make_settings())) as url:
        server = ["--server", url, "--token", AUTH["Authorization"].split()[1]]
        assert cli(["canary", "start", "--version", "b", "--percent", "50", "--duration", "600", *server]) == 0
        assert "canary of b on sensevoice: running" in capsys.readouterr().out
        assert cli(["canary", "status", "--json", *server]) == 0
        assert json.loads(capsys.readouterr().out)["state"] == "running"
        assert cli(["canary", "stop", *server]) == 0
        assert ": stopped" in capsys.readouterr().out
        assert cli(["canary", "stop", *server]) == 1  # nothing runs any more
        assert "already ended" in capsys.readouterr().err

        stop = threading.Event()

        def traffic() -> None:
            with httpx.Client(base_url=url, timeout=30) as http:
                i = 0
                while not stop.is_set():
                    http.post("/api/transcribe", files={"file": ("c.wav", speech_wav, "audio/wav")},
                              headers={"X-Canary-Key": f"k{i % 30}"})
                    i += 1

        thread = threading.Thread(target=traffic)
        thread.start()
        try:
            code = cli(["canary", "start", "--version", "b", "--percent", "50", "--duration", "2", "--on-pass",
                        "promote", "--min-requests", "5", "--wait", *server])
        finally:
            stop.set()
            thread.join()
        assert code == 0, capsys.readouterr()
        assert "promoted" in capsys.readouterr().out
        assert httpx.get(f"{url}/admin/model/versions", headers=AUTH).json()["current"] == "b"
