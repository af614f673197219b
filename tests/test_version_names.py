"""A new version's name starts with a letter or digit (issue 18: ``.x`` and ``-x`` were accepted).

A name like ``.x`` hides from ``ls`` and ``-x`` reads as an option on every command line that names
it. New names are refused with a clear 400 (CLI: one line), before anything is copied; a registry
that already holds such a name, from an older release, still loads and serves it.
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.errors import RegistryError
from server.settings import Settings
from server.storage.registry import Registry
from tests.conftest import AUTH, TEXT_A, TEXT_B

REFUSED = [".hidden", "-rf", "..x", "-", ".", "_x"]


@pytest.mark.parametrize("name", REFUSED)
def test_a_name_not_starting_with_a_letter_or_digit_is_refused_at_add(
    registry: Registry, model_dir: Callable[..., Path], name: str
) -> None:
    with pytest.raises(RegistryError, match="start with a letter or digit") as refused:
        registry.add(model_dir(TEXT_B), name)
    assert refused.value.status_code == 400 and refused.value.param == "version"
    assert sorted(p.name for p in registry.versions_dir.iterdir()) == ["a", "b"]
    assert not list(registry.staging_dir.iterdir())


def test_the_cli_says_why_in_one_line(registry: Registry, model_dir: Callable[..., Path]) -> None:
    r = subprocess.run([sys.executable, "-m", "server", "registry", "add", str(model_dir(TEXT_B)),
                        "--version=-rf", "--registry", str(registry.root)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert r.stderr.splitlines() == ["error: invalid version name '-rf': start with a letter or digit, "
                                     "then up to 63 of A-Z a-z 0-9 . _ -"]
    assert not (registry.versions_dir / "-rf").exists()


def test_an_upload_with_such_a_name_gets_a_400_and_nothing_is_kept(client: TestClient, registry: Registry,
                                                                     tmp_path: Path) -> None:
    archive = registry.export_archive("b", tmp_path / "b.tar.gz").read_bytes()
    for name in (".hidden", "-rf"):
        r = client.post("/admin/model/versions", data={"version": name},
                        files={"file": ("b.tar.gz", archive)}, headers=AUTH)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "version" and "start with a letter or digit" in error["message"]
    assert sorted(v["name"] for v in client.get("/admin/model/versions", headers=AUTH).json()["versions"]) == ["a", "b"]
    assert not list(registry.staging_dir.iterdir())
    r = client.post("/admin/model/versions", data={"version": "9-lives.v2_b"},
                    files={"file": ("b.tar.gz", archive)}, headers=AUTH)
    assert r.status_code == 201, r.text  # digits, dots, dashes and underscores after the first


def legacy_version(registry: Registry, src: Path, name: str) -> None:
    """A version as an older release added it under a name that is refused today."""
    registry.add(src, "legacy")
    folder = registry.versions_dir / name
    (registry.versions_dir / "legacy").rename(folder)
    manifest = folder / "manifest.json"
    manifest.chmod(stat.S_IRUSR | stat.S_IWUSR)
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "name": name}))
    manifest.chmod(stat.S_IRUSR)


def test_a_registry_that_holds_such_names_still_loads_and_serves_them(
    registry: Registry, make_settings: Callable[..., Settings], model_dir: Callable[..., Path], speech_wav: bytes
) -> None:
    legacy_version(registry, model_dir(TEXT_A), ".old")
    legacy_version(registry, model_dir(TEXT_B), "-older")
    registry.promote("-older")
    with TestClient(create_app(make_settings())) as client:
        assert client.get("/api/system/status").json()["model_version"] == "-older"
        r = client.post("/api/transcribe", files={"file": ("a.wav", speech_wav)},
                        headers={"X-Model-Version": "-older"})
        assert r.status_code == 200 and r.json()["text"] == TEXT_B
        r = client.post("/admin/model/update", json={"version": ".old"}, headers=AUTH)
        assert r.status_code == 200, r.text
        assert {m["id"] for m in client.get("/v1/models").json()["data"]} == {
            "sensevoice", "sensevoice@.old", "a", "b", ".old", "-older"}
    assert registry.verify(".old").name == ".old"

