"""Admin API: auth, updates, refusals of broken versions, rollback, unload/load, history."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.errors import RegistryError
from server.settings import Settings
from server.storage.registry import Registry
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
    assert 'voxswap_swaps_total{model="sensevoice",outcome="success"}' in client.get("/metrics").text


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
    assert f'voxswap_swaps_total{{model="sensevoice",outcome="{outcome}"}} 1.0' in client.get("/metrics").text


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
    assert 'voxswap_swaps_total{model="sensevoice",outcome="rolled_back"} 1.0' in client.get("/metrics").text
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
    assert 'voxswap_model_loaded{model="sensevoice"} 0.0' in client.get("/metrics").text
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
    assert len(registry.manifest("b2").smoke) == len(registry.manifest("b").smoke) == 1  # not doubled
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


def _tar(members: list[tuple[tarfile.TarInfo, bytes | None]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _version_with_manifest(registry: Registry, manifest: dict[str, Any]) -> bytes:
    """Version ``b``'s real files, with ``manifest`` sent in place of its own."""
    src = registry.version_dir("b")
    members = [_file(f"b/{p.relative_to(src)}", p.read_bytes()) for p in sorted(src.rglob("*"))
               if p.is_file() and p.name != "manifest.json"]
    return _tar([*members, _file("b/manifest.json", json.dumps(manifest).encode())])


def _link(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def test_hostile_or_broken_uploads_are_400_and_leave_nothing(client: TestClient, registry: Registry,
                                                             tmp_path: Path) -> None:
    """An upload must never make the server read, link or reveal its own files, and bad archives are
    the client's error, not a 500."""
    secret = tmp_path / "secret.wav"
    secret.write_bytes(b"the server's own file")
    good = registry.manifest("b").to_json()
    uploads = {
        "empty archive": _tar([]),
        "not a tar": b"\x1f\x8b not really gzip",
        "manifest is not JSON": _tar([_file("b/manifest.json", b"{not json")]),
        "manifest with a bad field": _version_with_manifest(registry, {**good, "created_at": "yesterday"}),
        "smoke clip outside the upload": _version_with_manifest(
            registry, {**good, "smoke": [{"audio": str(secret), "text": "leak"}]}),
        "checked file outside the upload": _version_with_manifest(
            registry, {**good, "files": [{"path": "../../../../etc/passwd", "size": 1, "sha256": "0" * 64}]}),
        "symlink member": _tar([_link("b/model.onnx", "/etc/passwd", tarfile.SYMTYPE)]),
        "hard link member": _tar([_link("b/model.onnx", "/etc/passwd", tarfile.LNKTYPE)]),
    }
    for what, payload in uploads.items():
        r = client.post("/admin/model/versions", data={"version": "upl"}, files={"file": ("v.tgz", payload)},
                        headers=AUTH)
        assert r.status_code == 400, (what, r.text)
        assert r.json()["error"]["message"], what
        assert not (registry.versions_dir / "upl").exists(), what
    assert not list(registry.staging_dir.iterdir())
    assert client.get("/api/system/status").json()["model_version"] == "a"


def test_a_smoke_clip_that_does_not_decode_is_refused_when_the_version_is_added(
    client: TestClient, registry: Registry, model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    bad_clip = tmp_path / "clip.wav"
    bad_clip.write_bytes(b"this is not audio at all" * 10)
    with pytest.raises(RegistryError, match=r"smoke clip given-0\.wav: the file is not audio"):
        registry.add(model_dir(TEXT_B), "badclip", smoke=[(bad_clip, TEXT_B)])
    assert not (registry.versions_dir / "badclip").exists() and not list(registry.staging_dir.iterdir())
    assert client.post("/admin/model/update", json={"version": "badclip"}, headers=AUTH).status_code == 404


def test_a_current_version_that_vanished_from_disk_is_reverted_not_served(
    settings: Settings, registry: Registry, speech_wav: bytes
) -> None:
    """Someone deleted the promoted version's folder by hand while the server was down: it starts
    on the previous version, takes the missing one out of ``current`` and is ready."""
    registry.promote("b")
    doomed = registry.versions_dir / "b"
    for path in [doomed, *doomed.rglob("*")]:
        path.chmod(0o755)
    shutil.rmtree(doomed)
    with TestClient(create_app(settings)) as c:
        assert (registry.state().current, registry.state().previous) == ("a", None)
        refused = registry.history()[-1]
        assert (refused["event"], refused["version"], refused["to_version"]) == ("refused", "b", "a")
        assert "no version 'b'" in refused["reason"]
        assert c.get("/health/ready").status_code == 200
        assert transcribe(c, speech_wav) == (TEXT_A, "a")
