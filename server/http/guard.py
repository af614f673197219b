"""The door every HTTP request passes before its body is read: who is calling, may they, and how
much they may send.

Everything :meth:`Guard.admit` decides comes from the request line and the headers alone, so a
client without a credential, over its rate, or announcing a body bigger than its route takes is
answered before one byte of the body is read (issue 18, finding A: a 300 MB body sent to an admin
route without a token used to be parsed in full before the 401). What is let in is read through
:class:`BodyReader`, which counts the body against the route's limit as it arrives and drops a
client that stalls or trickles (finding F), so no body ever waits in memory for a slow sender.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import re
import time
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.errors import PayloadTooLarge, RequestTimeout, TooManyRequests, Unauthorized, VoxswapError
from server.http.deps import Client, bearer_token, check_admin, is_admin_token
from server.settings import Settings

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]

log = logging.getLogger("voxswap.guard")

# (method, path) of the routes that take an upload: bounded by max_upload_bytes, every other
# request by the small max_body_bytes
UPLOAD_ROUTES = frozenset({("POST", "/api/transcribe"), ("POST", "/v1/audio/transcriptions"),
                           ("POST", "/api/jobs"), ("POST", "/admin/model/versions")})
NAMED_UPLOAD = re.compile(r"/admin/models/[^/]+/versions")  # a version upload to a named model
NAMED_UPLOAD_TEMPLATE = "/admin/models/{model}/versions"
# what a client API key opens when keys are configured; health, metrics, the page and /docs stay open
KEYED_PREFIXES = ("/api/transcribe", "/v1/audio/", "/v1/models", "/v1/realtime", "/api/jobs")
ADMIN = Client(key_id="admin", label="admin", admin=True)  # "admin" can never be a key's 16-hex id
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def route_path(scope: Scope) -> str:
    """The path the router matches (Starlette strips ``root_path`` the same way)."""
    path: str = scope.get("path", "")
    root = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root):].startswith("/"):
        return path[len(root):]
    return path


def upload_template(method: str | None, path: str) -> str | None:
    """The route template of an upload route (bounded by ``max_upload_bytes``), else None."""
    if method != "POST":
        return None
    if ("POST", path) in UPLOAD_ROUTES:
        return path
    return NAMED_UPLOAD_TEMPLATE if NAMED_UPLOAD.fullmatch(path) else None


def is_admin_path(path: str) -> bool:
    return path == "/admin" or path.startswith("/admin/")


def key_id_of(digest: str) -> str:
    """A stable, non-secret name for a key: the first 16 hex digits of its SHA-256."""
    return digest[:16]


@dataclass(frozen=True)
class KeyEntry:
    key_id: str
    label: str | None


def parse_keys(text: str) -> tuple[dict[str, KeyEntry], list[int]]:
    """``{sha256 hex: entry}`` from a keys file, and the numbers of the lines that were not keys.

    A line is a key, or ``sha256:<64 hex>`` of one, optionally followed by whitespace and a label;
    blank lines and lines starting with ``#`` are skipped.
    """
    keys: dict[str, KeyEntry] = {}
    bad: list[int] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        secret, *rest = line.split(None, 1)
        if secret.lower().startswith("sha256:"):
            digest = secret[len("sha256:"):].lower()
            if not _SHA256_HEX.fullmatch(digest):
                bad.append(number)
                continue
        else:
            digest = hashlib.sha256(secret.encode()).hexdigest()
        keys[digest] = KeyEntry(key_id_of(digest), rest[0].strip() if rest else None)
    return keys, bad


class ApiKeys:
    """The client keys file, re-read when it changes.

    Keys are held only as SHA-256 digests: a presented key is hashed and looked up, so how long the
    lookup takes depends on the digest, never on how much of a real key a caller guessed. The file
    is stat'ed at most once a second (a change takes effect within a second, without a restart); a
    file that cannot be read leaves no key valid, closed rather than open, and is logged once.
    """

    CHECK_INTERVAL_S = 1.0

    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic):
        self.path = path
        self._clock = clock
        self._keys: dict[str, KeyEntry] = {}
        self._signature: tuple[int, int, int] | None = None  # inode, size, mtime of what was read
        self._checked = clock()
        self._refresh()

    def lookup(self, key: str) -> KeyEntry | None:
        now = self._clock()
        if now - self._checked >= self.CHECK_INTERVAL_S:
            self._checked = now
            self._refresh()
        return self._keys.get(hashlib.sha256(key.encode()).hexdigest())

    def __len__(self) -> int:
        return len(self._keys)

    def _refresh(self) -> None:
        try:
            stat = os.stat(self.path)
            signature = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
            if signature == self._signature:
                return
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            if self._signature != (0, 0, 0):
                log.error("the API keys file cannot be read: every request that needs a key gets 401 "
                          "until it can", extra={"event": "api_keys_unreadable", "path": str(self.path),
                                                 "reason": f"{type(exc).__name__}: {exc}"})
            self._keys, self._signature = {}, (0, 0, 0)
            return
        self._keys, bad = parse_keys(text)
        self._signature = signature
        log.info("API keys loaded", extra={"event": "api_keys_loaded", "path": str(self.path),
                                           "keys": len(self._keys)})
        if bad:
            log.warning("lines of the API keys file that are no key were ignored (a sha256: entry needs 64 "
                        "hex digits)", extra={"event": "api_keys_bad_lines", "lines": bad[:20]})


class RateLimiter:
    """A token bucket per key: ``burst`` requests at once, then ``rate`` a second. One per process,
    so under gunicorn a key gets ``workers`` times the rate in all."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = float(burst)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, when counted)

    def take(self, key_id: str) -> float:
        """0 when the request may go (a token is taken), else the seconds until a token is there."""
        now = self._clock()
        tokens, then = self._buckets.get(key_id, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        if tokens >= 1.0:
            self._buckets[key_id] = (tokens - 1.0, now)
            return 0.0
        self._buckets[key_id] = (tokens, now)
        return (1.0 - tokens) / self.rate


class Guard:
    """Answers 401/403/429/413 from the headers, and says who the caller is.

    The caller goes into ``scope["state"]["client"]`` as a :class:`~server.http.deps.Client`, which
    routes read through ``ClientDep``: the admin token on ``/admin`` and (as an admin) on the keyed
    routes, a client API key on the keyed routes; nothing else is recorded (an anonymous client).
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self.keys = ApiKeys(settings.api_keys_file) if settings.api_keys_file is not None else None
        self.rate = (RateLimiter(settings.api_key_rate_per_s, settings.api_key_burst)
                     if settings.api_key_rate_per_s > 0 else None)

    def admit(self, scope: Scope, headers: Mapping[bytes, bytes]) -> int:
        """Raise what the headers alone already decide; return the body limit of the request."""
        path = route_path(scope)
        authorization = headers.get(b"authorization", b"").decode("latin-1")
        if is_admin_path(path):
            check_admin(self.settings, authorization)
            scope.setdefault("state", {})["client"] = ADMIN
        elif self.keys is not None and path.startswith(KEYED_PREFIXES):
            client = self._client(bearer_token(authorization))
            scope.setdefault("state", {})["client"] = client
            if self.rate is not None and client.key_id is not None and not client.admin:
                wait = self.rate.take(client.key_id)
                if wait > 0:
                    raise TooManyRequests(
                        f"this API key may make {self.settings.api_key_rate_per_s:g} requests a second; "
                        f"try again in {math.ceil(wait)} s", retry_after=wait)
        upload = upload_template(scope.get("method"), path) is not None
        limit = self.settings.max_upload_bytes if upload else self.settings.max_body_bytes
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > limit:
            raise too_large(upload, limit, int(length))
        return limit

    def _client(self, token: str | None) -> Client:
        if token is None:
            raise Unauthorized("this server needs an API key: send 'Authorization: Bearer <key>'")
        if is_admin_token(self.settings, token):
            return ADMIN
        assert self.keys is not None
        entry = self.keys.lookup(token)
        if entry is None:
            raise Unauthorized("the API key is not valid")
        return Client(key_id=entry.key_id, label=entry.label)

    def reader(self, receive: Receive, scope: Scope, limit: int) -> BodyReader:
        upload = upload_template(scope.get("method"), route_path(scope)) is not None
        return BodyReader(receive, limit=limit, upload=upload, timeout_s=self.settings.body_timeout_s,
                          min_rate=self.settings.min_upload_rate_bytes)


def too_large(upload: bool, limit: int, length: int | None = None) -> PayloadTooLarge:
    what, where = ("upload", "this server") if upload else ("request body", "this route")
    message = (f"the {what} is {length} bytes; {where} accepts at most {limit} bytes" if length
               else f"the {what} exceeds {limit} bytes, the most {where} accepts")
    return PayloadTooLarge(message, param="file" if upload else None)


class BodyReader:
    """The request body as the app reads it: counted against the route's limit, and timed.

    A client that sends nothing for ``timeout_s``, or that averages under ``min_rate`` bytes a second
    once it has taken ``timeout_s`` (checked as each piece arrives, so at most ``timeout_s`` late),
    gets 408 instead of holding the request open. Only the time spent waiting for the client
    counts, not the app's own time between reads. Once the body is
    complete, reads pass straight through: they wait for a disconnect, which may rightly be long.
    The first failure is kept in ``failure`` for the middleware to answer with.
    """

    def __init__(self, receive: Receive, *, limit: int, upload: bool, timeout_s: float, min_rate: int):
        self._receive = receive
        self.limit = limit
        self.upload = upload
        self.timeout_s = timeout_s
        self.min_rate = min_rate
        self.seen = 0
        self.waited = 0.0
        self.complete = False
        self.failure: VoxswapError | None = None

    async def __call__(self) -> Message:
        if self.failure is not None:
            raise self.failure
        if self.complete:
            return await self._receive()
        started = time.monotonic()
        try:
            message = await asyncio.wait_for(self._receive(), timeout=self.timeout_s)
        except TimeoutError:
            self.failure = RequestTimeout(f"the request body stalled: nothing arrived for {self.timeout_s:g} s")
            raise self.failure from None
        finally:
            self.waited += time.monotonic() - started
        if message["type"] != "http.request":
            self.complete = True  # http.disconnect
            return message
        self.seen += len(message.get("body", b""))
        self.complete = not message.get("more_body", False)
        if self.seen > self.limit:
            self.failure = too_large(self.upload, self.limit)
        elif (not self.complete and self.min_rate and self.waited > self.timeout_s
              and self.seen < self.min_rate * self.waited):
            # each piece came within the stall timeout, but a byte now and then is a held connection
            self.failure = RequestTimeout(f"the request body arrived too slowly ({self.seen / self.waited:.0f} "
                                          f"bytes/s); this server needs at least {self.min_rate} bytes/s")
        if self.failure is not None:
            raise self.failure
        return message
