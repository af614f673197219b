"""The registry on disk: immutable versions, atomic pointer, append-only history, refusals."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.errors import Conflict, NotFound, RegistryError, UnexpectedCurrent, VerificationFailed
from server.settings import Settings
from server.storage.registry import Registry
from testkit.harness import wait_until
from tests.conftest import TEXT_A


def test_add_records_every_file_with_size_and_sha256(tmp_path: Path, model_dir: Callable[..., Path]) -> None:
    reg = Registry(tmp_path / "r")
    manifest = reg.add(model_dir(TEXT_A), "v1")
    paths = {f["path"] for f in manifest.files}
    assert {"model.onnx", "config.yaml", "am.mvn", "chn_jpn_yue_eng_ko_spectok.bpe.model",
            "smoke/clip.wav", "smoke/clip.txt"} <= paths
    assert all(len(f["sha256"]) == 64 and f["size"] > 0 for f in manifest.files)
    assert manifest.smoke[0].text == TEXT_A
    on_disk = json.loads((reg.versions_dir / "v1" / "manifest.json").read_text())
    assert on_disk["name"] == "v1" and on_disk["total_bytes"] == manifest.total_bytes
    assert not os.access(reg.versions_dir / "v1" / "model.onnx", os.W_OK) or os.geteuid() == 0
    assert oct((reg.versions_dir / "v1" / "model.onnx").stat().st_mode & 0o777) == "0o444"
    assert reg.history()[-1]["event"] == "add"


@pytest.mark.parametrize("name", ["..", ".", "a/b", "../escape", "", "x" * 65, "sp ace", "ünï"])
def test_hostile_or_invalid_names_are_refused(tmp_path: Path, model_dir: Callable[..., Path], name: str) -> None:
    reg = Registry(tmp_path / "r")
    with pytest.raises(RegistryError):
        reg.add(model_dir(TEXT_A), name)
    assert reg.versions() == []


def test_a_folder_missing_files_is_refused_before_anything_is_copied(tmp_path: Path) -> None:
    src = tmp_path / "half"
    src.mkdir()
    (src / "config.yaml").write_text("frontend_conf: {}\n")
    reg = Registry(tmp_path / "r")
    with pytest.raises(RegistryError, match=r"missing am\.mvn.*model_quant\.onnx or model\.onnx"):
        reg.add(src, "half")
    assert reg.versions() == []
    assert not reg.root.exists()  # refused before anything was created or copied


def test_a_crash_during_add_leaves_no_half_version(
    tmp_path: Path, model_dir: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = Registry(tmp_path / "r")
    calls = {"n": 0}
    import server.storage.registry as registry_module

    real = registry_module.sha256_file

    def dies_midway(path: Path) -> str:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as if the process were interrupted half way through checksums
        return real(path)

    monkeypatch.setattr(registry_module, "sha256_file", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        reg.add(model_dir(TEXT_A), "v1")
    assert not (reg.versions_dir / "v1").exists()
    assert list(reg.staging_dir.iterdir()) == []
    monkeypatch.setattr(registry_module, "sha256_file", real)
    assert reg.add(model_dir(TEXT_A), "v1").name == "v1"  # the name is free again


def test_versions_are_immutable_names(tmp_path: Path, model_dir: Callable[..., Path]) -> None:
    reg = Registry(tmp_path / "r")
    reg.add(model_dir(TEXT_A), "v1")
    with pytest.raises(Conflict, match="immutable"):
        reg.add(model_dir("other"), "v1")


def test_promote_and_rollback_move_current_and_previous(registry: Registry) -> None:
    s = registry.promote("b")
    assert (s.current, s.previous) == ("b", "a")
    assert registry.rollback_target() == "a"
    s2 = registry.promote("a", event="rollback")
    assert (s2.current, s2.previous, s2.generation) == ("a", "b", s.generation + 1)
    events = [(e["event"], e["version"]) for e in registry.history() if e["event"] in ("promote", "rollback")]
    assert events[-3:] == [("promote", "a"), ("promote", "b"), ("rollback", "a")]


def test_promote_is_compare_and_swap(registry: Registry) -> None:
    with pytest.raises(UnexpectedCurrent):
        registry.promote("b", expected_current="b")
    assert registry.state().current == "a"
    assert registry.promote("b", expected_current="a").current == "b"


def test_remove_refuses_current_and_previous(registry: Registry, model_dir: Callable[..., Path]) -> None:
    registry.promote("b")
    for name in ("a", "b"):
        with pytest.raises(Conflict):
            registry.remove(name)
    registry.add(model_dir("third"), "c")
    registry.remove("c")
    assert not (registry.versions_dir / "c").exists()
    with pytest.raises(NotFound):
        registry.remove("c")
    assert registry.history()[-1]["event"] == "remove"


def _waiting_for_the_lock(thread: threading.Thread, registry: Registry) -> bool:
    """``thread`` is in ``Registry.promote``, inside the file lock's acquire (which polls until free)."""
    codes = set()
    frame = sys._current_frames().get(thread.ident or 0)
    while frame is not None:
        codes.add(frame.f_code)
        frame = frame.f_back
    return {Registry.promote.__code__, type(registry.lock).acquire.__code__} <= codes


def test_a_promote_waiting_on_a_remove_of_its_version_refuses_instead_of_pointing_nowhere(
    registry: Registry,
) -> None:
    """``remove`` holds the lock while a ``promote`` of the same version waits for it: once the
    version is gone the promote must fail, never write a current version with no folder."""
    outcome: list[BaseException | str] = []

    def promote_b() -> None:
        try:
            outcome.append(registry.promote("b", actor="admin").current or "")
        except BaseException as exc:  # the test inspects what the thread saw
            outcome.append(exc)

    with registry.lock:  # what remove holds while it takes the folder away
        waiter = threading.Thread(target=promote_b)
        waiter.start()
        wait_until(lambda: _waiting_for_the_lock(waiter, registry), timeout_s=10,
                   message="promote to wait for the registry lock")
        assert not outcome, "promote must wait for the lock"
        registry.remove("b")
    waiter.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], NotFound), outcome
    assert registry.state().current == "a" and registry.version_dir("a").is_dir()


def test_verify_catches_a_changed_byte(registry: Registry) -> None:
    target = registry.version_dir("b") / "config.yaml"
    os.chmod(target, 0o644)
    target.write_text(target.read_text() + "#")
    with pytest.raises(VerificationFailed, match=r"config\.yaml"):
        registry.verify("b")
    assert registry.verify("a").name == "a"


def test_verify_after_a_first_pass_still_catches_a_same_size_edit_with_its_mtime_restored(
    registry: Registry,
) -> None:
    assert registry.verify("b").name == "b"  # hashed once: later checks may trust unchanged files
    target = registry.version_dir("b") / "model.onnx"
    before = target.stat()
    os.chmod(target, 0o644)
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    os.chmod(target, before.st_mode)
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert target.stat().st_size == before.st_size and target.stat().st_mtime_ns == before.st_mtime_ns
    with pytest.raises(VerificationFailed, match=r"model\.onnx fails its sha256"):
        registry.verify("b")


def test_revert_takes_a_refused_version_out_of_current(registry: Registry) -> None:
    registry.promote("b")
    state = registry.revert("b", to="a", reason="smoke failed")
    assert state.current == "a"
    last = registry.history()[-1]
    assert (last["event"], last["version"], last["to_version"]) == ("refused", "b", "a")


def _promote_many(root: str, name: str, n: int) -> None:
    reg = Registry(Path(root))
    for _ in range(n):
        reg.promote(name)


def test_concurrent_promoters_in_many_processes_never_lose_an_update(registry: Registry) -> None:
    before = registry.state().generation
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_promote_many, args=(str(registry.root), name, 15)) for name in ("a", "b", "a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    state = registry.state()
    assert state.generation == before + 60
    promotes = [e for e in registry.history() if e["event"] == "promote"]
    assert len(promotes) == 61  # the fixture's first promote + 60
    assert sorted(e["generation"] for e in promotes) == list(range(1, 62))
    json.loads(registry.state_path.read_text())  # never a torn file
    assert not [p for p in registry.root.iterdir() if p.name.endswith(".tmp")]


def test_a_starting_server_removes_what_crashed_adds_left_and_spares_a_running_one(
    registry: Registry, settings: Settings
) -> None:
    """A crash mid-add leaves a model-sized copy in ``.staging``; a start-up cleans it however recently
    it was written (here by an older release: no lock beside it), but never a folder that a running
    ``add`` owns, however old its copied modification time looks (tests/test_cleanup.py kills real
    adds)."""
    crashed = registry.staging_dir / "big.0123456789abcdef"
    (crashed / "sub").mkdir(parents=True)
    (crashed / "sub" / "model.onnx").write_bytes(b"\0" * 1024)
    (crashed / "sub" / "model.onnx").chmod(0o444)
    with registry.work_folder("other") as running:
        two_hours_ago = time.time() - 7200
        os.utime(running, (two_hours_ago, two_hours_ago))
        with TestClient(create_app(settings)) as client:
            assert client.get("/health/ready").status_code == 200
        assert not crashed.exists() and running.is_dir()
    assert not list(registry.staging_dir.iterdir())


@pytest.mark.parametrize("data_filter", [True, False], ids=["tarfile-data-filter", "python-before-3.11.4"])
def test_an_upload_unpacks_safely_with_or_without_tarfiles_data_filter(
    registry: Registry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_filter: bool
) -> None:
    """Debian 12's Python (3.11.2) has no ``filter="data"``: uploads must work there, and a path
    that leaves the upload must be refused there too."""
    if not data_filter:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    archive = registry.export_archive("b", tmp_path / "b.tar.gz")
    assert registry.add_archive(archive, "b2").name == "b2"
    assert registry.verify("b2").files == registry.verify("b").files

    evil = tmp_path / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        payload = b"not a model"
        member = tarfile.TarInfo("../escaped.txt")
        member.size = len(payload)
        tar.addfile(member, io.BytesIO(payload))
    with pytest.raises(RegistryError, match="leaves"):
        registry.add_archive(evil, "evil")
    assert not list(tmp_path.glob("**/escaped.txt"))
