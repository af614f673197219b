"""Real-socket helpers shared by the tests and the benchmarks: a server in a thread, a load generator.

Both talk to voxswap over loopback TCP exactly as a client would, so what they observe (status
codes, ``X-Model-Version`` headers, refused connections) is what a user would see.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx


@contextmanager
def serve_in_thread(app: Any, host: str = "127.0.0.1", timeout_s: float = 60.0) -> Iterator[str]:
    """Run ``app`` under uvicorn on a free port in a background thread; yield its base URL."""
    import uvicorn

    from server.tools.serving import forwarded_allow_ips

    ctx = getattr(getattr(app, "state", None), "ctx", None)
    proxies = forwarded_allow_ips(ctx.settings) if ctx is not None else "127.0.0.1"  # as voxswap serve does
    config = uvicorn.Config(app, host=host, port=0, log_config=None, lifespan="on", access_log=False,
                            forwarded_allow_ips=proxies)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="voxswap-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server thread exited during start-up")
        if time.monotonic() > deadline:
            raise TimeoutError("the server did not start in time")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=timeout_s)


def wait_until(predicate: Callable[[], Any], timeout_s: float = 30.0, interval_s: float = 0.05,
               message: str = "condition") -> Any:
    """Poll instead of sleeping: return the first truthy value of ``predicate()``."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # a server still starting refuses connections
            last_error = exc
        time.sleep(interval_s)
    raise TimeoutError(f"timed out waiting for {message}" + (f" (last error: {last_error})" if last_error else ""))


@dataclass
class Outcome:
    started: float
    finished: float
    status: int  # 0 when the connection failed
    version: str | None
    text: str | None
    error: str | None = None
    model: str | None = None  # the X-Model header: the named model that answered

    @property
    def latency_s(self) -> float:
        return self.finished - self.started

    @property
    def ok(self) -> bool:
        return self.status == 200


@dataclass
class LoadGenerator:
    """Closed-loop clients posting one clip over and over until stopped; records every outcome."""

    base_url: str
    clip: bytes
    concurrency: int = 4
    path: str = "/api/transcribe"
    pause_s: float = 0.0
    timeout_s: float = 60.0
    form: dict[str, str] = field(default_factory=dict)  # e.g. {"model": "meeting"}
    canary_keys: int = 0  # > 0: requests carry X-Canary-Key load-0 .. load-(n-1) in turn, as many clients
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> LoadGenerator:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        for i in range(self.concurrency):
            thread = threading.Thread(target=self._client, name=f"load-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout_s + 5)
        return self.outcomes

    def _client(self) -> None:
        with httpx.Client(base_url=self.base_url, timeout=self.timeout_s) as client:
            sent = 0
            while not self._stop.is_set():
                headers = {"X-Canary-Key": f"load-{sent % self.canary_keys}"} if self.canary_keys else None
                sent += 1
                self._record(post_clip(client, self.path, self.clip, headers=headers, **self.form))
                if self.pause_s:
                    time.sleep(self.pause_s)

    def _record(self, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)

    def failures(self) -> list[Outcome]:
        with self._lock:
            return [o for o in self.outcomes if not o.ok]

    def count(self) -> int:
        with self._lock:
            return len(self.outcomes)


def post_clip(client: httpx.Client, path: str, clip: bytes, *, headers: dict[str, str] | None = None,
              **form: str) -> Outcome:
    started = time.monotonic()
    try:
        response = client.post(path, files={"file": ("clip.wav", clip, "audio/wav")}, data=form, headers=headers)
    except httpx.HTTPError as exc:
        return Outcome(started, time.monotonic(), 0, None, None, f"{type(exc).__name__}: {exc}")
    finished = time.monotonic()
    body: dict[str, Any] = {}
    if response.headers.get("content-type", "").startswith("application/json"):
        body = response.json()
    error = None if response.status_code == 200 else response.text[:300]
    return Outcome(started, finished, response.status_code, response.headers.get("x-model-version"),
                   body.get("text"), error, response.headers.get("x-model"))
