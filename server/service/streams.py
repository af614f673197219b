"""The realtime sessions of one process: how many may open, and how they end when it shuts down.

A process holds at most ``realtime_max_sessions``; beyond that, and from the moment it starts
shutting down, a new session is refused with a 503 before the WebSocket is accepted, so a load
balancer (nginx's ``proxy_next_upstream``) or a reconnecting client goes elsewhere.

Shutdown drains sessions, not connections: each live session finishes the turn it is in (up to
``drain_timeout_s``, then what is pending is committed), sends its ``.completed``, and only then
closes with 1012 (service restart), the code the official client reconnects on. The server waits
for that (:meth:`StreamHub.drained`) before uvicorn closes what is left.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from server.errors import NotReady, Overloaded
from server.service import realtime_events as events
from server.service.stream_session import StreamServices, StreamSession

log = logging.getLogger("voxswap.realtime")
SERVICE_RESTART = 1012


class StreamHub:
    def __init__(self, services: StreamServices):
        self.services = services
        self.sessions: set[StreamSession] = set()
        self.draining = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain = asyncio.Event()  # set (on the loop) when a drain begins
        self._empty = asyncio.Event()
        self._empty.set()

    @property
    def limit(self) -> int:
        return self.services.settings.realtime_max_sessions

    def admit(self) -> None:
        """Before the handshake is accepted: a 503 when shutting down or full."""
        if self.draining:
            raise NotReady("this server is shutting down; connect again to reach another one", retry_after=1)
        if len(self.sessions) >= self.limit:
            self.services.metrics.rejections.labels("overloaded").inc()
            raise Overloaded(f"this server holds its maximum of {self.limit} realtime sessions; retry shortly",
                             retry_after=1)

    def open(self, emit: Callable[[events.Event], None]) -> StreamSession:
        self._loop = asyncio.get_running_loop()
        session = StreamSession(self.services, emit)
        self.sessions.add(session)
        self._empty.clear()
        self.services.metrics.stream_sessions.inc()
        if self.draining:
            session.begin_drain()
        return session

    async def release(self, session: StreamSession) -> None:
        """The connection ended, however: release what the session holds."""
        try:
            await session.close()
        finally:
            if session in self.sessions:
                self.sessions.discard(session)
                self.services.metrics.stream_sessions.dec()
            if not self.sessions:
                self._empty.set()

    def begin_drain(self) -> None:
        """Safe from a signal handler: the loop learns it through ``call_soon_threadsafe``."""
        if self.draining:
            return
        self.draining = True
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        for session in self.sessions:
            session.begin_drain()
        self._drain.set()
        if self.sessions:
            log.info("draining realtime sessions", extra={"event": "realtime_drain", "sessions": len(self.sessions)})

    async def wait_drain(self) -> None:
        await self._drain.wait()

    async def drained(self, timeout_s: float) -> bool:
        """Wait until every session has closed (each bounds its own turn by the drain timeout)."""
        if self._loop is not None and self.draining:
            self._start_drain()  # idempotent; also covers a drain begun before the first session opened
        started = time.monotonic()
        try:
            await asyncio.wait_for(self._empty.wait(), timeout_s)
        except TimeoutError:
            log.warning("realtime sessions still open after the drain timeout; closing them",
                        extra={"event": "realtime_drain_timeout", "sessions": len(self.sessions)})
            return False
        if time.monotonic() - started > 0.05:
            log.info("realtime sessions drained", extra={"event": "realtime_drained",
                                                         "seconds": round(time.monotonic() - started, 3)})
        return True
