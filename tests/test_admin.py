"""Admin API: auth, updates, refusals of broken versions, rollback, unload/load, history."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.registry import Registry
from server.settings import Settings
from tests.conftest import AUTH, TEXT_A, TEXT_B


def transcribe(client: TestClient, wav: bytes) -> tuple[str, str]:
    r = client.post("/api/transcribe", files={"file": ("a.wav", wav)})
    assert r.status_code == 200, r.text
    return r.json()["text"], r.json()["model_version"]


def test_admin_is_closed_without_a_configured_token(make_settings: Callable[..., Settings]) -> None:
    with TestClient(create_app(make_settings(admin_token=None))) as c:
        r = c.get("/admin/model/versions", headers=AUTH)
        assert r.status_code == 403
        assert "VOXSWAP_ADMIN_TOKEN" in r.json()["error"]["message"]


def test_admin_rejects_missing_or_wrong_tokens(client: TestClient) -> None:
    assert client.get("/admin/model/versions").status_code == 401
    assert client.get("/admin/model/versions", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/admin/model/versions", headers={"Authorization": "Basic x"}).status_code == 401
    r = client.post("/admin/model/update", json={"version": "b"}, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    assert transcribe_version(client) == "a"  # nothing changed


def transcribe_version(client: TestClient) -> str:
    return client.get("/api/system/status").json()["model_version"]  # type: ignore[no-any-return]


def test_update_swaps_and_reports_timings_and_memory(client: TestClient, speech_wav: bytes) -> None:
    assert transcribe(client, speech_wav) == (TEXT_A, "a")
    r = client.post("/admin/model/update", json={"version": "b"}, headers=AUTH)
    assert r.status_code == 200, r.text
    report = r.json()
    assert report["outcome"] == "success" and report["from_version"] == "a"
    for phase in ("verify_s", "load_s", "smoke_s", "drain_s", "free_s", "time_to_flip_s", "total_s"):
        assert report["timings"][phase] >= 0
    assert report["memory"]["rss_before_free_bytes"] > 0 and "freed_bytes" in report["memory"]
    assert report["smoke"]["passed"] is True
    assert transcribe(client, speech_wav) == (TEXT_B, "b")
    versions = client.get("/admin/model/versions", headers=AUTH).json()
    assert (versions["current"], versions["previous"], versions["live"]) == ("b", "a", "b")
    events = [e["event"] for e in client.get("/admin/history", headers=AUTH).json()["events"]]
    assert events[-1] == "promote"
    assert 'voxswap_swaps_total{outcome="success"}' in client.get("/metrics").text


def test_unknown_version_is_404_and_expected_current_guards_updates(client: TestClient) -> None:
    r = client.post("/admin/model/update", json={"version": "zzz"}, headers=AUTH)
    assert r.status_code == 404
    r = client.post("/admin/model/update", json={"version": "b", "expected_current": "b"}, headers=AUTH)
    assert r.status_code == 409 and r.json()["error"]["code"] == "unexpected_current"
    r = client.post("/admin/model/update", json={"version": "b", "expected_current": "a"}, headers=AUTH)
    assert r.status_code == 200
    r = client.post("/admin/model/rollback", json={"expected_current": "a"}, headers=AUTH)
    assert r.status_code == 409  # live is b now: a retried rollback does nothing


def _refused(client: TestClient, registry: Registry, name: str, outcome: str, wav: bytes) -> None:
    r = client.post("/admin/model/update", json={"version": name}, headers=AUTH)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "swap_failed" and error["report"]["outcome"] == outcome
    assert name in error["message"]
    assert transcribe(client, wav) == (TEXT_A, "a")  # the old version never stopped serving
    state = registry.state()
    assert state.current == "a"
    last = registry.history()[-1]
    assert (last["event"], last["version"], last["outcome"]) == ("swap_failed", name, outcome)
    assert f'voxswap_swaps_total{{outcome="{outcome}"}} 1.0' in client.get("/metrics").text


def test_garbage_onnx_with_valid_checksums_fails_to_load_and_never_serves(
    client: TestClient, registry: Registry, model_dir: Callable[..., Path], tmp_path: Path, speech_wav: bytes
) -> None:
    src = tmp_path / "garbage"
    import shutil

    shutil.copytree(model_dir("garbage model"), src)
    (src / "model.onnx").write_bytes(b"\x08\x07this is not an onnx graph" * 100)
    registry.add(src, "garbage")  # checksums are computed over the garbage, so verify passes
    _refused(client, registry, "garbage", "load_failed", speech_wav)
    message = client.post("/admin/model/update", json={"version": "garbage"}, headers=AUTH).json()["error"]["message"]
    assert str(registry.root) not in message  # no server paths leak to clients


def test_files_corrupted_after_add_fail_verification(
    client: TestClient, registry: Registry, model_dir: Callable[..., Path], speech_wav: bytes
) -> None:
    registry.add(model_dir("corrupt me"), "corrupt")
    victim = registry.version_dir("corrupt") / "am.mvn"
    os.chmod(victim, 0o644)
    victim.write_text(victim.read_text().replace("<Rescale>", "<Rescale> "))
    _refused(client, registry, "corrupt", "verify_failed", speech_wav)


def test_a_version_failing_its_smoke_test_is_refused(
    client: TestClient, registry: Registry, model_dir: Callable[..., Path], tmp_path: Path, speech_wav: bytes
) -> None:
    wrong = tmp_path / "expected.wav"
    wrong.write_bytes(speech_wav)
    # a model that says "model c" but whose golden clip expects something else entirely
    import shutil

    src = tmp_path / "c"
    shutil.copytree(model_dir("model c is wrong"), src)
    shutil.rmtree(src / "smoke")
    registry.add(src, "c", smoke=[(wrong, "the quick brown fox jumps over the lazy dog")])
    _refused(client, registry, "c", "smoke_failed", speech_wav)
    report = client.post("/admin/model/update", json={"version": "c"}, headers=AUTH).json()["error"]["report"]
    assert report["smoke"]["clips"][0]["got"] == "model c is wrong"


def test_rollback_returns_to_the_previous_version(client: TestClient, speech_wav: bytes) -> None:
    assert client.post("/admin/model/rollback", headers=AUTH).status_code == 409  # no previous yet
    client.post("/admin/model/update", json={"version": "b"}, headers=AUTH)
    r = client.post("/admin/model/rollback", headers=AUTH)
    assert r.status_code == 200 and r.json()["version"] == "a" and r.json()["event"] == "rollback"
    assert transcribe(client, speech_wav) == (TEXT_A, "a")
    assert 'voxswap_swaps_total{outcome="rolled_back"} 1.0' in client.get("/metrics").text
    versions = client.get("/admin/model/versions", headers=AUTH).json()
    assert (versions["current"], versions["previous"]) == ("a", "b")


def test_unload_frees_the_model_and_load_brings_it_back(client: TestClient, speech_wav: bytes) -> None:
    r = client.post("/admin/model/unload", headers=AUTH)
    assert r.status_code == 200 and r.json()["unloaded"] == "a"
    health = client.get("/health")
    assert health.status_code == 503 and "unloaded by an operator" in health.json()["reason"]
    r = client.post("/api/transcribe", files={"file": ("a.wav", speech_wav)})
    assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready" and r.headers["retry-after"]
    status = client.get("/api/system/status").json()
    assert status["model_loaded"] is False and status["state"] == "not_loaded"
    assert "voxswap_model_loaded 0.0" in client.get("/metrics").text
    r = client.post("/admin/model/load", headers=AUTH)
    assert r.status_code == 200 and r.json()["version"] == "a"
    assert client.post("/admin/model/load", headers=AUTH).status_code == 409
    assert transcribe(client, speech_wav) == (TEXT_A, "a")


def test_reload_builds_the_same_version_afresh(client: TestClient, speech_wav: bytes) -> None:
    r = client.post("/admin/model/reload", headers=AUTH)
    assert r.status_code == 200 and r.json()["version"] == "a" and r.json()["from_version"] == "a"
    assert transcribe(client, speech_wav) == (TEXT_A, "a")


def test_upload_and_remove_versions(client: TestClient, registry: Registry, tmp_path: Path) -> None:
    archive = registry.export_archive("b", tmp_path / "b.tar.gz")
    r = client.post("/admin/model/versions", data={"version": "b2"},
                    files={"file": ("b.tar.gz", archive.read_bytes(), "application/gzip")}, headers=AUTH)
    assert r.status_code == 201, r.text
    assert registry.verify("b2").name == "b2"
    assert client.delete("/admin/model/versions/a", headers=AUTH).status_code == 409  # loaded
    assert client.delete("/admin/model/versions/b2", headers=AUTH).status_code == 200
    assert client.delete("/admin/model/versions/b2", headers=AUTH).status_code == 404


def test_upload_with_a_tampered_file_is_refused(client: TestClient, registry: Registry, tmp_path: Path) -> None:
    import io
    import tarfile

    src = registry.version_dir("b")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for path in sorted(src.rglob("*")):
            if path.name == "am.mvn":
                data = path.read_bytes().replace(b"0", b"1", 1)
                info = tarfile.TarInfo(f"b/{path.relative_to(src)}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.add(path, arcname=f"b/{path.relative_to(src)}", recursive=False)
    r = client.post("/admin/model/versions", data={"version": "tampered"},
                    files={"file": ("b.tar.gz", buf.getvalue())}, headers=AUTH)
    assert r.status_code == 422 and "checksum" in r.json()["error"]["message"]
    assert not (registry.versions_dir / "tampered").exists()


@pytest.mark.parametrize("name", ["..", "a/b", "x" * 65, "bad name"])
def test_update_with_a_hostile_version_name_is_refused(client: TestClient, name: str) -> None:
    r = client.post("/admin/model/update", json={"version": name}, headers=AUTH)
    assert r.status_code in (400, 404), r.text
    assert client.get("/api/system/status").json()["model_version"] == "a"
