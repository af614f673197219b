"""Helpers for the batch-job and CLI-client tests: a server subprocess, a webhook receiver, polling."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

from server.vocab import FINISHED_JOB_STATUSES
from testkit.harness import wait_until

FINISHED: set[str] = set(FINISHED_JOB_STATUSES)
VOXSWAP = Path(sys.executable).with_name("voxswap")


def zip_of(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def submit(client: Any, files: Sequence[tuple[str, bytes]], **form: str) -> list[dict[str, Any]]:
    """POST /api/jobs with ``files``; returns the jobs it created."""
    r = client.post("/api/jobs", files=[("files", (name, data)) for name, data in files], data=form)
    assert r.status_code == 202, r.text
    jobs: list[dict[str, Any]] = r.json()["jobs"]
    return jobs


def wait_for_jobs(client: Any, ids: Sequence[str], statuses: set[str] = FINISHED,
                  timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """Poll until every job is in one of ``statuses``; returns them in the order of ``ids``."""
    def check() -> list[dict[str, Any]] | None:
        jobs = [client.get(f"/api/jobs/{job_id}").json() for job_id in ids]
        return jobs if all(j["status"] in statuses for j in jobs) else None

    result: list[dict[str, Any]] = wait_until(check, timeout_s=timeout_s, interval_s=0.05,
                                              message=f"jobs to reach {sorted(statuses)}")
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServerProcess:
    """``voxswap serve`` as a real subprocess, so it can be SIGKILLed like a crashed server."""

    def __init__(self, registry: Path, data_dir: Path, log_file: Path, **env: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.registry = registry
        self.env = {**os.environ, "VOXSWAP_DATA_DIR": str(data_dir), **env}
        self.log_file = log_file
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServerProcess:
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(VOXSWAP), "serve", "--registry", str(self.registry), "--port", str(self.port),
                 "--no-seed-demo"], env=self.env, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self._healthy, timeout_s=60, message=f"voxswap on port {self.port} (log: {self.log_file})")
        return self

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the server exited: {self.log_file.read_text()[-2000:]}")
        return httpx.get(f"{self.url}/health", timeout=2).status_code == 200

    def kill(self) -> None:
        """SIGKILL: no lifespan shutdown, no cleanup, exactly like a crash or the OOM killer."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


@contextmanager
def server_process(registry: Path, data_dir: Path, log_file: Path, **env: str) -> Iterator[ServerProcess]:
    server = ServerProcess(registry, data_dir, log_file, **env).start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class WebhookReceiver:
    """An HTTP (or, given a TLS context, HTTPS) server on 127.0.0.1 that keeps every POST as it
    arrived, raw body included, and answers each with the next scripted (status, headers)."""

    def __init__(self, answers: Sequence[tuple[int, dict[str, str]]] = ((200, {}),), *,
                 statuses: Sequence[int] = (), tls: ssl.SSLContext | None = None):
        self.answers = [(status, {}) for status in statuses] or list(answers)
        self.received: list[Received] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._lock:
                    receiver.received.append(Received(self.path, dict(self.headers), body))
                    status, headers = receiver.answers[min(len(receiver.received), len(receiver.answers)) - 1]
                self.send_response(status)
                for name, value in {**headers, "Content-Length": "0"}.items():
                    self.send_header(name, value)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
                pass

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a refused TLS handshake is part of a test, not noise

        self.server = Server(("127.0.0.1", 0), Handler)
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, name="webhook-receiver", daemon=True)

    def __enter__(self) -> WebhookReceiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)

    def count(self) -> int:
        with self._lock:
            return len(self.received)
