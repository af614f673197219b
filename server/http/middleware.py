"""The ASGI layer every HTTP request passes: request id, upload size limit, request metrics."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi.responses import JSONResponse

from server.errors import PayloadTooLarge, envelope
from server.logs import request_id_var
from server.service.context import AppContext

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
UPLOAD_PREFIXES = ("/api/transcribe", "/v1/audio/", "/admin/model/versions", "/api/jobs")
UPLOAD_ROUTES = frozenset({"/api/transcribe", "/v1/audio/transcriptions", "/admin/model/versions", "/api/jobs"})
UNCOUNTED_PATHS = frozenset({"/health", "/health/live", "/health/ready", "/metrics"})  # probes and scrapes
TRANSCRIPTION_PREFIXES = ("/api/transcribe", "/v1/audio/")  # what voxswap_requests_in_flight counts


class RequestContextMiddleware:
    """Request id, upload size limit, and request metrics, as plain ASGI (no per-request copies)."""

    def __init__(self, app: ASGIApp, ctx: AppContext):
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        incoming = headers.get(b"x-request-id", b"").decode("latin-1")
        request_id = incoming if REQUEST_ID_RE.fullmatch(incoming) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        path: str = scope.get("path", "")
        counted = path not in UNCOUNTED_PATHS
        transcription = path.startswith(TRANSCRIPTION_PREFIXES)
        limit = self.ctx.settings.max_upload_bytes
        status = {"code": 500, "version": "none"}
        started = time.perf_counter()
        metrics = self.ctx.metrics
        body_limit: _BodyLimit | None = None
        if transcription:
            metrics.in_flight.inc()
        try:
            if path.startswith(UPLOAD_PREFIXES) and scope.get("method") == "POST":
                length = headers.get(b"content-length")
                if length is not None and length.isdigit() and int(length) > limit:
                    await self._refuse_too_large(send, request_id, int(length), limit)
                    status["code"] = 413
                    metrics.rejections.labels("too_large").inc()
                    return
                receive = body_limit = _BodyLimit(receive, limit)

            async def send_wrapper(message: Message) -> None:
                if body_limit is not None and body_limit.exceeded:
                    # FastAPI answers an error raised while it reads the body with its own 400
                    if message["type"] == "http.response.start":
                        status["code"] = 413
                        metrics.rejections.labels("too_large").inc()
                        await self._refuse_too_large(send, request_id, None, limit)
                    return
                if message["type"] == "http.response.start":
                    status["code"] = message["status"]
                    raw = list(message.get("headers", []))
                    for key, value in raw:
                        if key.lower() == b"x-model-version":
                            status["version"] = value.decode()
                    raw.append((b"x-request-id", request_id.encode()))
                    if self.ctx.lifecycle.draining:
                        # a client told to close now never races the idle-connection close at shutdown
                        raw.append((b"connection", b"close"))
                    message["headers"] = raw
                await send(message)

            await self.app(scope, receive, send_wrapper)
        finally:
            if transcription:
                metrics.in_flight.dec()
            if counted:
                label = self._route_label(scope)
                metrics.requests.labels(label, str(status["code"]), status["version"]).inc()
                metrics.request_duration.labels(label, status["version"]).observe(time.perf_counter() - started)
            request_id_var.reset(token)

    @staticmethod
    def _route_label(scope: Scope) -> str:
        """The route's template (never the raw path: one series per job id would be unbounded). An
        upload refused before routing (413 from its Content-Length) still gets its route's name."""
        route = getattr(scope.get("route"), "path", None)
        if route is None and scope.get("path") in UPLOAD_ROUTES:
            route = scope["path"]
        return route or "unmatched"

    async def _refuse_too_large(self, send: Send, request_id: str, length: int | None, limit: int) -> None:
        message = (f"the upload is {length} bytes; this server accepts at most {limit} bytes" if length
                   else f"the upload exceeds {limit} bytes, the most this server accepts")
        body = envelope(message, type_="invalid_request_error", code="payload_too_large", param="file",
                        request_id=request_id)
        response = JSONResponse(body, status_code=413, headers={"x-request-id": request_id,
                                                                "connection": "close"})
        await response({"type": "http"}, _no_body, send)


async def _no_body() -> Message:
    return {"type": "http.disconnect"}


class _BodyLimit:
    """Count body bytes as they arrive, for uploads sent without a Content-Length."""

    def __init__(self, receive: Receive, limit: int):
        self.receive = receive
        self.limit = limit
        self.seen = 0
        self.exceeded = False

    async def __call__(self) -> Message:
        message = await self.receive()
        if message["type"] == "http.request":
            self.seen += len(message.get("body", b""))
            if self.seen > self.limit:
                self.exceeded = True
                raise PayloadTooLarge(f"the upload is larger than {self.limit} bytes", param="file")
        return message
