"""deploy.sh rolling upgrades of three gunicorn instances behind a real nginx, under steady load.

Run alone with ``pytest -m deploy``.
"""

from __future__ import annotations

import re
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.storage.catalog import ModelCatalog
from server.storage.registry import Registry
from server.testing import synth
from server.vocab import ModelKind
from testkit.harness import LoadGenerator, wait_until
from testkit.nginx import nginx_binary, run_nginx
from testkit.processes import ServerProcess, start_server

pytestmark = [pytest.mark.e2e, pytest.mark.deploy, pytest.mark.long,
              pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed")]
ROOT = Path(__file__).resolve().parents[2]
TEXT = {"a": "fleet model a", "b": "fleet model b", "m1": "meeting one", "m2": "meeting two"}


@dataclass
class Fleet:
    instances: list[ServerProcess]
    lb: str
    models: dict[str, Path]

    def deploy(self, version: str, *extra: str, watch: float = 3.0) -> subprocess.CompletedProcess[str]:
        args = [str(ROOT / "deploy.sh"), "--instances", ",".join(i.url for i in self.instances), "--version", version,
                "--model-dir", str(self.models[version]), "--token", self.instances[0].token,
                "--watch-seconds", str(watch), "--timeout", "120", *extra]
        return subprocess.run(args, capture_output=True, text=True, timeout=600)

    def worker_versions(self) -> list[str | None]:
        return [v for i in self.instances if i.proc.poll() is None for v in i.worker_versions().values()]

    def named_models(self) -> list[dict[str, dict[str, Any]]]:
        """Each instance's named models by name, as its /api/system/status shows them."""
        return [{m["name"]: m for m in i.status()["models"]} for i in self.instances]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, model_dir: Callable[..., Path]) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("fleet")
    models = {"a": model_dir(TEXT["a"], compute_ms=10), "b": model_dir(TEXT["b"], compute_ms=10),
              "mute": model_dir("", compute_ms=10),  # passes its smoke test, then answers speech with nothing
              "m1": model_dir(TEXT["m1"], compute_ms=10), "m2": model_dir(TEXT["m2"], compute_ms=10)}
    instances = []
    try:
        for n in range(3):
            registry = Registry(root / f"registry{n}").ensure()
            registry.add(models["a"], "a")
            registry.promote("a")
            meeting = ModelCatalog(registry.root).open_or_create("meeting", ModelKind.SENSEVOICE)  # a second model
            meeting.add(models["m1"], "m1")
            meeting.promote("m1")
            instances.append(start_server(registry.root, root / f"instance{n}", workers=2,
                                          env={"VOXSWAP_SHUTDOWN_DELAY_S": "2"}))
        with run_nginx(ROOT / "deploy" / "nginx.conf", [i.port for i in instances], root / "nginx") as lb:
            yield Fleet(instances, lb, models)
    finally:
        for instance in instances:
            instance.stop()


@pytest.fixture
def load(fleet: Fleet) -> Iterator[LoadGenerator]:
    with LoadGenerator(fleet.lb, synth.wav_bytes(synth.speech_like(1.0)), concurrency=3) as generator:
        wait_until(lambda: generator.count() >= 10, message="traffic through nginx")
        yield generator


def test_1_deploy_uploads_and_rolls_a_good_version_to_every_worker_with_no_failed_request(
    fleet: Fleet, load: LoadGenerator
) -> None:
    result = fleet.deploy("b")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "uploading b" in result.stdout and "watch passed" in result.stdout
    assert fleet.worker_versions() == ["b"] * 6
    before = load.count()
    wait_until(lambda: load.count() >= before + 10, message="traffic after the deploy")
    assert load.failures() == []
    assert load.outcomes[-1].version == "b" and load.outcomes[-1].text == TEXT["b"]


def test_2_rerunning_the_same_deploy_changes_nothing(fleet: Fleet) -> None:
    dry = fleet.deploy("b", "--dry-run")
    assert dry.returncode == 0 and dry.stdout.count("already on it, skip") == 3
    result = fleet.deploy("b")
    assert result.returncode == 0 and result.stdout.count("already serves b") == 3
    assert fleet.worker_versions() == ["b"] * 6


def test_3_a_version_the_watch_finds_bad_is_rolled_back_everywhere(fleet: Fleet, load: LoadGenerator) -> None:
    result = fleet.deploy("mute", watch=10)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "watch rolled_back" in result.stdout and "empty transcripts" in result.stdout
    assert fleet.worker_versions() == ["b"] * 6  # the first instance rolled itself back; none other moved
    assert "[2/3]" not in result.stdout
    assert load.failures() == []


def test_4_a_batch_job_submitted_through_nginx_is_followed_to_its_result_through_nginx(fleet: Fleet) -> None:
    """Each instance keeps its jobs in its own data dir: without routing a client's job calls to
    one instance, two polls in three would reach an instance that never heard of the job."""
    clip = synth.wav_bytes(synth.speech_like(1.5, seed=5))
    r = httpx.post(f"{fleet.lb}/api/jobs", files=[("files", ("call.wav", clip))], timeout=60)
    assert r.status_code == 202, r.text
    job_id = r.json()["jobs"][0]["id"]
    polls: list[int] = []

    def completed() -> bool:
        answer = httpx.get(f"{fleet.lb}/api/jobs/{job_id}", timeout=10)
        polls.append(answer.status_code)
        return answer.status_code == 200 and answer.json()["status"] == "completed"

    wait_until(completed, timeout_s=60, interval_s=0.05, message="the job to complete")
    for _ in range(6):
        result = httpx.get(f"{fleet.lb}/api/jobs/{job_id}/result", params={"format": "txt"}, timeout=10)
        polls.append(result.status_code)
        assert result.text == TEXT["b"] + "\n"
    assert set(polls) == {200} and len(polls) >= 7


def test_5_deploy_with_model_moves_that_model_on_every_instance_and_leaves_the_default_alone(
    fleet: Fleet, load: LoadGenerator
) -> None:
    before, default_workers = fleet.named_models(), fleet.worker_versions()
    assert [m["meeting"]["live_version"] for m in before] == ["m1"] * 3
    with LoadGenerator(fleet.lb, synth.wav_bytes(synth.speech_like(1.0, seed=3)), concurrency=2,
                       form={"model": "meeting"}) as meeting_load:  # traffic for the watch of each instance
        wait_until(lambda: meeting_load.count() >= 10, message="traffic to the meeting model through nginx")
        result = fleet.deploy("m2", "--model", "meeting")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "plan: model 'meeting': m2 to 3" in out and out.count("model 'meeting': uploading m2") == 3, out
    assert len(re.findall(r"model 'meeting': watch (passed|inconclusive)", out)) == 3, out  # its own watch
    for was, now in zip(before, fleet.named_models(), strict=True):
        meeting, default = now["meeting"], now["sensevoice"]
        assert meeting["live_version"] == meeting["registry_current"] == "m2", meeting
        assert [w["version"] for w in meeting["workers"]] == ["m2"] * 2, meeting["workers"]
        untouched = ("live_version", "registry_current", "registry_generation")  # not even a swap to itself
        assert [default[k] for k in untouched] == [was["sensevoice"][k] for k in untouched], default
    assert fleet.worker_versions() == default_workers  # the default model's workers
    for _ in range(6):  # through nginx, so every instance is asked
        r = httpx.post(f"{fleet.lb}/api/transcribe", data={"model": "meeting"},
                       files={"file": ("a.wav", synth.wav_bytes(synth.speech_like(1.0)))}, timeout=30)
        assert (r.headers["x-model"], r.headers["x-model-version"], r.json()["text"]) == ("meeting", "m2", TEXT["m2"])
    assert load.failures() == [] and load.outcomes[-1].version == before[0]["sensevoice"]["live_version"]
    assert meeting_load.failures() == [] and {o.version for o in meeting_load.outcomes} == {"m1", "m2"}
    assert meeting_load.outcomes[-1].text == TEXT["m2"]


def test_6_sigterm_of_one_instance_under_load_fails_no_request_through_nginx(
    fleet: Fleet, load: LoadGenerator
) -> None:
    victim = fleet.instances[2]
    victim.proc.send_signal(signal.SIGTERM)
    assert victim.proc.wait(90) == 0
    before = load.count()
    wait_until(lambda: load.count() >= before + 20, message="traffic after the instance left")
    assert load.failures() == []
