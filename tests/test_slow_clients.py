"""Finding F: slow and greedy clients are dropped, and the server keeps answering meanwhile.

Issue 18's probe held 500 slow-header and 500 slow-body connections open indefinitely; once the
process ran out of file descriptors, /health timed out and the log grew by 120 MB in 20 s. Here a
real server with short timeouts sees the same clients (raw sockets on 127.0.0.1) and must drop
them after the timeouts while /health keeps answering fast.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import uvicorn

from server.app import create_app
from server.settings import Settings
from server.storage.registry import Registry
from server.tools.serving import uvicorn_config
from testkit.harness import wait_until
from testkit.processes import start_server


@contextmanager
def serve(settings: Settings) -> Iterator[tuple[str, int]]:
    """voxswap as ``voxswap serve`` runs it (its protocol and timeouts), in a thread, on a free port."""
    server = uvicorn.Server(uvicorn_config(create_app(settings), settings, port=0, access_log=False))
    thread = threading.Thread(target=server.run, name="voxswap-slow-clients", daemon=True)
    thread.start()
    wait_until(lambda: server.started or not thread.is_alive(), timeout_s=60, message="the server to start")
    assert server.started, "the server did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", port
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def slow_header(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(b"POST /api/transcribe HTTP/1.1\r\nHost: test\r\n")  # and never the rest of the headers
    return sock


def slow_body(port: int, path: str = "/api/transcribe") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary=x\r\n"
                 f"Content-Length: 1000000\r\n\r\n--x\r\n".encode())  # and then nothing
    return sock


def read_to_close(sock: socket.socket) -> bytes:
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return received


def timed_health(url: str) -> tuple[int, float]:
    started = time.monotonic()
    try:
        status = httpx.get(f"{url}/health", timeout=10).status_code  # a new connection each time
    except httpx.HTTPError:
        status = 0
    return status, time.monotonic() - started


def test_slow_header_and_slow_body_clients_are_dropped_while_health_stays_fast(
    make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(header_timeout_s=1.5, body_timeout_s=1.5)
    with serve(settings) as (url, port):
        opened = time.monotonic()
        held = {**{slow_header(port): "header" for _ in range(50)}, **{slow_body(port): "body" for _ in range(50)}}
        answers: dict[str, list[bytes]] = {"header": [], "body": []}
        probes: list[tuple[int, float]] = []
        deadline = opened + 20  # 1.5 s timeouts: before the fix they were held for as long as the client liked
        while held and time.monotonic() < deadline:
            probes.append(timed_health(url))
            readable, _, _ = select.select(list(held), [], [], 0.1)
            for sock in readable:
                answers[held.pop(sock)].append(read_to_close(sock))
                sock.close()
        dropped_after = time.monotonic() - opened
        for sock in held:
            sock.close()
        assert not held, f"{len(held)} slow connections still held after {dropped_after:.1f} s"
    assert answers["header"] == [b""] * 50  # headers never completed: closed without an answer
    for raw in answers["body"]:  # a body that stalls: 408 in the envelope, then closed
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 ") and b"connection: close" in head.lower()
        error = json.loads(body)["error"]
        assert error["code"] == "request_timeout" and "stalled" in error["message"]
    assert probes and all(status == 200 for status, _ in probes)
    slowest = max(seconds for _, seconds in probes)
    assert slowest < 2.0, f"/health took {slowest:.2f} s while slow clients were held"


def test_an_upload_trickling_under_the_minimum_rate_gets_408(make_settings: Callable[..., Settings]) -> None:
    # every piece arrives well within the stall timeout, so only the rate can stop it
    settings = make_settings(body_timeout_s=1.0, min_upload_rate_bytes=4096)
    with serve(settings) as (_, port):
        sock = slow_body(port)
        started = time.monotonic()
        answer = b""
        while not answer and time.monotonic() - started < 15:
            if select.select([sock], [], [], 0.25)[0]:
                answer = read_to_close(sock)
            else:
                sock.sendall(b"x" * 64)  # 256 bytes a second
        sock.close()
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert "too slowly" in json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["message"]


def test_at_the_connection_cap_idle_connections_make_room_and_busy_ones_get_503(
    make_settings: Callable[..., Settings]
) -> None:
    settings = make_settings(max_connections=10, header_timeout_s=60, body_timeout_s=60)
    with serve(settings) as (url, port):
        idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(10)]
        time.sleep(0.2)  # let the server take all ten
        assert timed_health(url)[0] == 200  # a client that sends its request at once gets in...
        assert read_to_close(idle[0]) == b""  # ...in place of the oldest connection that sent nothing
        busy = [slow_body(port) for _ in range(10)]  # these push out the other idle ones
        time.sleep(0.2)
        r = httpx.get(f"{url}/health", timeout=5)  # every slot is in a request: refused at once
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
        assert r.headers["retry-after"] == "1"
        for sock in busy + idle:
            sock.close()
        wait_until(lambda: timed_health(url)[0] == 200, timeout_s=10, message="/health once they left")


def test_a_quiet_keep_alive_connection_is_closed(make_settings: Callable[..., Settings]) -> None:
    with serve(make_settings(keepalive_timeout_s=1)) as (_, port), \
            socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: test\r\n\r\n")
        answer = b""
        while b'"alive"' not in answer:
            answer += sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200 ")
        started = time.monotonic()
        assert read_to_close(sock) == b""  # closed by the server, long before the client's 10 s
        assert time.monotonic() - started < 5


def test_running_out_of_descriptors_costs_a_few_log_lines_and_the_server_recovers(
    registry: Registry, tmp_path: Path
) -> None:
    # the cap set above what the process may open, as a careless deployment would
    server = start_server(registry.root, tmp_path / "run", env={"VOXSWAP_MAX_CONNECTIONS": "5000",
                                                                "VOXSWAP_HEADER_TIMEOUT_S": "30"})
    held: list[socket.socket] = []
    try:
        process = psutil.Process(server.proc.pid)
        process.rlimit(psutil.RLIMIT_NOFILE, (process.num_fds() + 30, process.rlimit(psutil.RLIMIT_NOFILE)[1]))
        before = server.log_path.stat().st_size
        held = [socket.create_connection(("127.0.0.1", server.port), timeout=5) for _ in range(150)]
        time.sleep(5)  # out of descriptors all along: asyncio retries accept() and logs every failure
        grown = server.log_path.stat().st_size - before
        assert "out of system resource" in server.log_path.read_text()  # it did run out
        assert grown < 200_000, f"the log grew by {grown} bytes in 5 s"  # 33 MB in 10 s before
        for sock in held:
            sock.close()
        held = []
        wait_until(lambda: timed_health(server.url)[0] == 200, timeout_s=20, message="/health to answer again")
    finally:
        for sock in held:
            sock.close()
        server.stop()
