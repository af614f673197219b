"""Client API keys (issue 18, finding D's keys): optional, off by default, decided from the headers.

With ``VOXSWAP_API_KEYS_FILE`` set, transcription, /v1/models and jobs need ``Authorization: Bearer
<key>``, as the official openai client sends its ``api_key``; health, metrics, the page and /docs
stay open. The file is re-read when it changes, and each key can be held to a request rate.
"""

from __future__ import annotations

import hashlib
import logging
import socket
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI

from server.app import create_app
from server.http.deps import ClientDep
from server.settings import Settings
from server.tools.serving import warn_if_exposed
from testkit.harness import serve_in_thread, wait_until
from tests.conftest import AUTH, TEXT_A

PLAIN = "vs-plain-key-0123456789abcdef"
HASHED = "vs-hashed-key-fedcba9876543210"
KEYS_FILE = f"""# voxswap client keys
{PLAIN}   team-a

sha256:{hashlib.sha256(HASHED.encode()).hexdigest().upper()} team b (hashed)
sha256:not-a-digest
"""


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "api-keys"
    path.write_text(KEYS_FILE)
    return path


@pytest.fixture
def keyed(make_settings: Callable[..., Settings], keys_file: Path) -> Callable[..., AbstractContextManager[str]]:
    def serve(**overrides: Any) -> AbstractContextManager[str]:
        app = create_app(make_settings(api_keys_file=keys_file, **overrides))
        _add_whoami(app)
        return serve_in_thread(app)

    return serve


def _add_whoami(app: FastAPI) -> None:
    """A route under a keyed prefix that answers what ``ClientDep`` says: the contract job ownership uses."""

    async def whoami(client: ClientDep) -> dict[str, Any]:
        return {"key_id": client.key_id, "label": client.label, "admin": client.admin}

    app.add_api_route("/v1/models-whoami", whoami)


def transcribe(url: str, clip: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{url}/api/transcribe", files={"file": ("clip.wav", clip)}, headers=headers, timeout=30)


def test_without_a_key_or_with_a_wrong_one_every_keyed_route_is_401(keyed: Callable[..., Any],
                                                                       speech_wav: bytes) -> None:
    with keyed() as url:
        for headers in ({}, bearer("not-a-key"), {"Authorization": f"Basic {PLAIN}"}, bearer(f"sha256:{PLAIN}")):
            r = transcribe(url, speech_wav, headers)
            assert r.status_code == 401, r.text
            error = r.json()["error"]
            assert error["code"] == "unauthorized" and error["type"] == "authentication_error"
            assert "API key" in error["message"] and r.headers["www-authenticate"] == "Bearer"
            for method, path in (("GET", "/v1/models"), ("GET", "/api/jobs"), ("GET", "/api/jobs/x"),
                                 ("POST", "/v1/audio/transcriptions"), ("DELETE", "/api/jobs/x")):
                assert httpx.request(method, f"{url}{path}", headers=headers).status_code == 401, path
        # what a monitor, a browser and a reader of the API need stays open
        for path in ("/health", "/health/ready", "/metrics", "/", "/docs", "/openapi.json", "/api/system/status"):
            assert httpx.get(f"{url}{path}").status_code == 200, path


def test_a_key_in_either_form_opens_the_keyed_routes_and_says_who_called(keyed: Callable[..., Any],
                                                                         speech_wav: bytes) -> None:
    with keyed() as url:
        for key in (PLAIN, HASHED):
            r = transcribe(url, speech_wav, bearer(key))
            assert r.status_code == 200 and r.json()["text"] == TEXT_A
            assert httpx.get(f"{url}/v1/models", headers=bearer(key)).status_code == 200
            assert httpx.get(f"{url}/api/jobs", headers=bearer(key)).status_code == 200
        plain = httpx.get(f"{url}/v1/models-whoami", headers=bearer(PLAIN)).json()
        assert plain == {"key_id": hashlib.sha256(PLAIN.encode()).hexdigest()[:16], "label": "team-a",
                         "admin": False}
        hashed = httpx.get(f"{url}/v1/models-whoami", headers=bearer(HASHED)).json()
        assert hashed["label"] == "team b (hashed)" and hashed["key_id"] != plain["key_id"]
        # the admin token opens them too, as an admin
        assert transcribe(url, speech_wav, AUTH).status_code == 200
        assert httpx.get(f"{url}/v1/models-whoami", headers=AUTH).json()["admin"] is True


def test_keys_are_checked_before_an_upload_is_read(keyed: Callable[..., Any]) -> None:
    with keyed() as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:  # 40 MB announced, none sent
            sock.sendall(b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: t\r\nContent-Length: 40000000\r\n"
                         b"Content-Type: multipart/form-data; boundary=x\r\n\r\n")
            answer = b""
            while chunk := sock.recv(65536):  # the server answers and closes without waiting for the body
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 401 ") and b'"code":"unauthorized"' in answer


def test_the_official_openai_client_works_with_its_api_key(keyed: Callable[..., Any], speech_wav: bytes) -> None:
    with keyed() as url:
        with openai.OpenAI(base_url=f"{url}/v1", api_key=PLAIN, timeout=30) as oa:
            assert oa.audio.transcriptions.create(model="whisper-1", file=("clip.wav", speech_wav)).text == TEXT_A
            assert [m.id for m in oa.models.list()]
        with openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", timeout=30) as oa:
            with pytest.raises(openai.AuthenticationError) as caught:
                oa.audio.transcriptions.create(model="whisper-1", file=("clip.wav", speech_wav))
            assert caught.value.status_code == 401 and "API key" in caught.value.message


def test_the_keys_file_is_re_read_after_an_edit(keyed: Callable[..., Any], keys_file: Path) -> None:
    added = "vs-added-later-5555555555"
    with keyed() as url:
        assert httpx.get(f"{url}/v1/models", headers=bearer(added)).status_code == 401
        keys_file.write_text(f"{added} newcomer\n")  # the plain key is revoked in the same edit
        wait_until(lambda: httpx.get(f"{url}/v1/models", headers=bearer(added)).status_code == 200,
                   timeout_s=10, message="the added key to be accepted")
        assert httpx.get(f"{url}/v1/models", headers=bearer(PLAIN)).status_code == 401
        keys_file.unlink()  # a file that cannot be read leaves no key valid: closed, not open
        wait_until(lambda: httpx.get(f"{url}/v1/models", headers=bearer(added)).status_code == 401,
                   timeout_s=10, message="the keys to be dropped with their file")


def test_a_key_over_its_rate_gets_429_with_retry_after(keyed: Callable[..., Any]) -> None:
    with keyed(api_key_rate_per_s=0.2, api_key_burst=3) as url:
        answers = [httpx.get(f"{url}/v1/models", headers=bearer(PLAIN)) for _ in range(4)]
        assert [r.status_code for r in answers] == [200, 200, 200, 429]
        limited = answers[-1]
        assert limited.json()["error"]["code"] == "too_many_requests"
        assert "0.2 requests a second" in limited.json()["error"]["message"]
        assert 1 <= int(limited.headers["retry-after"]) <= 5
        # another key has its own bucket, and the admin token has none
        assert httpx.get(f"{url}/v1/models", headers=bearer(HASHED)).status_code == 200
        assert all(httpx.get(f"{url}/v1/models", headers=AUTH).status_code == 200 for _ in range(5))


def test_keys_are_off_by_default(client: Any, speech_wav: bytes) -> None:
    r = client.post("/api/transcribe", files={"file": ("clip.wav", speech_wav)})
    assert r.status_code == 200


def test_serving_beyond_loopback_without_keys_logs_a_warning(make_settings: Callable[..., Settings],
                                                             keys_file: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="voxswap.serving"):
        assert warn_if_exposed(make_settings(host="0.0.0.0")) is True
        assert "VOXSWAP_API_KEYS_FILE" in caplog.text
        assert warn_if_exposed(make_settings(host="127.0.0.1")) is False
        assert warn_if_exposed(make_settings(host="::1")) is False
        assert warn_if_exposed(make_settings(host="0.0.0.0", api_keys_file=keys_file)) is False
