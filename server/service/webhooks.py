"""Job webhooks: sent only where the operator allows, to the address that was checked, and signed.

A webhook URL is chosen by a client, but the server calls it from inside the network it runs in.
Unchecked, that makes the server a way into that network (SSRF: cloud metadata at 169.254.169.254,
admin ports on loopback, private services), and the delivery outcome shown on the job a port
scanner. So:

- the host is resolved, and every address it resolves to must be public: not loopback, private,
  link-local, multicast, unspecified or reserved (IPv4, IPv6, and IPv4 inside IPv6), unless
  ``webhook_allow_networks`` names its network. Checked at submission (a 400 with the reason) and
  again before every delivery attempt;
- an attempt connects to an address that was checked (the URL's host replaced by the IP, the name
  kept in ``Host`` and, for https, in TLS's SNI and certificate check), so a DNS answer that changes
  between the check and the connection (rebinding) cannot move it;
- no redirect is followed, the response body is never read, and a failed attempt is recorded as an
  HTTP status or one generic reason, never as the socket error a scanner could read;
- every delivery is signed as Stripe signs its webhooks: ``X-Voxswap-Signature: t=<unix>,v1=<hex>``,
  HMAC-SHA256 over ``f"{t}.{body}"`` with the deployment's secret; receivers check it with
  :func:`verify_signature` and drop duplicates by ``Idempotency-Key`` (job id and event).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import secrets
import socket
import ssl
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from server.errors import InvalidRequest
from server.metrics import Metrics
from server.settings import Settings
from server.storage.job_queue import JobQueue
from server.storage.job_records import Job

log = logging.getLogger("voxswap.webhooks")

SIGNATURE_HEADER = "X-Voxswap-Signature"
SECRET_FILE = "webhook-secret"  # in the data dir, when VOXSWAP_WEBHOOK_SECRET is not set
MAX_URL_CHARS = 2000
# what a job shows of a failed attempt: the same words whatever the socket said, so the job list
# cannot tell a closed port from a filtered one
REFUSED = "refused: the webhook's address is not one this server sends to"
UNREACHABLE = "no answer: could not connect, or the receiver did not answer in time"

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")


class WebhookRefused(InvalidRequest):
    """A webhook URL that is malformed or points where this server does not send webhooks."""

    def __init__(self, message: str):
        super().__init__(message, param="webhook_url")


class HostNotFound(WebhookRefused):
    """The host did not resolve: refused at submission, retried at delivery (DNS may come back)."""


# -- where a webhook may go -------------------------------------------------------------------


def parse_url(url: str) -> httpx.URL:
    """The URL as a delivery will use it: one httpx would refuse later is refused now."""
    try:
        parsed = httpx.URL(url)
        ok = (parsed.scheme in ("http", "https") and bool(parsed.host) and len(url) <= MAX_URL_CHARS
              and (parsed.port is None or 0 < parsed.port < 65536))
    except (httpx.InvalidURL, ValueError, TypeError):
        ok = False
    if not ok:
        raise WebhookRefused("webhook_url must be a valid http:// or https:// URL")
    return parsed


def refusal(ip: Address, allow: Sequence[Network]) -> str | None:
    """The kind of address ``ip`` is when a webhook may not go there (for the 400), else None.

    An IPv6 address carrying an IPv4 one (mapped ``::ffff:a.b.c.d``, 6to4, Teredo, NAT64, the old
    compatible form) is judged by the IPv4 addresses it carries, each of which must be allowed or
    public, since the packets end up there (Teredo carries two).
    """
    candidates: list[Address] = []  # the IPv4 inside first: it names the kind best
    if isinstance(ip, ipaddress.IPv6Address):
        candidates += [a for a in (ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())) if a is not None]
        if ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):  # not :: and ::1 themselves
            candidates.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    candidates = candidates or [ip]  # a carrier of IPv4 addresses is judged by them, every one
    for a in candidates:  # every address the packets may reach must be allowed or public
        if (kind := _internal_kind(a)) and not any(a in net for net in allow):
            return kind
    return None


def _internal_kind(a: Address) -> str | None:
    checks = (("unspecified", a.is_unspecified), ("loopback", a.is_loopback), ("link-local", a.is_link_local),
              ("site-local", isinstance(a, ipaddress.IPv6Address) and a.is_site_local),  # fec0::/10, deprecated
              ("multicast", a.is_multicast), ("reserved", a.is_reserved), ("private", a.is_private),
              ("non-public", not a.is_global))  # e.g. 100.64.0.0/10, shared by carriers
    return next((kind for kind, hit in checks if hit), None)


@dataclass(frozen=True)
class Target:
    """Where one delivery attempt connects: addresses that passed the check, and the name the
    receiver knows the URL by (for ``Host``, and for TLS when it is https)."""

    url: httpx.URL
    addresses: tuple[str, ...]

    @property
    def host_header(self) -> str:
        return self.url.netloc.decode("ascii")  # host[:port], never the userinfo

    @property
    def sni_hostname(self) -> str | None:
        host = self.url.raw_host.decode("ascii")  # an IP literal is checked against the certificate's
        return host if self.url.scheme == "https" and not _is_ip(host) else None  # IPs, with no SNI

    def request_url(self, address: str) -> httpx.URL:
        return self.url.copy_with(host=address)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def resolve(url: str | httpx.URL, allow: Sequence[Network], *, timeout_s: float) -> Target:
    """Resolve the URL's host and check every address it has; WebhookRefused says why not."""
    parsed = parse_url(url) if isinstance(url, str) else url
    host = parsed.raw_host.decode("ascii")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        infos = await asyncio.wait_for(
            asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout_s)
    except (OSError, TimeoutError, UnicodeError) as exc:
        raise HostNotFound(f"webhook_url's host {parsed.host!r} could not be resolved") from exc
    addresses = tuple(dict.fromkeys(str(info[4][0]).split("%")[0] for info in infos))
    if not addresses:
        raise HostNotFound(f"webhook_url's host {parsed.host!r} could not be resolved")
    for address in addresses:  # one internal answer refuses the name: no mixing public and private
        if kind := refusal(ipaddress.ip_address(address), allow):
            raise WebhookRefused(
                f"webhook_url points to a {kind} address; webhooks go only to public addresses unless the "
                "operator allows that network (VOXSWAP_WEBHOOK_ALLOW_NETWORKS)")
    return Target(parsed, addresses)


# -- signatures -------------------------------------------------------------------------------


def sign(secret: str, body: bytes, timestamp: int) -> str:
    """The ``X-Voxswap-Signature`` value for ``body`` sent at ``timestamp`` (unix seconds)."""
    digest = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={digest}"


def verify_signature(secret: str, header: str, body: bytes, tolerance_s: float = 300.0) -> bool:
    """True when ``header`` (``X-Voxswap-Signature``) signs ``body`` with ``secret`` and its time is
    within ``tolerance_s`` of now (an old delivery replayed later fails).

    For receivers: it needs only ``hashlib``, ``hmac`` and ``time``, so copy it as it is. Pass the raw
    body bytes as received, before any JSON parsing; several ``v1=`` values (while a secret is
    rotated) pass when any one matches.
    """
    fields = [part.partition("=") for part in header.split(",")]
    stamps = [value.strip() for key, _, value in fields if key.strip() == "t"]
    signatures = [value.strip().encode() for key, _, value in fields if key.strip() == "v1"]
    if len(stamps) != 1 or not (stamps[0].isascii() and stamps[0].isdigit() and len(stamps[0]) <= 12) \
            or not signatures:
        return False
    if abs(time.time() - int(stamps[0])) > tolerance_s:
        return False
    expected = hmac.new(secret.encode(), stamps[0].encode() + b"." + body, hashlib.sha256).hexdigest().encode()
    return any(hmac.compare_digest(expected, signature) for signature in signatures)


def load_secret(settings: Settings) -> str:
    """The signing secret: the setting, or the data dir's file, generated by the first process that
    needs it (created beside and linked into place, so a peer never reads half of one). Blocking."""
    if settings.webhook_secret is not None:
        return settings.webhook_secret.get_secret_value()
    path = settings.data_dir / SECRET_FILE
    if not path.exists():
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{SECRET_FILE}.{uuid.uuid4().hex}.tmp")
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as fh:
            fh.write(secrets.token_hex(32) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
            log.warning("generated the webhook signing secret; give it to webhook receivers",
                        extra={"event": "webhook_secret_generated", "path": str(path)})
        except FileExistsError:
            pass  # another process of this data dir was first: everyone signs with its secret
        finally:
            tmp.unlink(missing_ok=True)
    secret = path.read_text().strip()
    if not secret:
        raise ValueError(f"{path} is empty: delete it (a new one is generated) or set VOXSWAP_WEBHOOK_SECRET")
    log.info("webhooks are signed with the secret in the data dir",
             extra={"event": "webhook_secret", "path": str(path)})
    return secret


# -- delivery ---------------------------------------------------------------------------------


class WebhookSender:
    """This process's webhook deliveries: one task per finished job, retried, cancelled on stop.

    ``verify`` is httpx's: True checks certificates against the system's authorities (tests pass
    their own authority's context).
    """

    def __init__(self, store: JobQueue, settings: Settings, metrics: Metrics, *,
                 verify: ssl.SSLContext | bool = True):
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.verify = verify
        self._tasks: set[asyncio.Task[None]] = set()
        self._secret: str | None = None

    def notify(self, job: Job) -> None:
        """Deliver the webhook of a job that just finished, if it has one."""
        if job.webhook_url and job.status in ("completed", "failed"):
            task = asyncio.create_task(self._deliver(job), name=f"voxswap-webhook-{job.id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def stop(self) -> None:
        """Cancel the deliveries under way; a peer (or the next start) adopts them from the store."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _deliver(self, job: Job) -> None:
        """POST the job as signed JSON until a 2xx, with doubling waits; the outcome is kept on the job."""
        assert job.webhook_url
        event = f"job.{job.status}"
        payload: dict[str, Any] = {"event": event, "job": job.to_json()}
        if job.status == "completed":
            with contextlib.suppress(OSError, ValueError):
                payload["text"] = (await asyncio.to_thread(self.store.read_result, job)).get("text")
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "voxswap-webhook", "X-Voxswap-Job": job.id,
                   "Idempotency-Key": f"{job.id}:{event}"}
        try:
            if self._secret is None:
                self._secret = await asyncio.to_thread(load_secret, self.settings)
        except (OSError, ValueError):  # never unsigned: the job says so, the log says why
            log.exception("webhook not sent: no signing secret", extra={"event": "webhook_failed", "job": job.id})
            await asyncio.to_thread(self.store.record_webhook, job.id, "failed", 0,
                                    "not sent: the server could not read its signing secret (see its log)")
            self.metrics.webhooks.labels("failed").inc()
            return
        await asyncio.to_thread(self.store.record_webhook, job.id, "sending", 0, None)
        delay, error, attempt = self.settings.webhook_backoff_s, None, 0
        async with httpx.AsyncClient(timeout=self.settings.webhook_timeout_s, follow_redirects=False,
                                     trust_env=False, verify=self.verify) as client:
            for attempt in range(1, self.settings.webhook_attempts + 1):
                try:
                    error = await self._attempt(client, job.webhook_url, body, headers, self._secret)
                except HostNotFound as exc:
                    error = UNREACHABLE
                    log.info("webhook attempt failed", extra={"event": "webhook_retry", "job": job.id,
                                                              "reason": exc.message})
                except WebhookRefused as exc:  # its name now points inside: no retry will be allowed
                    log.warning("webhook refused", extra={"event": "webhook_refused", "job": job.id,
                                                          "reason": exc.message})
                    error = REFUSED
                    break
                except Exception as exc:  # the detail goes to the log for operators, not to the client
                    error = UNREACHABLE
                    log.info("webhook attempt failed", extra={"event": "webhook_retry", "job": job.id,
                                                              "reason": f"{type(exc).__name__}: {exc}"[:300]})
                if error is None:
                    await asyncio.to_thread(self.store.record_webhook, job.id, "delivered", attempt, None)
                    self.metrics.webhooks.labels("delivered").inc()
                    log.info("webhook delivered", extra={"event": "webhook_done", "job": job.id, "attempt": attempt})
                    return
                await asyncio.to_thread(self.store.record_webhook, job.id, "sending", attempt, error)
                if attempt < self.settings.webhook_attempts:
                    await asyncio.sleep(delay)
                    delay *= 2
        await asyncio.to_thread(self.store.record_webhook, job.id, "failed", attempt, error)
        self.metrics.webhooks.labels("failed").inc()
        log.warning("webhook gave up", extra={"event": "webhook_failed", "job": job.id, "reason": error})

    async def _attempt(self, client: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str],
                       secret: str) -> str | None:
        """One signed POST to a checked address of ``url``: None when it was accepted (2xx), else
        ``HTTP <status>``. An address that takes no connection passes the turn to the next one."""
        async with asyncio.timeout(self.settings.webhook_timeout_s * 2):  # resolving, then the request
            target = await resolve(url, self.settings.webhook_allow_networks, timeout_s=self.settings.webhook_timeout_s)
            headers = {**headers, "Host": target.host_header,
                       SIGNATURE_HEADER: sign(secret, body, int(time.time()))}
            extensions = {"sni_hostname": target.sni_hostname} if target.sni_hostname else {}
            for n, address in enumerate(target.addresses, 1):
                try:
                    async with client.stream("POST", target.request_url(address), content=body, headers=headers,
                                             extensions=extensions) as response:  # the body is never read
                        return None if response.is_success else f"HTTP {response.status_code}"
                except httpx.ConnectError:
                    if n == len(target.addresses):
                        raise
        raise AssertionError("unreachable: resolve() returns at least one address")
