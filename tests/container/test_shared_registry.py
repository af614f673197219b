"""One registry volume shared by two containers, as deploy/k8s/ shares one volume among its pods.

Both tests fail today for reasons in server code, named in their markers. The markers are strict:
when a fix lands the test passes, pytest reports it as a failure (XPASS), and the marker goes.
Run with ``pytest -m container``.
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


@pytest.mark.xfail(strict=True, reason=(
    "server/lifecycle/board.py knows a worker by its pid alone (workers/<pid>.json, peers, the rollout's "
    "coordinator_pid, sweep, stale): every container or pod has its own PID namespace, so their gunicorn "
    "workers get the same small pids and overwrite each other's heartbeats; a follower may take another's "
    "coordinator for itself or judge it dead (rollout_abandoned), and a worker's 'staged' can stand in for "
    "its namesake's. Updates then succeed or time out by chance. deploy/k8s/ (pods on one registry) is affected."))
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


@pytest.mark.xfail(strict=True, reason=(
    "server/tools/deploy.py reads each instance's live version once, before it starts: on a shared registry "
    "the first update moves every instance, the second is sent expected_current=<the old version> and "
    "answers 409, and the deploy rolls everything back"))
def test_deploy_sh_upgrades_two_containers_that_share_a_registry(
    engine: Engine, image: str, shared_models: Path
) -> None:
    # one PID namespace (the host's) for both, so that the test above does not fail this one first
    pair = two_on_one_registry(engine, image, shared_models, "hostpid", extra=["--pid=host"])
    try:
        result = subprocess.run([str(ROOT / "deploy.sh"), "--instances", ",".join(c.url for c in pair),
                                 "--version", "b", "--token", TOKEN, "--timeout", "60", "--watch-seconds", "0"],
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        assert {v for c in pair for v in c.worker_versions()} == {"b"}
    finally:
        engine.remove(*(c.name for c in pair))
