"""The ASGI layer every HTTP request and WebSocket handshake passes: request id, the guard, request
metrics (WebSockets have their own, see ``server.http.realtime``).

The guard (``http/guard.py``) answers 401/403/429/413 from the headers before the app sees the
request, and its :class:`~server.http.guard.BodyReader` answers 413/408 for a body that turns out
too big or too slow while the app reads it.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi.responses import JSONResponse

from server.errors import VoxswapError, envelope
from server.http.guard import Guard, upload_template
from server.logs import request_id_var, websocket_denied
from server.service.context import AppContext

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
UNCOUNTED_PATHS = frozenset({"/health", "/health/live", "/health/ready", "/metrics"})  # probes and scrapes
TRANSCRIPTION_PREFIXES = ("/api/transcribe", "/v1/audio/")  # what voxswap_requests_in_flight counts
REJECTION_REASONS = {401: "unauthorized", 403: "unauthorized", 408: "slow_client", 413: "too_large",
                     429: "rate_limited"}


class RequestContextMiddleware:
    """Request id, the guard, and request metrics, as plain ASGI (no per-request copies)."""

    def __init__(self, app: ASGIApp, ctx: AppContext):
        self.app = app
        self.ctx = ctx
        self.guard = Guard(ctx.settings)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        request_id = _request_id(headers)
        token = request_id_var.set(request_id)
        path: str = scope.get("path", "")
        counted = path not in UNCOUNTED_PATHS
        transcription = path.startswith(TRANSCRIPTION_PREFIXES)
        status = {"code": 500, "model": "none", "version": "none"}
        started = time.perf_counter()
        metrics = self.ctx.metrics
        # a body the app leaves unread must not be read (and thrown away) after the answer: close instead
        has_body = headers.get(b"content-length", b"0") != b"0" or b"transfer-encoding" in headers
        if transcription:
            metrics.in_flight.inc()
        try:
            try:
                limit = self.guard.admit(scope, headers)
            except VoxswapError as exc:
                await self._refuse(send, exc, request_id, close=has_body, status=status)
                return
            reader = self.guard.reader(receive, scope, limit)

            async def send_wrapper(message: Message) -> None:
                if reader.failure is not None:
                    # FastAPI answers an error raised while it reads the body with its own 400
                    if message["type"] == "http.response.start":
                        await self._refuse(send, reader.failure, request_id, close=True, status=status)
                    return
                if message["type"] == "http.response.start":
                    status["code"] = message["status"]
                    raw = list(message.get("headers", []))
                    for key, value in raw:
                        if key.lower() == b"x-model-version":
                            status["version"] = value.decode()
                        elif key.lower() == b"x-model":
                            status["model"] = value.decode()
                    raw.append((b"x-request-id", request_id.encode()))
                    if self.ctx.lifecycle.draining or (has_body and not reader.complete):
                        # a client told to close now never races the idle-connection close at shutdown
                        raw.append((b"connection", b"close"))
                    message["headers"] = raw
                await send(message)

            await self.app(scope, reader, send_wrapper)
        finally:
            if transcription:
                metrics.in_flight.dec()
            if counted:
                label = self._route_label(scope)
                metrics.requests.labels(label, str(status["code"]), status["model"], status["version"]).inc()
                metrics.request_duration.labels(label, status["model"], status["version"]).observe(
                    time.perf_counter() - started)
            request_id_var.reset(token)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A WebSocket's logs carry a request id for its whole life; the guard (API keys, rate) runs
        on its handshake, and a refusal is an HTTP answer in the error envelope where the server
        can send one (uvicorn can), else a close before accept."""
        headers = dict(scope.get("headers") or [])
        request_id = _request_id(headers)
        token = request_id_var.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        try:
            try:
                self.guard.admit(scope, headers)
            except VoxswapError as exc:
                self.ctx.metrics.rejections.labels(REJECTION_REASONS.get(exc.status_code, "refused")).inc()
                await deny_websocket(send, scope, exc, request_id)
                return
            await self.app(scope, receive, send)
        finally:
            request_id_var.reset(token)

    @staticmethod
    def _route_label(scope: Scope) -> str:
        """The route's template (never the raw path: one series per job id would be unbounded). An
        upload refused before routing (413 from its Content-Length) still gets its route's name."""
        route = getattr(scope.get("route"), "path", None)
        if route is None:
            route = upload_template(scope.get("method"), scope.get("path", ""))
        return route or "unmatched"

    async def _refuse(self, send: Send, exc: VoxswapError, request_id: str, *, close: bool,
                      status: dict[str, Any]) -> None:
        """Answer in the error envelope without the app; closing when a body may still be coming."""
        status["code"] = exc.status_code
        self.ctx.metrics.rejections.labels(REJECTION_REASONS.get(exc.status_code, "refused")).inc()
        body = envelope(exc.message, type_=exc.type, code=exc.code, param=exc.param, request_id=request_id)
        headers = {"x-request-id": request_id}
        if close or self.ctx.lifecycle.draining:
            headers["connection"] = "close"
        if exc.retry_after:
            headers["retry-after"] = str(max(1, math.ceil(exc.retry_after)))
        if exc.status_code == 401:
            headers["www-authenticate"] = "Bearer"
        await JSONResponse(body, status_code=exc.status_code, headers=headers)({"type": "http"}, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}


def _request_id(headers: dict[bytes, bytes]) -> str:
    incoming = headers.get(b"x-request-id", b"").decode("latin-1")
    return incoming if REQUEST_ID_RE.fullmatch(incoming) else uuid.uuid4().hex


async def deny_websocket(send: Send, scope: Scope, exc: VoxswapError, request_id: str) -> None:
    """Refuse a handshake with an HTTP answer (ASGI's WebSocket denial response) in the error envelope,
    or, where the server cannot send one, a close before accept (which clients see as a bare 403)."""
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008, "reason": exc.message[:120]})
        return
    websocket_denied.set(True)  # see server.logs.DeniedHandshakeFilter
    body = json.dumps(envelope(exc.message, type_=exc.type, code=exc.code, param=exc.param,
                               request_id=request_id)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"x-request-id", request_id.encode())]
    if exc.retry_after:
        headers.append((b"retry-after", str(max(1, math.ceil(exc.retry_after))).encode()))
    await send({"type": "websocket.http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": body})
