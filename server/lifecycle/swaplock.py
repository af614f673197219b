"""One change at a time to a model in this process: a swap, a staging for a peer's rollout, an
unload. Admin calls that find it taken are told so (409 with Retry-After); the background followers
simply try again on their next tick."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from server.errors import SwapInProgress


class SwapLock:
    def __init__(self) -> None:
        self._lock = threading.Lock()

    @property
    def held(self) -> bool:
        return self._lock.locked()

    @contextmanager
    def hold(self, busy_message: str) -> Iterator[None]:
        """Hold it for the block, or raise :class:`SwapInProgress` with ``busy_message`` at once."""
        if not self._lock.acquire(blocking=False):
            raise SwapInProgress(busy_message, retry_after=2)
        try:
            yield
        finally:
            self._lock.release()

    @contextmanager
    def try_hold(self) -> Iterator[bool]:
        """Hold it for the block if it is free; the block learns which (never waits)."""
        acquired = self._lock.acquire(blocking=False)
        try:
            yield acquired
        finally:
            if acquired:
                self._lock.release()
