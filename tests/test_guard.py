"""Finding A: credentials and body sizes are decided from the headers, before one byte of body.

Issue 18's probe streamed a 300 MB body to ``/admin/model/update`` without a token: the server read
it in full before answering 401, and the process went from 196 to 1,088 MiB. Here the same request
goes to a real server on a socket while the test watches the answer and the process's memory.
"""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psutil
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings
from server.testing import synth
from testkit.harness import serve_in_thread
from tests.conftest import AUTH, TOKEN

BIG = 300 * 2**20
CHUNK = bytes(2**20)
FEW_MB = 16 * 2**20  # what "did not read the body" may cost: allocator noise, not the body


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    error: dict[str, Any]
    sent: int  # body bytes the client got out before it had its answer (or the server closed)
    seconds: float  # from the end of the headers to the answer


def stream_post(url: str, path: str, *, total: int = BIG, chunked: bool = False,
                headers: dict[str, str] | None = None) -> Answer:
    """POST ``total`` body bytes as a client on a fast link would, watching for an answer between
    chunks; stop sending at the answer or when the server closes the connection."""
    host, port = url.removeprefix("http://").split(":")
    framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}"
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    head = f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n{framing}\r\n{extra}\r\n"
    piece = f"{len(CHUNK):x}\r\n".encode() + CHUNK + b"\r\n" if chunked else CHUNK
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(head.encode())
        started = time.monotonic()
        sent = 0
        while sent < total and not select.select([sock], [], [], 0)[0]:
            try:
                sock.sendall(piece)
            except OSError:  # the server answered and closed: what it never read is never sent
                break
            sent += len(CHUNK)
        raw = _read_answer(sock)
        seconds = time.monotonic() - started
    head_bytes, _, body = raw.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return Answer(int(lines[0].split()[1]), {k.lower(): v for k, v in fields.items()},
                  json.loads(body)["error"], sent, seconds)


def _read_answer(sock: socket.socket) -> bytes:
    sock.settimeout(30)
    raw = b""
    while True:
        head, sep, body = raw.partition(b"\r\n\r\n")
        if sep and b"content-length: " in head.lower():
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            if len(body) >= length:
                return raw
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return raw
        raw += chunk


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


@pytest.mark.parametrize("path", ["/admin/model/update", "/admin/model/rollback"])
def test_a_300_mb_body_without_a_token_is_answered_401_before_it_is_read(
    live_server: tuple[str, Any], path: str
) -> None:
    url, _ = live_server
    stream_post(url, path, total=2**20)  # the same path once, so the baseline includes its code
    before = rss()
    answer = stream_post(url, path)
    grown = rss() - before
    assert answer.status == 401, answer
    assert answer.error["code"] == "unauthorized" and "Bearer" in answer.error["message"]
    assert answer.headers["www-authenticate"] == "Bearer"
    assert answer.sent < BIG and answer.seconds < 5  # answered from the headers, not after the body
    assert grown < FEW_MB, f"the process grew by {grown / 2**20:.1f} MiB"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_300_mb_body_with_the_token_is_413_without_being_held(live_server: tuple[str, Any],
                                                                chunked: bool) -> None:
    url, _ = live_server
    stream_post(url, "/admin/model/update", total=2**20, headers=AUTH, chunked=chunked)
    before = rss()
    answer = stream_post(url, "/admin/model/update", headers=AUTH, chunked=chunked)
    grown = rss() - before
    assert answer.status == 413, answer
    assert answer.error["code"] == "payload_too_large" and "65536 bytes" in answer.error["message"]
    assert answer.sent < BIG and answer.seconds < 5
    assert grown < FEW_MB, f"the process grew by {grown / 2**20:.1f} MiB"


def test_with_no_admin_token_configured_admin_answers_403_before_the_body(
    make_settings: Callable[..., Settings]
) -> None:
    with serve_in_thread(create_app(make_settings(admin_token=None))) as url:
        answer = stream_post(url, "/admin/model/update", headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status == 403 and "VOXSWAP_ADMIN_TOKEN" in answer.error["message"]
    assert answer.sent < BIG and answer.seconds < 5


def test_json_routes_take_a_small_body_while_uploads_keep_the_upload_limit(
    make_settings: Callable[..., Settings]
) -> None:
    padded = {"version": "b", "padding": "x" * 100_000}  # 100 kB of JSON: no admin route needs that
    clip = synth.wav_bytes(synth.speech_like(4.0))  # 128 kB of audio: an ordinary upload
    with TestClient(create_app(make_settings())) as c:
        r = c.post("/admin/model/update", json=padded, headers=AUTH)
        assert r.status_code == 413, r.text
        assert r.json()["error"]["message"].startswith("the request body is ")
        assert "this route accepts at most 65536 bytes" in r.json()["error"]["message"]
        assert c.get("/api/system/status").json()["model_version"] == "a"  # nothing happened
        assert c.post("/api/transcribe", files={"file": ("clip.wav", clip)}).status_code == 200
    with TestClient(create_app(make_settings(max_body_bytes=200_000))) as c:  # the limit is a setting
        r = c.post("/admin/model/update", json=padded, headers=AUTH)
        assert r.status_code == 200, r.text
        assert c.get("/api/system/status").json()["model_version"] == "b"
