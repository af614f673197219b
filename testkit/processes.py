"""voxswap as a real process (uvicorn alone or gunicorn with workers), for e2e tests and benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from testkit.harness import wait_until


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    url: str
    port: int
    proc: subprocess.Popen[bytes]
    registry: Path
    log_path: Path
    token: str
    workers: int
    env: dict[str, str] = field(default_factory=dict)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = httpx.get(f"{self.url}/api/system/status", timeout=10).json()
        return data

    def worker_versions(self) -> dict[int, str | None]:
        return {w["pid"]: w["version"] for w in self.status()["workers"]}

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health/ready", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout_s: float = 90.0) -> None:
        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"voxswap exited with {self.proc.returncode}; log:\n{self.log()}")
            return self.ready() and len(self.status()["workers"]) >= self.workers

        wait_until(up, timeout_s=timeout_s, interval_s=0.1, message=f"voxswap on {self.url} to be ready")

    def update(self, version: str, **body: Any) -> httpx.Response:
        return httpx.post(f"{self.url}/admin/model/update", json={"version": version, **body},
                          headers=self.auth, timeout=300)

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def log(self) -> str:
        try:
            return self.log_path.read_text()[-6000:]
        except FileNotFoundError:
            return ""


def start_server(
    registry: Path,
    workdir: Path,
    *,
    workers: int = 1,
    port: int | None = None,
    token: str = "test-admin-token",
    env: dict[str, str] | None = None,
    wait: bool = True,
) -> ServerProcess:
    """Start ``voxswap serve`` with its own HOME and log file under ``workdir``."""
    port = port or free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    home = workdir / "home"
    home.mkdir(exist_ok=True)
    log_path = workdir / f"voxswap-{port}.log"
    full_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("VOXSWAP_", "PROMETHEUS_MULTIPROC"))},
        "HOME": str(home),
        "VOXSWAP_ADMIN_TOKEN": token,
        "VOXSWAP_SEED_DEMO": "false",
        "VOXSWAP_DATA_DIR": str(workdir / "data"),  # each instance its own jobs, as on separate hosts
        "VOXSWAP_SHUTDOWN_DELAY_S": "1",
        "VOXSWAP_DRAIN_TIMEOUT_S": "30",
        "VOXSWAP_WATCH_INTERVAL_S": "0.1",
        "VOXSWAP_HEARTBEAT_INTERVAL_S": "0.5",
        "VOXSWAP_INTRA_OP_THREADS": "1",
        **(env or {}),
    }
    command = [sys.executable, "-m", "server.tools.cli", "serve", "--registry", str(registry), "--port", str(port),
               "--workers", str(workers)]
    with log_path.open("ab") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=full_env,
                                cwd=Path(__file__).resolve().parents[1])
    server = ServerProcess(f"http://127.0.0.1:{port}", port, proc, registry, log_path, token, workers, full_env)
    if wait:
        try:
            server.wait_ready()
        except BaseException:
            server.stop(signal.SIGKILL)
            raise
    return server
