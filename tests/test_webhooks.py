"""Job webhooks as the issue 18 probe met them, and as a receiver sees them now.

The probe (finding C) submitted webhooks to loopback, link-local (cloud metadata) and private
addresses, and read in ``GET /api/jobs`` how each delivery went: a port scanner. Now every internal
address class is refused at submission with a 400, the delivery checks again and connects to the
address it checked, and every delivery is signed. Receivers here are real HTTP servers on
127.0.0.1, reached only where a test allows loopback through ``webhook_allow_networks``.
"""

from __future__ import annotations

import contextlib
import io
import socket
import ssl
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.service.webhooks import REFUSED, SECRET_FILE, UNREACHABLE, sign, verify_signature
from server.settings import Settings
from server.storage.job_store import JobStore
from server.testing import synth
from testkit.harness import wait_until
from tests.jobs_helpers import WebhookReceiver as Receiver
from tests.jobs_helpers import free_port, submit

SECRET = "a-test-secret-of-some-length"
LOOPBACK = "127.0.0.1/32"


@pytest.fixture(scope="module")
def clip() -> bytes:
    return synth.wav_bytes(synth.speech_like(1.5, seed=3))


@pytest.fixture
def app(make_settings: Callable[..., Settings], tmp_path: Path) -> Callable[..., TestClient]:
    def build(**overrides: Any) -> TestClient:
        base: dict[str, Any] = dict(data_dir=tmp_path / "data", job_poll_s=0.05, webhook_backoff_s=0.05)
        return TestClient(create_app(make_settings(**{**base, **overrides})))

    return build


def _webhook_when(c: TestClient, job_id: str, status: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        hook: dict[str, Any] = c.get(f"/api/jobs/{job_id}").json()["webhook"]
        return hook if hook["status"] == status else None

    found: dict[str, Any] = wait_until(check, timeout_s=30, interval_s=0.05, message=f"the webhook to be {status}")
    return found


INTERNAL = [  # (webhook URL, the kind of address the 400 names)
    ("http://127.0.0.1:7860/admin/model/unload", "loopback"),
    ("http://127.8.9.10/", "loopback"),
    ("http://[::1]:7860/", "loopback"),
    ("http://localhost:7860/", "loopback"),  # a name that resolves to loopback
    ("http://2130706433/", "loopback"),  # 127.0.0.1 written as one number
    ("http://10.1.2.3/hook", "private"),
    ("http://172.16.0.1/hook", "private"),
    ("http://172.31.255.254/hook", "private"),
    ("http://192.168.1.1/hook", "private"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),  # cloud metadata
    ("http://[fc00::1]/", "private"),
    ("http://[fd12:3456::1]/", "private"),
    ("http://[fe80::1]/", "link-local"),
    ("http://[fec0::1]/", "site-local"),  # deprecated, and Python still calls it global
    ("http://0.0.0.0:8080/", "unspecified"),
    ("http://[::]/", "unspecified"),
    ("http://224.0.0.1/", "multicast"),
    ("http://[ff02::1]/", "multicast"),
    ("http://240.0.0.1/", "reserved"),
    ("http://100.64.0.1/", "non-public"),
    ("http://[::ffff:127.0.0.1]/", "loopback"),  # IPv4-mapped IPv6
    ("http://[::ffff:169.254.169.254]/", "link-local"),
    ("http://[64:ff9b::a9fe:a9fe]/", "link-local"),  # NAT64 of the metadata address
    ("http://[2002:7f00:1::]/", "loopback"),  # 6to4 of loopback
]


def test_every_internal_address_class_is_refused_at_submission(app: Callable[..., TestClient], clip: bytes) -> None:
    with app() as c:
        for url, kind in INTERNAL:
            r = c.post("/api/jobs", files=[("files", ("a.wav", clip))], data={"webhook_url": url})
            assert r.status_code == 400, (url, r.text)
            err = r.json()["error"]
            assert err["param"] == "webhook_url" and err["code"] == "invalid_request", url
            assert f"points to a {kind} address" in err["message"], (url, err["message"])
            assert "VOXSWAP_WEBHOOK_ALLOW_NETWORKS" in err["message"]
        r = c.post("/api/jobs", files=[("files", ("a.wav", clip))],
                   data={"webhook_url": "http://no-such-host.invalid/hook"})
        assert r.status_code == 400 and "could not be resolved" in r.json()["error"]["message"]
        assert c.get("/api/jobs").json()["total"] == 0  # nothing was queued, nothing was sent


def test_the_allow_list_opens_only_the_networks_it_names(app: Callable[..., TestClient], clip: bytes,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOXSWAP_WEBHOOK_ALLOW_NETWORKS", "127.0.0.1/32, 10.0.0.0/8")
    assert [str(n) for n in Settings().webhook_allow_networks] == ["127.0.0.1/32", "10.0.0.0/8"]
    with app(webhook_allow_networks=LOOPBACK, job_workers=0) as c:
        submit(c, [("a.wav", clip)], webhook_url="http://127.0.0.1:9/hook")
        submit(c, [("a.wav", clip)], webhook_url="http://[::ffff:127.0.0.1]:9/hook")  # the same address
        for url in ("http://127.0.0.2/hook", "http://[::1]/hook", "http://192.168.1.1/hook"):
            r = c.post("/api/jobs", files=[("files", ("a.wav", clip))], data={"webhook_url": url})
            assert r.status_code == 400, (url, r.text)


def test_a_signed_delivery_verifies_and_a_tampered_one_does_not(app: Callable[..., TestClient],
                                                                clip: bytes) -> None:
    with Receiver() as hook, app(webhook_allow_networks=LOOPBACK, webhook_secret=SECRET) as c:
        [job] = submit(c, [("call.wav", clip)], webhook_url=hook.url)
        assert _webhook_when(c, job["id"], "delivered")["attempts"] == 1
    [got] = hook.received
    signature = got.headers["X-Voxswap-Signature"]
    assert signature.startswith("t=") and ",v1=" in signature
    assert verify_signature(SECRET, signature, got.body)
    assert not verify_signature(SECRET, signature, got.body.replace(b"completed", b"cancelled"))
    assert not verify_signature("another-secret-entirely", signature, got.body)
    stale = sign(SECRET, got.body, int(time.time()) - 3600)  # a capture replayed an hour later
    assert not verify_signature(SECRET, stale, got.body)
    for hostile in ("t=1" + "0" * 400 + ",v1=ab", "t=" + "9" * 5000 + ",v1=ab", "v1=ab", "t=x,v1=ab"):
        assert not verify_signature(SECRET, hostile, got.body)  # refused, never an exception
    assert got.headers["Idempotency-Key"] == f"{job['id']}:job.completed"
    assert got.headers["Host"] == f"127.0.0.1:{hook.port}"
    assert b'"event":"job.completed"' in got.body


def test_without_a_configured_secret_one_is_generated_once_and_kept_private(app: Callable[..., TestClient],
                                                                           clip: bytes, tmp_path: Path) -> None:
    with Receiver() as hook:
        for _ in range(2):  # a restart signs with the same secret
            with app(webhook_allow_networks=LOOPBACK) as c:
                [job] = submit(c, [("call.wav", clip)], webhook_url=hook.url)
                _webhook_when(c, job["id"], "delivered")
    path = tmp_path / "data" / SECRET_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    secret = path.read_text().strip()
    assert len(secret) >= 32
    assert all(verify_signature(secret, got.headers["X-Voxswap-Signature"], got.body) for got in hook.received)
    assert hook.count() == 2


def test_the_job_never_shows_the_webhook_query_string_or_credentials(app: Callable[..., TestClient],
                                                                     clip: bytes) -> None:
    with Receiver() as hook, app(webhook_allow_networks=LOOPBACK) as c:
        url = f"http://alice:pa55word@127.0.0.1:{hook.port}/hook?token=s3cret#frag"
        [job] = submit(c, [("call.wav", clip)], webhook_url=url)
        shown = f"http://127.0.0.1:{hook.port}/hook"
        assert job["webhook"]["url"] == shown
        _webhook_when(c, job["id"], "delivered")
        listing = c.get("/api/jobs")
        assert listing.json()["jobs"][0]["webhook"]["url"] == shown
        assert c.get(f"/api/jobs/{job['id']}").json()["webhook"]["url"] == shown
        for secret in ("s3cret", "pa55word", "alice", "frag"):
            assert secret not in listing.text
    [got] = hook.received
    assert got.path == "/hook?token=s3cret"  # the receiver still gets the URL it asked for
    assert got.headers["Authorization"].startswith("Basic ")
    assert b"s3cret" not in got.body and b"pa55word" not in got.body


def test_a_redirect_is_not_followed(app: Callable[..., TestClient], clip: bytes) -> None:
    with Receiver() as elsewhere, Receiver([(302, {"Location": elsewhere.url})]) as hook, \
            app(webhook_allow_networks=LOOPBACK, webhook_attempts=2) as c:
        [job] = submit(c, [("call.wav", clip)], webhook_url=hook.url)
        webhook = _webhook_when(c, job["id"], "failed")
    assert webhook["error"] == "HTTP 302" and webhook["attempts"] == 2
    assert hook.count() == 2 and elsewhere.count() == 0


def test_a_failed_connection_shows_no_network_details(app: Callable[..., TestClient], clip: bytes) -> None:
    """A closed port and a port that hangs up look the same from the job: no port-scan oracle."""
    hangs_up = socket.socket()
    hangs_up.bind(("127.0.0.1", 0))
    hangs_up.listen()

    def hang_up() -> None:
        with contextlib.suppress(OSError):  # closed at the end of the test
            while True:
                conn, _ = hangs_up.accept()
                conn.close()

    threading.Thread(target=hang_up, daemon=True).start()
    try:
        with app(webhook_allow_networks=LOOPBACK, webhook_attempts=1) as c:
            closed = submit(c, [("a.wav", clip)], webhook_url=f"http://127.0.0.1:{free_port()}/hook")[0]
            silent = submit(c, [("b.wav", clip)], webhook_url=f"http://127.0.0.1:{hangs_up.getsockname()[1]}/")[0]
            errors = {_webhook_when(c, job["id"], "failed")["error"] for job in (closed, silent)}
    finally:
        hangs_up.close()
    assert errors == {UNREACHABLE}


def test_the_address_is_checked_again_at_delivery(app: Callable[..., TestClient], clip: bytes,
                                                  tmp_path: Path) -> None:
    """A job whose URL passed a check once (another process's allow-list, a DNS answer since
    changed) is still refused at delivery, before anything is sent."""
    store = JobStore(tmp_path / "data").ensure()
    with Receiver() as hook:
        staged = store.stage("call.wav", io.BytesIO(clip), ".wav", limit=10 << 20)
        [job] = store.add([staged], language="auto", use_itn=False, webhook_url=hook.url, max_pending=10)
        with app() as c:  # no allow-list here
            webhook = _webhook_when(c, job.id, "failed")
            assert c.get(f"/api/jobs/{job.id}").json()["status"] == "completed"
        assert hook.count() == 0
    assert webhook["error"] == REFUSED and webhook["attempts"] == 1


def _certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for the name ``localhost`` only (no IP address in it)."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=DNS:localhost", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def test_https_connects_to_the_checked_address_and_verifies_the_name(app: Callable[..., TestClient], clip: bytes,
                                                                     tmp_path: Path) -> None:
    """The delivery connects to the IP it checked, yet TLS checks the certificate against the URL's
    host name (SNI): a certificate for ``localhost`` passes for https://localhost, and the same
    server fails for https://127.0.0.1, which the certificate does not name."""
    cert, key = _certificate(tmp_path)
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    trust = ssl.create_default_context(cafile=str(cert))
    with Receiver(tls=server_tls) as hook, \
            app(webhook_allow_networks="127.0.0.0/8,::1/128", webhook_attempts=1) as c:
        c.app.state.ctx.jobs.webhooks.verify = trust  # type: ignore[attr-defined]
        by_name = submit(c, [("a.wav", clip)], webhook_url=f"https://localhost:{hook.port}/hook")[0]
        assert _webhook_when(c, by_name["id"], "delivered")["attempts"] == 1
        by_ip = submit(c, [("b.wav", clip)], webhook_url=hook.url)[0]
        assert _webhook_when(c, by_ip["id"], "failed")["error"] == UNREACHABLE
    assert hook.received[0].headers["Host"] == f"localhost:{hook.port}"
    assert hook.count() == 1
