"""docker or podman, and voxswap containers run with it on the host's network."""

from __future__ import annotations

import json
import shlex
import subprocess
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from testkit.harness import wait_until

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "scripts" / "build-image.sh"
TOKEN = "container-admin-token"


@dataclass
class Engine:
    """docker or podman, with the global flags and the ``run`` flags this machine needs."""

    command: list[str]
    run_flags: list[str]
    created: list[tuple[str, str]] = field(default_factory=list)  # ("container" | "volume", name)
    prefix: str = field(default_factory=lambda: f"vxt-{uuid.uuid4().hex[:6]}")

    @property
    def name(self) -> str:
        return Path(self.command[0]).name

    def __call__(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*self.command, *args], capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{self.name} {shlex.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}")
        return result

    @property
    def kill_now(self) -> list[str]:
        return ["-t", "0"] if self.name == "podman" else []  # docker rm -f kills at once anyway

    def volume(self, label: str) -> str:
        name = f"{self.prefix}-{label}"
        self("volume", "create", name)
        self.created.append(("volume", name))
        return name

    def inspect_image(self, image: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self("image", "inspect", image).stdout)[0]
        return data

    def remove(self, *names: str) -> None:
        for name in names:
            self("rm", "-f", "-v", *self.kill_now, name, check=False)
            self.created = [c for c in self.created if c[1] != name]

    def cleanup(self) -> None:
        for kind, name in reversed(self.created):
            if kind == "container":
                self("rm", "-f", "-v", *self.kill_now, name, check=False)
            else:
                self("volume", "rm", "-f", name, check=False)
        self.created.clear()


@dataclass
class Container:
    """One voxswap container on the host's network, listening on its own loopback port."""

    engine: Engine
    name: str
    port: int
    env: dict[str, str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def exec(self, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.engine("exec", self.name, *command, check=check)

    def start(self) -> None:
        self.engine("start", self.name)

    def stop(self, timeout_s: int = 60) -> tuple[int, float]:
        """``docker stop``/``podman stop``: the exit code and how long the stop took."""
        started = time.monotonic()
        self.engine("stop", "-t", str(timeout_s), self.name, timeout=timeout_s + 60)
        elapsed = time.monotonic() - started
        return int(self.state()["ExitCode"]), elapsed

    def state(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.engine("inspect", "--format", "{{json .State}}", self.name).stdout)
        return data

    def logs(self) -> str:
        result = self.engine("logs", self.name, check=False)
        return (result.stdout + result.stderr)[-6000:]

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(f"{self.url}/api/system/status", timeout=10).json()
        return data

    def worker_versions(self) -> list[str | None]:
        return [w["version"] for w in self.status()["workers"]]

    def wait_ready(self, workers: int = 1, timeout_s: float = 180) -> None:
        def ready() -> bool:
            if not self.state().get("Running"):
                raise RuntimeError(f"container {self.name} is not running; its log:\n{self.logs()}")
            answer = httpx.get(f"{self.url}/health/ready", timeout=5)
            return answer.status_code == 200 and len(self.status()["workers"]) >= workers

        wait_until(ready, timeout_s=timeout_s, interval_s=0.25, message=f"container {self.name} to be ready")


def run_container(engine: Engine, image: str, label: str, port: int, *, env: dict[str, str] | None = None,
                  volumes: Sequence[str] = (), extra: Sequence[str] = (), workers: int = 1,
                  wait: bool = True) -> Container:
    """``run -d`` the image with voxswap's settings from the environment only (no flags)."""
    name = f"{engine.prefix}-{label}"
    full_env = {"VOXSWAP_HOST": "127.0.0.1", "VOXSWAP_PORT": str(port), "VOXSWAP_ADMIN_TOKEN": TOKEN,
                "VOXSWAP_WORKERS": str(workers), "VOXSWAP_INTRA_OP_THREADS": "1", **(env or {})}
    args = ["run", "-d", "--name", name, "--network=host", *engine.run_flags, *extra]
    for key, value in full_env.items():
        args += ["-e", f"{key}={value}"]
    for volume in volumes:
        args += ["-v", volume]
    engine(*args, image)
    engine.created.append(("container", name))
    container = Container(engine, name, port, full_env)
    if wait:
        container.wait_ready(workers)
    return container


