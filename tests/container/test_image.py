"""The image, run for real: two containers behind the host's nginx, upgraded and stopped under load.

Each container has its own registry and job volumes (as instances on separate hosts, like
tests/e2e/test_deploy.py); test_shared_registry.py covers one registry shared by several.
Run with ``pytest -m container``.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.settings import Settings
from server.testing import synth
from testkit.harness import LoadGenerator, wait_until
from testkit.nginx import nginx_binary, run_nginx
from testkit.processes import free_port
from tests.container.engine import ROOT, TOKEN, Container, Engine, run_container

pytestmark = [pytest.mark.container, pytest.mark.e2e, pytest.mark.timeout(1800),
              pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed")]
UID = 10001  # the Dockerfile's USER
SHUTDOWN_DELAY_S, DRAIN_TIMEOUT_S = 2.0, 20.0
JOB_TEXT = "container model b"


@dataclass
class Fleet:
    instances: list[Container]
    lb: str
    job_id: str | None = None

    def deploy(self, version: str, *extra: str) -> subprocess.CompletedProcess[str]:
        args = [str(ROOT / "deploy.sh"), "--instances", ",".join(c.url for c in self.instances),
                "--version", version, "--token", TOKEN, "--watch-seconds", "3", "--timeout", "120", *extra]
        return subprocess.run(args, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def fleet(engine: Engine, image: str, shared_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    env = {"VOXSWAP_SHUTDOWN_DELAY_S": str(SHUTDOWN_DELAY_S), "VOXSWAP_DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S),
           "VOXSWAP_WATCH_INTERVAL_S": "0.1", "VOXSWAP_HEARTBEAT_INTERVAL_S": "0.5"}
    instances = []
    for n in (1, 2):
        volumes = [f"{engine.volume(f'registry{n}')}:/registry", f"{engine.volume(f'data{n}')}:/data",
                   f"{shared_models}:/models:ro"]
        instances.append(run_container(engine, image, f"fleet{n}", free_port(), env=env, volumes=volumes, workers=2))
    for container in instances:
        # the demo seeded itself; a and b arrive as an operator adds versions, and a (as slow as b, so
        # the deploy's watch compares like with like) is promoted from inside: the server follows
        for version in ("a", "b"):
            container.exec("voxswap", "registry", "add", f"/models/{version}", "--version", version)
        container.exec("voxswap", "registry", "promote", "a")
    wait_until(lambda: all(c.worker_versions() == ["a", "a"] for c in instances), timeout_s=60,
               message="a on every worker")
    with run_nginx(ROOT / "deploy" / "nginx.conf", [c.port for c in instances],
                   tmp_path_factory.mktemp("container-nginx")) as lb:
        yield Fleet(instances, lb)
    engine.remove(*(c.name for c in instances))


@pytest.fixture
def load(fleet: Fleet) -> Iterator[LoadGenerator]:
    with LoadGenerator(fleet.lb, synth.wav_bytes(synth.speech_like(1.0)), concurrency=3) as generator:
        wait_until(lambda: generator.count() >= 10, timeout_s=60, message="traffic through nginx")
        yield generator


def test_the_image_is_configured_from_the_environment_and_holds_no_model(engine: Engine, image: str) -> None:
    data = engine.inspect_image(image)
    config = data["Config"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert config["User"].split(":")[0] == str(UID)
    assert config["Entrypoint"] == ["voxswap"] and config["Cmd"] == ["serve"]  # no flag overrides a setting
    assert {"VOXSWAP_HOST": "0.0.0.0", "VOXSWAP_PORT": "7860", "VOXSWAP_REGISTRY": "/registry",
            "VOXSWAP_DATA_DIR": "/data"}.items() <= env.items()
    assert set(config["ExposedPorts"]) == {"7860/tcp"} and set(config["Volumes"]) == {"/registry", "/data"}
    assert config.get("StopSignal") == "SIGTERM"
    healthcheck = data.get("Healthcheck") or config.get("Healthcheck") or {}
    assert "/health/live" in " ".join(healthcheck.get("Test", []))
    empty = engine("run", "--rm", "--network=host", *engine.run_flags, "--entrypoint", "sh", image, "-c",
                   "ls -A /registry /data; find / -xdev \\( -name am.mvn -o -name '*spectok.bpe.model' \\) | head")
    assert empty.stdout.split() == ["/data:", "/registry:"], empty.stdout


def test_a_fresh_container_seeds_the_demo_runs_as_non_root_and_is_healthy(fleet: Fleet, engine: Engine) -> None:
    first = fleet.instances[0]
    history = first.exec("voxswap", "registry", "history").stdout
    assert "seed_demo" in history and "demo" in history, history
    assert first.exec("id", "-u").stdout.strip() == str(UID)
    uids = first.exec("sh", "-c", "grep -h ^Uid: /proc/[0-9]*/status").stdout.split()
    assert uids and {u for u in uids if u != "Uid:"} == {str(UID)}  # PID 1 (gunicorn), its workers, this shell
    assert "voxswap" in first.exec("cat", "/proc/1/cmdline").stdout  # voxswap is PID 1: signals reach it
    if engine.name == "podman":
        assert engine("healthcheck", "run", first.name, check=False).returncode == 0
    else:
        wait_until(lambda: first.state().get("Health", {}).get("Status") == "healthy", timeout_s=60,
                   message="docker to report the container healthy")


def test_deploy_sh_upgrades_both_containers_under_load_with_no_failed_request(
    fleet: Fleet, load: LoadGenerator
) -> None:
    result = fleet.deploy("b")
    assert result.returncode == 0, result.stdout + result.stderr
    assert [c.worker_versions() for c in fleet.instances] == [["b", "b"], ["b", "b"]]
    before = load.count()
    wait_until(lambda: load.count() >= before + 10, timeout_s=60, message="traffic after the deploy")
    assert load.failures() == []
    assert load.outcomes[-1].version == "b"


def test_a_batch_job_completes_in_a_container(fleet: Fleet) -> None:
    second = fleet.instances[1]
    clip = synth.wav_bytes(synth.speech_like(1.5, seed=5))
    r = httpx.post(f"{second.url}/api/jobs", files=[("files", ("call.wav", clip))], timeout=60)
    assert r.status_code == 202, r.text
    job_id = fleet.job_id = r.json()["jobs"][0]["id"]
    wait_until(lambda: _job(second, job_id)["status"] == "completed", timeout_s=90, message="the job")


def test_stopping_a_container_under_load_drains_it_exits_0_and_fails_no_request(
    fleet: Fleet, load: LoadGenerator
) -> None:
    victim = fleet.instances[1]
    code, elapsed = victim.stop(timeout_s=60)
    assert code == 0, victim.logs()
    assert elapsed < SHUTDOWN_DELAY_S + DRAIN_TIMEOUT_S, f"stop took {elapsed:.1f} s"
    assert elapsed >= SHUTDOWN_DELAY_S - 0.5  # it served on through the delay, readiness 503
    before = load.count()
    wait_until(lambda: load.count() >= before + 20, timeout_s=60, message="traffic after the container left")
    assert load.failures() == []


def test_a_container_restarted_on_its_volumes_serves_the_promoted_version_and_keeps_its_jobs(fleet: Fleet) -> None:
    victim = fleet.instances[1]
    victim.start()
    victim.wait_ready(workers=2)
    assert victim.worker_versions() == ["b", "b"]
    r = httpx.post(f"{victim.url}/api/transcribe", files={"file": ("a.wav", synth.wav_bytes(synth.speech_like(1.0)))},
                   timeout=60)
    assert r.status_code == 200 and r.headers["x-model-version"] == "b" and r.json()["text"] == JOB_TEXT
    assert fleet.job_id is not None, "test_a_batch_job_completes_in_a_container did not run"
    assert _job(victim, fleet.job_id)["status"] == "completed"
    result = httpx.get(f"{victim.url}/api/jobs/{fleet.job_id}/result", params={"format": "txt"}, timeout=10)
    assert result.status_code == 200 and result.text == JOB_TEXT + "\n"


def test_an_upload_through_the_admin_api_is_accepted(fleet: Fleet, shared_models: Path) -> None:
    """The image's Python may predate tarfile's filter="data" (Debian 12's 3.11.2): uploads work anyway."""
    first = fleet.instances[0]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(shared_models / "c", arcname="c")
    r = httpx.post(f"{first.url}/admin/model/versions", data={"version": "c"},
                   files={"file": ("c.tar.gz", buf.getvalue(), "application/gzip")},
                   headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120)
    assert r.status_code in (200, 201), r.text


def test_the_drain_settings_the_tests_use_are_settings(fleet: Fleet) -> None:
    """The names above are real settings: a renamed one would otherwise be ignored silently."""
    fields = set(Settings.model_fields)
    for container in fleet.instances:
        for key in container.env:
            assert key.startswith("VOXSWAP_") and key.removeprefix("VOXSWAP_").lower() in fields, key


def _job(container: Container, job_id: str) -> dict[str, Any]:
    data: dict[str, Any] = httpx.get(f"{container.url}/api/jobs/{job_id}", timeout=10).json()
    return data
