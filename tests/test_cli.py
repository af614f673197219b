"""The voxswap CLI, and a running server following what the CLI does to the registry."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
from fastapi import FastAPI

from server.app import create_app
from server.settings import Settings
from server.storage.registry import Registry
from server.testing import synth
from testkit.harness import post_clip, serve_in_thread, wait_until
from tests.conftest import TEXT_A, TEXT_B

VOXSWAP = [sys.executable, "-m", "server.tools.cli"]


def cli(*args: str, registry: Path | None = None) -> subprocess.CompletedProcess[str]:
    extra = ["--registry", str(registry)] if registry else []
    return subprocess.run([*VOXSWAP, *args, *extra], capture_output=True, text=True, timeout=120)


def test_make_test_model_then_add_list_show_verify(tmp_path: Path) -> None:
    out = tmp_path / "m"
    r = cli("make-test-model", str(out), "--text", "cli made this", "--emotion", "SAD")
    assert r.returncode == 0, r.stderr
    assert "not real ASR" in r.stdout
    reg = tmp_path / "reg"
    r = cli("registry", "add", str(out), "--version", "v1", registry=reg)
    assert r.returncode == 0 and "1 smoke clip" in r.stdout, r.stderr
    r = cli("registry", "list", "--json", registry=reg)
    listing = json.loads(r.stdout)
    assert [v["name"] for v in listing["versions"]] == ["v1"] and listing["state"]["current"] is None
    assert json.loads(cli("registry", "show", "v1", registry=reg).stdout)["smoke"][0]["text"] == "cli made this"
    assert cli("registry", "verify", "v1", registry=reg).returncode == 0
    assert cli("make-test-model", str(tmp_path / "x"), "--text", "t", "--emotion", "BORED").returncode == 2


def test_cli_refuses_to_promote_a_version_that_fails_its_smoke_test(
    registry: Registry, model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    src = tmp_path / "liar"
    shutil.copytree(model_dir("i say one thing"), src)
    (src / "smoke" / "clip.txt").write_text("but my golden clip says another\n")
    registry.add(src, "liar")
    r = cli("registry", "promote", "liar", registry=registry.root)
    assert r.returncode == 1 and "smoke test" in r.stderr
    assert registry.state().current == "a"
    assert registry.history()[-1]["event"] == "swap_failed"


def test_remove_via_cli_refuses_current(registry: Registry) -> None:
    r = cli("registry", "remove", "a", registry=registry.root)
    assert r.returncode == 1 and "current" in r.stderr


def _server(settings: Settings) -> tuple[FastAPI, Callable[[], str | None]]:
    app = create_app(settings)
    return app, lambda: app.state.ctx.lifecycle.live_version


def test_a_running_server_follows_a_cli_promote_and_rollback(settings: Settings, registry: Registry) -> None:
    clip = synth.wav_bytes(synth.speech_like(1.2))
    app, live = _server(settings)
    with serve_in_thread(app) as url, httpx.Client(base_url=url) as c:
        assert post_clip(c, "/api/transcribe", clip).text == TEXT_A
        r = cli("registry", "promote", "b", registry=registry.root)
        assert r.returncode == 0, r.stderr
        wait_until(lambda: live() == "b", timeout_s=10, message="server to follow the promote")
        outcome = post_clip(c, "/api/transcribe", clip)
        assert (outcome.text, outcome.version) == (TEXT_B, "b")
        assert cli("registry", "rollback", registry=registry.root).returncode == 0
        wait_until(lambda: live() == "a", timeout_s=10, message="server to follow the rollback")
        assert post_clip(c, "/api/transcribe", clip).version == "a"


def test_a_version_the_server_refuses_is_taken_back_out_of_current(
    settings: Settings, registry: Registry, model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    src = tmp_path / "garbage"
    shutil.copytree(model_dir("garbage"), src)
    (src / "model.onnx").write_bytes(b"not onnx")
    registry.add(src, "garbage")
    app, live = _server(settings)
    with serve_in_thread(app) as url:
        registry.promote("garbage", actor="someone-without-the-cli")  # skips the CLI's smoke test
        refused = wait_until(lambda: [e for e in registry.history() if e["event"] == "refused"],
                             timeout_s=10, message="the server to refuse the version")
        assert refused[-1]["version"] == "garbage" and "failed to load" in refused[-1]["reason"]
        state = registry.state()
        assert state.current == "a" and live() == "a"
        assert httpx.get(f"{url}/health").status_code == 200
    # and a restart loads the good version, never the refused one
    app2, live2 = _server(settings)
    with serve_in_thread(app2):
        assert live2() == "a"


def test_start_up_with_a_broken_current_falls_back_to_previous(
    make_settings: Callable[..., Settings], registry: Registry
) -> None:
    registry.promote("b")
    victim = registry.version_dir("b") / "model.onnx"
    victim.chmod(0o644)
    victim.write_bytes(b"broken after promotion")
    app, live = _server(make_settings())
    with serve_in_thread(app) as url:
        assert live() == "a"
        assert httpx.get(f"{url}/health").json()["model_version"] == "a"
    assert registry.state().current == "a"
    assert registry.history()[-1]["event"] == "refused"


def test_bad_input_gets_a_one_line_error_not_a_traceback(tmp_path: Path, registry: Registry) -> None:
    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a registry")
    (registry.root / "state.json").chmod(0o644)
    cases = [
        (["serve", "--port", "99999"], 2, "port: Input should be less than or equal to 65535"),
        (["serve", "--registry", str(a_file)], 1, "Not a directory"),
        (["serve", "--log-level", "LOUD", "--registry", str(tmp_path / "r")], 1, "Unknown level: 'LOUD'"),
        (["registry", "list", "--registry", str(a_file)], 1, "Not a directory"),
        (["registry", "export", "a", str(tmp_path / "missing" / "a.tgz"), "--registry", str(registry.root)], 1,
         "No such file or directory"),
        (["make-test-model", str(a_file / "m"), "--text", "hi"], 1, "Not a directory"),
    ]
    for args, status, message in cases:
        r = subprocess.run([*VOXSWAP, *args], capture_output=True, text=True, timeout=60)
        assert (r.returncode, "Traceback" in r.stderr) == (status, False), (args, r.stderr)
        assert r.stderr.startswith("error: ") and message in r.stderr, (args, r.stderr)
    (registry.root / "state.json").write_text("{damaged")
    r = cli("registry", "list", registry=registry.root)
    assert r.returncode == 1 and "JSONDecodeError" in r.stderr and "Traceback" not in r.stderr
