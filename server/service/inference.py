"""Admission control for CPU-bound work: a named, bounded thread pool and a bounded queue.

Requests beyond ``inference_workers + max_queue`` are refused at once with 503 and Retry-After
instead of piling up; a request whose work outlives the timeout is answered 504 while its thread
finishes (its slot is only given back when the thread is really done). The work is decoding and
inference together (see ``TranscriptionService.transcribe``): nothing CPU- or memory-heavy about a
request happens before it is admitted here.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from server.errors import InferenceTimeout, Overloaded
from server.metrics import Metrics

T = TypeVar("T")


class InferencePool:
    def __init__(self, *, workers: int, max_queue: int, timeout_s: float, metrics: Metrics):
        self.workers = workers
        self.capacity = workers + max_queue
        self.timeout_s = timeout_s
        self.metrics = metrics
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="voxswap-infer")
        self._admitted = 0
        self._running = 0

    @property
    def admitted(self) -> int:
        return self._admitted

    @property
    def queued(self) -> int:
        return max(0, self._admitted - self._running)

    def check_capacity(self) -> None:
        """Refuse when ``inference_workers + max_queue`` requests are already admitted."""
        if self._admitted >= self.capacity:
            self.metrics.rejections.labels("overloaded").inc()
            raise Overloaded(
                f"the server is at capacity ({self._admitted} requests admitted); retry shortly",
                retry_after=1,
            )

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """Run ``fn(*args)`` on an inference thread; only call from the event loop."""
        self.check_capacity()
        loop = asyncio.get_running_loop()
        self._admitted += 1
        self._publish()

        def job() -> T:
            loop.call_soon_threadsafe(self._started)
            return fn(*args)

        # run_in_executor does not carry contextvars over (asyncio.to_thread does): copy them, so
        # every log line of the request keeps its request id on the inference thread too
        future = loop.run_in_executor(self._executor, contextvars.copy_context().run, job)
        future.add_done_callback(self._finished)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.timeout_s)
        except TimeoutError as exc:
            self.metrics.rejections.labels("timeout").inc()
            raise InferenceTimeout(f"inference took longer than {self.timeout_s:g} s") from exc

    def _started(self) -> None:
        self._running += 1
        self._publish()

    def _finished(self, _: object) -> None:
        self._admitted -= 1
        self._running = max(0, self._running - 1)
        self._publish()

    def _publish(self) -> None:
        self.metrics.queue_depth.set(self.queued)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=False)
