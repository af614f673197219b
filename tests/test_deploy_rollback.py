"""deploy.sh's rollback against real servers in this process: what it restores stays restored."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from server.app import create_app
from server.settings import Settings
from server.storage.catalog import ModelCatalog
from server.storage.registry import Registry
from server.testing import synth
from server.vocab import ModelKind
from testkit.harness import LoadGenerator, serve_in_thread, wait_until
from tests.conftest import AUTH, TEXT_A, TEXT_B, TOKEN

DEPLOY = Path(__file__).resolve().parents[1] / "deploy.sh"


def _settings(reg: Registry) -> Settings:
    # an operator who turned the post-swap watch on for every swap, not only deploy's
    return Settings(registry=reg.root, admin_token=TOKEN, seed_demo=False, watch_interval_s=0.05,  # type: ignore[arg-type]
                    watch_seconds=3, watch_min_requests=5)


def _deploy(url: str, version: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(DEPLOY), "--instances", url, "--version", version, "--token", TOKEN, *extra],
                          capture_output=True, text=True, timeout=300)


def _models(url: str) -> dict[str, dict[str, Any]]:
    """Every named model of the instance at ``url`` by name, as GET /admin/models shows it."""
    return {m["name"]: m for m in httpx.get(f"{url}/admin/models", headers=AUTH).json()["models"]}


def _verdict(url: str) -> dict[str, Any] | None:
    """The last post-swap watch of the instance at ``url``, once it has ruled."""
    watch: dict[str, Any] | None = httpx.get(f"{url}/admin/model/watch", headers=AUTH).json()["watch"]
    return watch if watch is not None and watch["state"] != "watching" else None


def test_a_failed_deploy_restores_the_old_version_and_no_watch_undoes_it(
    tmp_path: Path, model_dir: Callable[..., Path]
) -> None:
    """The old version is much slower than the new one, so a watch started by the rollback itself
    would judge it worse and swap the new version back in after the deploy reported it restored."""
    first = Registry(tmp_path / "first").ensure()
    first.add(model_dir(TEXT_A, compute_ms=300), "old")
    first.add(model_dir(TEXT_B), "new")
    first.promote("old")
    second = Registry(tmp_path / "second").ensure()
    second.add(model_dir(TEXT_A), "old")
    broken = shutil.copytree(model_dir(TEXT_B), tmp_path / "broken")
    shutil.rmtree(broken / "smoke")
    golden = tmp_path / "golden.wav"
    golden.write_bytes(synth.wav_bytes(synth.speech_like(1.5, seed=4)))
    second.add(broken, "new", smoke=[(golden, "a sentence this model never says")])  # fails its smoke test
    second.promote("old")
    clip = synth.wav_bytes(synth.speech_like(1.0))
    with serve_in_thread(create_app(_settings(first))) as one, serve_in_thread(create_app(_settings(second))) as two, \
            LoadGenerator(one, clip, concurrency=2) as load:
        wait_until(lambda: load.count() >= 10, timeout_s=60, message="traffic on the first instance")
        done = subprocess.run([str(DEPLOY), "--instances", f"{one},{two}", "--version", "new", "--token", TOKEN,
                               "--watch-seconds", "1"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 1, done.stdout + done.stderr
        assert "smoke" in done.stdout and "rolled back to old" in done.stdout, done.stdout
        settled = load.count()
        wait_until(lambda: load.count() > settled + 5, timeout_s=60,
                   message="traffic on the restored version, enough for a watch to rule on")
        # a watch started by the rollback would still be watching, or would have swapped new back in
        watch = wait_until(lambda: _verdict(one), timeout_s=60, message="the last watch's verdict")
        status = httpx.get(f"{one}/api/system/status").json()
    assert watch["version"] == "new", watch  # deploy's own watch is the last one: the rollback started none
    assert (status["model_version"], first.state().current) == ("old", "old"), watch
    assert second.state().current == "old"
    assert load.failures() == []


def test_a_dry_run_says_when_the_real_run_could_not_upload(registry: Registry, settings: Settings) -> None:
    with serve_in_thread(create_app(settings)) as url:
        plan = subprocess.run([str(DEPLOY), "--instances", url, "--version", "b", "--token", TOKEN, "--dry-run"],
                              capture_output=True, text=True, timeout=120)
        assert plan.returncode == 0 and "live 'a' -> 'b': update" in plan.stdout, plan.stdout
        plan = subprocess.run([str(DEPLOY), "--instances", url, "--version", "nope", "--token", TOKEN,
                               "--dry-run"], capture_output=True, text=True, timeout=120)
        assert plan.returncode == 2 and "lack 'nope'; give --model-dir" in plan.stdout, plan.stdout
    assert registry.state().current == "a"


def test_a_failed_deploy_of_a_named_model_restores_that_model_and_leaves_the_default_alone(
    tmp_path: Path, model_dir: Callable[..., Path]
) -> None:
    registries, meetings = [], []
    for n in range(2):
        reg = Registry(tmp_path / f"registry{n}").ensure()
        reg.add(model_dir(TEXT_A), "a")
        reg.promote("a")
        meeting = ModelCatalog(reg.root).open_or_create("meeting", ModelKind.SENSEVOICE)
        meeting.add(model_dir("meeting one"), "m1")
        meeting.promote("m1")
        registries.append(reg)
        meetings.append(meeting)
    meetings[0].add(model_dir("meeting two"), "m2")
    broken = shutil.copytree(model_dir("meeting two"), tmp_path / "broken")
    shutil.rmtree(broken / "smoke")
    golden = tmp_path / "golden.wav"
    golden.write_bytes(synth.wav_bytes(synth.speech_like(1.5, seed=4)))
    meetings[1].add(broken, "m2", smoke=[(golden, "a sentence this model never says")])  # fails its smoke test
    with serve_in_thread(create_app(_settings(registries[0]))) as one, \
            serve_in_thread(create_app(_settings(registries[1]))) as two:
        plan = _deploy(f"{one},{two}", "m2", "--model", "meeting", "--dry-run")
        assert plan.returncode == 0 and "plan: model 'meeting': m2 to 2" in plan.stdout, plan.stdout
        assert plan.stdout.count("model 'meeting': live 'm1' -> 'm2': update") == 2, plan.stdout
        done = _deploy(f"{one},{two}", "m2", "--model", "meeting", "--watch-seconds", "0")
        assert done.returncode == 1, done.stdout + done.stderr
        assert f"[1/2] {one} model 'meeting': smoke transcription ok" in done.stdout, done.stdout
        assert f"FAILED: {two} model 'meeting': update answered" in done.stdout and "smoke" in done.stdout, \
            done.stdout
        assert f"rollback {one} model 'meeting': rolled back to m1" in done.stdout, done.stdout
        assert f"{one} model 'meeting': was m1, now m1" in done.stdout, done.stdout
        models = _models(one), _models(two)
    for reg, meeting, found in zip(registries, meetings, models, strict=True):
        assert (found["meeting"]["live_version"], meeting.state().current) == ("m1", "m1"), found["meeting"]
        assert (found["sensevoice"]["live_version"], reg.state().current, reg.state().generation) == ("a", "a", 1)


def test_deploying_a_named_model_an_instance_lacks_creates_it_there(
    registry: Registry, settings: Settings, model_dir: Callable[..., Path]
) -> None:
    with serve_in_thread(create_app(settings)) as url:
        plan = _deploy(url, "n1", "--model", "notes", "--dry-run")
        assert plan.returncode == 2 and "live None -> 'n1': upload (creates the model)" in plan.stdout, plan.stdout
        done = _deploy(url, "n1", "--model", "notes", "--model-dir", str(model_dir("take a note")),
                       "--watch-seconds", "0")
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"{url} model 'notes': uploading n1" in done.stdout, done.stdout
        assert f"{url} model 'notes': was None, now n1" in done.stdout, done.stdout
        found = _models(url)
        answer = httpx.post(f"{url}/api/transcribe", data={"model": "notes"},
                            files={"file": ("a.wav", synth.wav_bytes(synth.speech_like(1.0)))})
    assert (found["notes"]["live_version"], found["sensevoice"]["live_version"]) == ("n1", "a")
    assert answer.json()["text"] == "take a note"
    assert (registry.state().current, registry.state().generation) == ("a", 1)


def test_deploying_a_named_model_to_a_server_without_named_models_changes_nothing() -> None:
    with serve_in_thread(FastAPI()) as url:  # answers 404 to everything, as /admin/models on an older release
        done = _deploy(url, "n1", "--model", "notes")
    assert done.returncode == 2 and "serves no named models" in done.stdout, done.stdout


def _two_instances(tmp_path: Path, model_dir: Callable[..., Path], new_text: str) -> tuple[Registry, Registry]:
    registries = []
    for name in ("first", "second"):
        reg = Registry(tmp_path / name).ensure()
        reg.add(model_dir(TEXT_A), "old")
        reg.add(model_dir(new_text), "new")
        reg.promote("old")
        registries.append(reg)
    return registries[0], registries[1]


def test_deploy_with_a_canary_goes_on_only_after_the_first_instance_promoted_it(
    tmp_path: Path, model_dir: Callable[..., Path]
) -> None:
    first, second = _two_instances(tmp_path, model_dir, TEXT_B)
    clip = synth.wav_bytes(synth.speech_like(1.0))
    with serve_in_thread(create_app(_settings(first))) as one, serve_in_thread(create_app(_settings(second))) as two, \
            LoadGenerator(one, clip, concurrency=2, canary_keys=40) as load:
        done = subprocess.run([str(DEPLOY), "--instances", f"{one},{two}", "--version", "new", "--token", TOKEN,
                               "--watch-seconds", "0", "--canary", "50", "--canary-seconds", "3",
                               "--canary-min-requests", "5"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "canary of new on sensevoice: promoted" in done.stdout, done.stdout
    assert load.failures() == []
    assert {o.version for o in load.outcomes} == {"old", "new"}
    assert (first.state().current, second.state().current) == ("new", "new")
    assert [e["event"] for e in first.history()].count("canary_promoted") == 1


def test_deploy_stops_with_nothing_changed_when_the_canary_fails(
    tmp_path: Path, model_dir: Callable[..., Path]
) -> None:
    first, second = _two_instances(tmp_path, model_dir, "")  # the new version answers nothing
    clip = synth.wav_bytes(synth.speech_like(1.0))
    with serve_in_thread(create_app(_settings(first))) as one, serve_in_thread(create_app(_settings(second))) as two, \
            LoadGenerator(one, clip, concurrency=2, canary_keys=40) as load:
        done = subprocess.run([str(DEPLOY), "--instances", f"{one},{two}", "--version", "new", "--token", TOKEN,
                               "--canary", "50", "--canary-seconds", "60", "--canary-min-requests", "5"],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 1, done.stdout + done.stderr
        assert "the canary ended failed" in done.stdout and "empty transcripts" in done.stdout, done.stdout
    assert load.failures() == []
    assert (first.state().current, second.state().current) == ("old", "old")
    assert [e["event"] for e in second.history()].count("promote") == 1  # old's, before the deploy: no other
