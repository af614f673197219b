"""The engines of one model in this process: the live one, and at most one staged candidate beside it.

A request leases the live engine (or pins a loaded one) for its whole duration and is answered by,
and labelled with, the version it leased, whatever happens to the pointer meanwhile. The holder is
the only place engines change hands:

- ``flip`` makes a candidate live under the lock that leases take, so no request sees half of it;
- ``stage`` keeps a smoke-tested candidate beside the live one (pinnable) until a rollout commits;
- ``retire`` waits for the old engine's leases to end, up to the drain timeout, then closes it and
  measures the resident memory that came back. An engine still leased when the timeout passes is
  closed by its last lease instead, so nothing is freed under a running request.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from server.engines.base import BaseEngine
from server.errors import NotReady, VersionNotLoaded
from server.lifecycle.report import SwapReport
from server.lifecycle.smoke import SmokeReport
from server.storage.manifest import Manifest


@dataclass(eq=False)
class LoadedModel:
    """One version's engine plus what we learned loading it; ``leases`` counts requests using it."""

    version: str
    path: Path
    manifest: Manifest
    engine: BaseEngine
    loaded_at: float
    load_s: float
    memory_bytes: int
    smoke: SmokeReport
    leases: int = 0
    retired: bool = False
    drain_expired: bool = False  # retired, and the drain timeout passed with leases still held


    def describe(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "path": str(self.path),
            "model_file": self.engine.model_file,
            "device": self.engine.device,
            "providers": self.engine.providers,
            "loaded_at": self.loaded_at,
            "load_s": round(self.load_s, 4),
            "memory_bytes": self.memory_bytes,
            "in_flight": self.leases,
            "smoke": self.smoke.to_json(),
        }


@dataclass
class Retirement:
    """What retiring an engine measured: how long the drain and the free took, and the memory back."""

    drained: bool
    in_flight_at_drain_end: int
    drain_s: float
    free_s: float
    rss_before_free_bytes: int
    rss_after_free_bytes: int

    @property
    def freed_bytes(self) -> int:
        return max(0, self.rss_before_free_bytes - self.rss_after_free_bytes)

    def record_in(self, report: SwapReport) -> None:
        report.drained = self.drained
        report.timings.update(drain_s=self.drain_s, free_s=self.free_s)
        report.memory.update(in_flight_at_drain_end=self.in_flight_at_drain_end,
                             rss_before_free_bytes=self.rss_before_free_bytes,
                             rss_after_free_bytes=self.rss_after_free_bytes, freed_bytes=self.freed_bytes)


def malloc_trim() -> None:
    """Hand freed heap pages back to the OS; glibc keeps them otherwise and RSS never drops."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


_PROCESS = psutil.Process()


def resident_bytes() -> int:
    return int(_PROCESS.memory_info().rss)


class ModelHolder:
    """Owns the live and staged engines of one model; every method is safe from any thread."""

    def __init__(self, *, drain_timeout_s: float, unavailable: Callable[[], str]):
        """``unavailable`` says why nothing is live, for the 503 a lease answers meanwhile."""
        self.drain_timeout_s = drain_timeout_s
        self._unavailable = unavailable
        self._cond = threading.Condition()
        self._live: LoadedModel | None = None
        self._candidate: LoadedModel | None = None

    @property
    def live(self) -> LoadedModel | None:
        return self._live

    @property
    def candidate(self) -> LoadedModel | None:
        return self._candidate

    def loaded_versions(self) -> list[str]:
        return [m.version for m in (self._live, self._candidate) if m is not None]

    def in_flight(self) -> int:
        with self._cond:
            return sum(m.leases for m in (self._live, self._candidate) if m is not None)

    @contextmanager
    def lease(self, version: str | None = None) -> Iterator[LoadedModel]:
        """The live version (or a pinned loaded one) for the duration of one request."""
        with self._cond:
            model = self._pick(version)
            model.leases += 1
        try:
            yield model
        finally:
            with self._cond:
                model.leases -= 1
                last = model.leases == 0
                self._cond.notify_all()
            if last and model.retired:
                model.engine.close()  # a retirement whose drain timed out left the free to the last lease

    def _pick(self, version: str | None) -> LoadedModel:
        live = self._live
        if version is None or (live is not None and version == live.version):
            if live is None:
                raise NotReady(self._unavailable(), retry_after=1)
            return live
        candidate = self._candidate
        if candidate is not None and candidate.version == version:
            return candidate
        raise VersionNotLoaded(
            f"version {version!r} is not loaded here; loaded: {', '.join(self.loaded_versions()) or 'none'}",
            param="model",
        )

    def flip(self, candidate: LoadedModel) -> LoadedModel | None:
        """Make ``candidate`` live (taking it out of staging if it was staged); the old one returns
        to the caller, still open, for :meth:`retire`."""
        with self._cond:
            old, self._live = self._live, candidate
            if self._candidate is candidate:
                self._candidate = None
        return old if old is not candidate else None

    def take_live(self) -> LoadedModel | None:
        """Stop serving: nothing is live afterwards; the old engine returns for :meth:`retire`."""
        with self._cond:
            old, self._live = self._live, None
        return old

    def stage(self, candidate: LoadedModel) -> None:
        """Hold a smoke-tested candidate beside the live one; one it replaces goes when idle."""
        with self._cond:
            previous, self._candidate = self._candidate, candidate
        if previous is not None and previous is not candidate:
            self.free_when_idle(previous)

    def discard_candidate(self) -> bool:
        """Drop the staged candidate, if any (now, or when its last pinned request ends)."""
        with self._cond:
            candidate, self._candidate = self._candidate, None
        if candidate is None:
            return False
        self.free_when_idle(candidate)
        malloc_trim()
        return True

    def free_when_idle(self, model: LoadedModel) -> None:
        """Close a model nobody may lease any more: now, or when its last pinned request ends."""
        with self._cond:
            model.retired = True
            idle = model.leases == 0
        if idle:
            model.engine.close()

    def retire(self, old: LoadedModel) -> Retirement:
        """Wait for ``old``'s requests (up to the drain timeout), then free it and measure."""
        started = time.perf_counter()
        deadline = time.monotonic() + self.drain_timeout_s
        with self._cond:
            old.retired = True
            while old.leases > 0 and time.monotonic() < deadline:
                self._cond.wait(timeout=max(0.0, deadline - time.monotonic()))
            in_flight = old.leases
            old.drain_expired = in_flight > 0  # long holders (a pinned realtime session) see it and let go
        drain_s = time.perf_counter() - started
        started = time.perf_counter()
        rss_before = resident_bytes()
        if in_flight == 0:
            old.engine.close()
        del old
        # No gc.collect(): the session has no reference cycles, so closing it frees it, and a full
        # collection would hold the GIL for tens of milliseconds while requests are being served.
        malloc_trim()
        return Retirement(drained=in_flight == 0, in_flight_at_drain_end=in_flight, drain_s=drain_s,
                          free_s=time.perf_counter() - started, rss_before_free_bytes=rss_before,
                          rss_after_free_bytes=resident_bytes())

    def close_all(self) -> None:
        """At shutdown: close whatever is loaded, live or staged."""
        with self._cond:
            models = [m for m in (self._live, self._candidate) if m is not None]
            self._live = self._candidate = None
        for model in models:
            model.engine.close()
