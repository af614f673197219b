"""deploy/compose.yaml: valid Compose, and its voxswap instances serving behind deploy/nginx.conf.

The file is checked with ``docker-compose config`` (Debian's docker-compose, which validates against
the Compose schema without a daemon; Debian's podman-compose 1.0.3 has no ``config`` command). Its
voxswap services are started from their definitions with the engine directly: podman-compose 1.0.3
adds a project network to ``network_mode: host`` services, which podman refuses. Run with
``pytest -m container``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from server.testing import synth
from testkit.nginx import nginx_binary, run_nginx
from tests.container.engine import ROOT, TOKEN, Container, Engine, run_container

pytestmark = [pytest.mark.container, pytest.mark.e2e, pytest.mark.timeout(1800)]
COMPOSE = ROOT / "deploy" / "compose.yaml"
DEMO_TEXT = "this is the voxswap demo model not real speech recognition"


def docker_compose(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (scripts/install-container-deps.sh installs it)")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("VOXSWAP_")}
    return subprocess.run([binary, "-f", str(COMPOSE), *args], capture_output=True, text=True, timeout=120,
                          env={**clean, **env})


def test_the_compose_file_is_valid_and_insists_on_an_admin_token() -> None:
    ok = docker_compose("config", env={"VOXSWAP_ADMIN_TOKEN": TOKEN})
    assert ok.returncode == 0, ok.stderr
    resolved = yaml.safe_load(ok.stdout)["services"]
    assert {"nginx", "prometheus", "grafana"} <= set(resolved)
    assert resolved["voxswap-1"]["environment"]["VOXSWAP_ADMIN_TOKEN"] == TOKEN
    missing = docker_compose("config", "-q", env={})
    assert missing.returncode != 0 and "VOXSWAP_ADMIN_TOKEN" in missing.stderr


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture
def compose_instances(engine: Engine, image: str) -> Iterator[list[Container]]:
    services: dict[str, dict[str, Any]] = yaml.safe_load(COMPOSE.read_text())["services"]
    wanted = {name: s for name, s in services.items() if str(s.get("image", "")).startswith("${VOXSWAP_IMAGE")}
    ports = [int(s["environment"]["VOXSWAP_PORT"]) for s in wanted.values()]
    busy = [p for p in ports if not port_free(p)]
    if busy:
        pytest.skip(f"the compose file's ports {busy} are taken on this machine")
    started: list[Container] = []
    try:
        for name, service in wanted.items():
            assert service["network_mode"] == "host"
            env = {k: str(v) for k, v in service["environment"].items()}
            env["VOXSWAP_ADMIN_TOKEN"] = TOKEN
            volumes = []
            for volume in service["volumes"]:  # named volumes only, "name:/path"
                source, target = volume.split(":", 1)
                volumes.append(f"{engine.volume(f'compose-{source}')}:{target}")
            grace = service["stop_grace_period"].removesuffix("s")
            started.append(run_container(engine, image, f"compose-{name}", int(env["VOXSWAP_PORT"]), env=env,
                                         volumes=volumes, extra=["--stop-timeout", grace], wait=False))
        for container in started:
            container.wait_ready()
        yield started
    finally:
        engine.remove(*(c.name for c in started))


@pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed")
def test_the_compose_instances_serve_behind_deploy_nginx_conf(compose_instances: list[Container],
                                                              tmp_path: Path) -> None:
    ports = [c.port for c in compose_instances]
    with run_nginx(ROOT / "deploy" / "nginx.conf", ports, tmp_path / "nginx") as lb:
        clip = synth.wav_bytes(synth.speech_like(1.0))
        answers = [httpx.post(f"{lb}/api/transcribe", files={"file": ("a.wav", clip)}, timeout=60)
                   for _ in range(2 * len(ports))]
    assert [a.status_code for a in answers] == [200] * len(answers)
    assert {a.json()["text"] for a in answers} == {DEMO_TEXT}  # each instance seeded its own demo
    for container in compose_instances:
        assert container.status()["model_version"] == "demo"
