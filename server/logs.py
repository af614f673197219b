"""One logging configuration: text or JSON lines, a request id on every line of a request,
operational events with their fields, and quiet access lines for /health and /metrics.
"""

from __future__ import annotations

import contextvars
import json
import logging
import logging.handlers
import threading
import time
from pathlib import Path
from typing import Any

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "request_id", "color_message"}
QUIET_PATHS = ("/health", "/metrics")


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get() or "-"
        return True


# set (never reset) by a task that refused a WebSocket handshake with an HTTP answer: uvicorn's
# sans-io protocol then logs "returned without completing handshake" at ERROR from that same task,
# for what is a complete answer (ASGI's websocket.http.response), not a failure
websocket_denied: contextvars.ContextVar[bool] = contextvars.ContextVar("voxswap_websocket_denied", default=False)
DENIED_HANDSHAKE_LINE = "ASGI callable returned without completing handshake."


class DeniedHandshakeFilter(logging.Filter):
    """Drop uvicorn's error line for a handshake voxswap refused on purpose (a 503 when full)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (websocket_denied.get() and record.msg == DENIED_HANDSHAKE_LINE)


def quiet_denied_handshakes() -> None:
    """Install :class:`DeniedHandshakeFilter` on uvicorn's error logger (once): the app does, since
    its own refusals cause the line, whoever configured logging."""
    server_errors = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, DeniedHandshakeFilter) for f in server_errors.filters):
        server_errors.addFilter(DeniedHandshakeFilter())


class QuietAccessFilter(logging.Filter):
    """Drop uvicorn access lines for probes and scrapes; they drown the lines that matter."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        path = str(args[2]) if len(args) >= 3 else ""
        return not path.startswith(QUIET_PATHS)


class RateLimitedFilter(logging.Filter):
    """At most ``per_window`` warnings and errors of one kind per ``window_s``; the first one of the
    next window says how many were dropped (``suppressed=N``).

    A kind is the logger and the first line of the message template, so per-connection floods
    (asyncio's "socket.accept() out of system resource" on every accept attempt once descriptors
    run out, uvicorn's "Invalid HTTP request received.", dropped slow clients) cost a few lines,
    not a disk. Info and debug lines always pass.
    """

    MAX_KINDS = 1000

    def __init__(self, per_window: int = 5, window_s: float = 10.0):
        super().__init__()
        self.per_window = per_window
        self.window_s = window_s
        self._lock = threading.Lock()
        self._kinds: dict[tuple[str, str], list[float]] = {}  # kind -> [window start, passed, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        kind = (record.name, str(record.msg).split("\n", 1)[0][:200])
        now = time.monotonic()
        with self._lock:
            state = self._kinds.get(kind)
            if state is None or now - state[0] >= self.window_s:
                if state is None and len(self._kinds) >= self.MAX_KINDS:
                    self._kinds.clear()
                if state is not None and state[2]:
                    record.suppressed = int(state[2])
                self._kinds[kind] = [now, 1, 0]
                return True
            if state[1] < self.per_window:
                state[1] += 1
                return True
            state[2] += 1
            return False


RATE_LIMITED_LOGGERS = ("asyncio", "uvicorn.error", "voxswap.connections")


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s [%(request_id)s] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": round(record.created, 3),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
        }
        data.update(_extras(record))
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def configure_logging(level: str = "INFO", fmt: str = "text", log_file: Path | None = None,
                      quiet_access: bool = True, max_mb: float = 20.0, backups: int = 5) -> None:
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file is not None:
        handlers.append(logging.handlers.RotatingFileHandler(log_file, maxBytes=int(max_mb * 2**20),
                                                             backupCount=backups))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(RequestIdFilter())
        root.addHandler(handler)
    root.setLevel(level.upper())
    route_server_loggers(quiet_access)


def route_server_loggers(quiet_access: bool = True) -> None:
    """uvicorn's and gunicorn's loggers go through the root handlers: one format for every line."""
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "gunicorn.error", "gunicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    access = logging.getLogger("uvicorn.access")
    if quiet_access and not any(isinstance(f, QuietAccessFilter) for f in access.filters):
        access.addFilter(QuietAccessFilter())
    quiet_denied_handshakes()
    for name in RATE_LIMITED_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RateLimitedFilter) for f in logger.filters):
            logger.addFilter(RateLimitedFilter())
