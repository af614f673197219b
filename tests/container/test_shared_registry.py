"""One registry volume shared by two containers, as deploy/k8s/ shares one volume among its pods.

Each container has its own PID namespace, where the same small pids repeat, so the workers must
know each other by more than a pid; and deploy.sh must notice that the first update already moved
the second instance. Run with ``pytest -m container``.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

import httpx
import pytest

from testkit.harness import wait_until
from testkit.processes import free_port
from tests.container.engine import ROOT, TOKEN, Container, Engine, run_container

pytestmark = [pytest.mark.container, pytest.mark.e2e, pytest.mark.timeout(1800)]
ENV = {"VOXSWAP_ROLLOUT_TIMEOUT_S": "20", "VOXSWAP_SHUTDOWN_DELAY_S": "1", "VOXSWAP_HEARTBEAT_INTERVAL_S": "0.5",
       "VOXSWAP_WATCH_INTERVAL_S": "0.1"}


def two_on_one_registry(engine: Engine, image: str, models: Path, label: str,
                        extra: Sequence[str] = ()) -> list[Container]:
    registry = engine.volume(f"{label}-registry")
    pair = []
    for n in (1, 2):
        volumes = [f"{registry}:/registry", f"{engine.volume(f'{label}-data{n}')}:/data", f"{models}:/models:ro"]
        pair.append(run_container(engine, image, f"{label}{n}", free_port(), env=ENV, volumes=volumes, workers=2,
                                  extra=["--hostname", f"{label}{n}", *extra]))  # one host name each, as pods
    pair[0].exec("voxswap", "registry", "add", "/models/b", "--version", "b")
    return pair


def test_two_containers_on_one_registry_see_all_four_workers_and_update_together(
    engine: Engine, image: str, shared_models: Path
) -> None:
    pair = two_on_one_registry(engine, image, shared_models, "shared")
    try:
        # the shared board lists every worker of both containers (2 each), whichever one is asked
        wait_until(lambda: all(len(c.status()["workers"]) == 4 for c in pair), timeout_s=10,
                   message="both containers' workers on the shared board")
        r = httpx.post(f"{pair[0].url}/admin/model/update", json={"version": "b"},
                       headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120)
        assert r.status_code == 200, r.text
        assert [c.worker_versions() for c in pair] == [["b"] * 4, ["b"] * 4]
    finally:
        engine.remove(*(c.name for c in pair))


def test_deploy_sh_upgrades_two_containers_that_share_a_registry(
    engine: Engine, image: str, shared_models: Path
) -> None:
    pair = two_on_one_registry(engine, image, shared_models, "deploy")
    try:
        result = subprocess.run([str(ROOT / "deploy.sh"), "--instances", ",".join(c.url for c in pair),
                                 "--version", "b", "--token", TOKEN, "--timeout", "60", "--watch-seconds", "0"],
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        assert {v for c in pair for v in c.worker_versions()} == {"b"}
    finally:
        engine.remove(*(c.name for c in pair))
