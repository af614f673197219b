"""Admission control for CPU-bound work: inference threads, a bounded queue, and batching across requests.

Requests beyond ``inference_workers + max_queue`` are refused at once with 503 and Retry-After
instead of piling up; a request whose work outlives the timeout is answered 504 while its thread
finishes (its slot is only given back when the thread is really done). The work is decoding and
inference together (see ``TranscriptionService.transcribe``): nothing CPU- or memory-heavy about a
request happens before it is admitted here, and a request costs one thread hop.

Batching is continuous: a job submitted with a batch key waits in the same queue as any other,
and the thread that takes it also takes the queued jobs with the same key (up to ``batch_max``),
so requests that pile up while the model is busy run as one session call, and a lone request runs
at once. Only while requests have mostly been arriving with others in flight (a smoothed share of
arrivals that found the pool busy) does a thread with an incomplete batch wait up to
``batch_wait_s`` for more: one client at a time never waits, however fast it sends, and under load
the queue forms the batches by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from server.errors import InferenceTimeout, Overloaded
from server.metrics import Metrics

T = TypeVar("T")
BatchFn = Callable[[Sequence[Any]], Sequence[Any]]  # items in, one result (or exception) per item out
SMOOTHING = 0.2  # weight of the newest arrival in the smoothed share of arrivals that found others in flight


@dataclass(eq=False)
class _Job:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    context: contextvars.Context
    call: Callable[[], Any] | None = None  # a lone job
    key: Hashable | None = None  # a batchable one: its batch key, function and item
    batch: BatchFn | None = None
    item: Any = None


class InferencePool:
    def __init__(self, *, workers: int, max_queue: int, timeout_s: float, metrics: Metrics,
                 batch_max: int = 1, batch_wait_s: float = 0.0):
        self.workers = workers
        self.capacity = workers + max_queue
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.batch_max = batch_max
        self.batch_wait_s = batch_wait_s
        self._cond = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._closed = False
        self._admitted = 0  # event-loop side: jobs submitted and not yet finished
        self._overlap = 0.0  # smoothed share of batchable arrivals that found other jobs admitted
        self._threads = [threading.Thread(target=self._work, name=f"voxswap-infer-{n}", daemon=True)
                         for n in range(workers)]
        for thread in self._threads:
            thread.start()

    @property
    def admitted(self) -> int:
        return self._admitted

    @property
    def queued(self) -> int:
        """Jobs waiting for a thread (the deque's length is read atomically)."""
        return len(self._queue)

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
        def fill(job: _Job) -> None:
            job.call = lambda: fn(*args)

        result: T = await self._submit(fill)
        return result

    async def run_bounded(self, fn: Callable[..., T], *args: object) -> T:
        """:meth:`run` for work its caller already bounds, so it waits its turn instead of being refused:
        a realtime session's pieces (one at a time per session, ``realtime_max_sessions`` sessions).
        Refusing one would fail a turn the client already spoke, deltas sent; it still counts as
        admitted, so requests see a busier server."""
        def fill(job: _Job) -> None:
            job.call = lambda: fn(*args)

        result: T = await self._submit(fill, check=False)
        return result

    async def run_batched(self, key: Hashable, batch: BatchFn, item: Any) -> Any:
        """Run ``item`` through ``batch`` together with the queued items of the same ``key``: the
        batch function gets them all and answers each (an exception for one fails that one only)."""
        def fill(job: _Job) -> None:
            if self.batch_max <= 1:
                job.call = lambda: _single(batch, item)
            else:
                job.key, job.batch, job.item = key, batch, item

        return await self._submit(fill)

    async def _submit(self, fill: Callable[[_Job], None], *, check: bool = True) -> Any:
        if check:
            self.check_capacity()
        loop = asyncio.get_running_loop()
        # the thread runs the job in a copy of this context: every log line keeps its request id
        job = _Job(loop, loop.create_future(), contextvars.copy_context())
        fill(job)
        self._admitted += 1
        job.future.add_done_callback(self._finished)
        with self._cond:
            if job.key is not None:
                self._overlap = self._overlap * (1 - SMOOTHING) + (self._admitted > 1) * SMOOTHING
            self._queue.append(job)
            self._cond.notify()
        self._publish()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), self.timeout_s)
        except TimeoutError as exc:
            self.metrics.rejections.labels("timeout").inc()
            raise InferenceTimeout(f"inference took longer than {self.timeout_s:g} s") from exc

    # -- the inference threads ---------------------------------------------------------------------

    def _work(self) -> None:
        while (group := self._take()) is not None:
            self._publish()  # from this thread: the gauge is thread-safe, and the loop need not wake for it
            first = group[0]
            if first.call is not None:
                outcomes: Any = [_outcome(first.context, first.call)]
            else:
                batch, items = first.batch, [job.item for job in group]
                assert batch is not None
                outcomes = _outcome(first.context, functools.partial(batch, items))  # in the first one's context
                if isinstance(outcomes, BaseException) or len(outcomes) != len(group):
                    failure = outcomes if isinstance(outcomes, BaseException) else RuntimeError(
                        f"a batch of {len(group)} answered {len(outcomes)} results")
                    outcomes = [failure] * len(group)
            for job, outcome in zip(group, outcomes, strict=True):
                _tell(job.loop, _settle, job.future, outcome)

    def _take(self) -> list[_Job] | None:
        """The next job, and the queued jobs that batch with it."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            first = self._queue.popleft()
            group = [first]
            if first.key is None:
                return group
            self._gather(group)
            deadline = time.monotonic() + self.batch_wait_s
            while (len(group) < self.batch_max and self._overlap > 0.5 and not self._closed
                   and (left := deadline - time.monotonic()) > 0):
                self._cond.wait(left)  # arrivals notify; more may join
                self._gather(group)
            return group

    def _gather(self, group: list[_Job]) -> None:
        for job in list(self._queue):
            if len(group) >= self.batch_max:
                return
            if job.key == group[0].key and job.batch == group[0].batch:
                self._queue.remove(job)
                group.append(job)

    # -- the event loop's bookkeeping --------------------------------------------------------------

    def _finished(self, _: object) -> None:
        self._admitted -= 1

    def _publish(self) -> None:
        self.metrics.queue_depth.set(self.queued)

    def shutdown(self) -> None:
        """Finish what is queued, then stop the threads."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()


def _tell(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    """Hand a result to the event loop; one that has closed (the app stopped) needs none."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, *args)


def _single(batch: BatchFn, item: Any) -> Any:
    (outcome,) = batch([item])
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


def _outcome(context: contextvars.Context, call: Callable[[], Any]) -> Any:
    try:
        return context.run(call)
    except BaseException as exc:  # handed to the awaiting request, as run_in_executor would
        return exc


def _settle(future: asyncio.Future[Any], outcome: Any) -> None:
    if future.done():  # cancelled: the request gave up (timeout) or its client left
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
