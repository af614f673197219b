"""This process's job workers: claim from the store, transcribe, record, notify.

Jobs share the inference pool with interactive requests and yield to them: a job worker starts a
batch of segments only when an inference thread is free and nobody is waiting for one. Every batch
of one file is pinned to the version its first batch leased; if a swap retires that version, the
job starts over on the live one, so a result is always the work of the one version it records and
a swap never waits for a long job.

A job names its model as a request does (a model, ``NAME@VERSION``, a pipeline, or nothing for the
default model), resolved again when it runs: a model removed since fails the job with the reason,
it never runs on another one. A pinned version runs on that version or fails if it is not loaded.
A pipeline runs the whole file in one call, every stage leased once, as a request's does.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import re
import socket
import time
import uuid

import numpy as np
from numpy.typing import NDArray

from server.errors import InvalidRequest, NotFound, NotReady, VersionNotLoaded, VoxswapError
from server.lifecycle.policy import ModelLifecycle
from server.service import routing
from server.service.inference import InferencePool
from server.service.routing import Target
from server.service.transcription import Transcription, TranscriptionService
from server.service.webhooks import WebhookSender
from server.settings import Settings
from server.storage.job_queue import JobQueue, QueueCounts
from server.storage.job_records import Job
from server.storage.pipelines import PipelineStore

log = logging.getLogger("voxswap.jobs")

RECOVER_EVERY_S = 2.0  # how often an idle worker looks for jobs of dead processes
SWEEP_EVERY_S = 600.0  # how often finished jobs past their retention are deleted
MAX_RESTARTS = 3  # times a job starts over because its version was swapped out under it


class JobCancelled(Exception):
    """The job was cancelled or deleted while it ran; its work is thrown away."""


class JobRunner:
    """This process's job workers: claim, transcribe through the shared pool, record, notify."""

    def __init__(self, store: JobQueue, service: TranscriptionService, pool: InferencePool, lifecycle: ModelLifecycle,
                 settings: Settings, pipelines: PipelineStore | None = None):
        self.store = store
        self.service = service
        # the app's pipelines (a store of its own otherwise: reads are cached by the file's signature)
        self.pipelines = pipelines if pipelines is not None else PipelineStore(service.models.catalog)
        self.pool = pool
        self.lifecycle = lifecycle
        self.settings = settings
        self.owner = ""  # named when the lock is taken, in the process that runs jobs (after any fork)
        self.jobs_run = 0  # jobs this runner finished (completed or failed)
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self.webhooks = WebhookSender(store, settings, service.metrics)
        self._lock_fh: object | None = None  # the owner lock's handle (a flock'd file, a PG session)
        self._last_recover = 0.0
        self._last_sweep = 0.0
        self._recover_lock = asyncio.Lock()
        self.counts: QueueCounts | None = None  # refreshed by the heartbeat (background.py)
        # the queue's name in metrics: a SQLite path means a queue only on its own machine
        where = store.describe()
        self.queue_label = f"{socket.gethostname()}:{where}" if where.startswith("sqlite:") else where

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        for n in range(self.settings.job_workers):
            self._tasks.append(asyncio.create_task(self._worker(), name=f"voxswap-job-worker-{n}"))

    async def stop(self) -> None:
        """Stop taking jobs; a job cut short goes back to pending for whoever runs next."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await self.webhooks.stop()
        if self._lock_fh is not None:
            released = await asyncio.to_thread(self.store.release_owner, self.owner)
            if released:
                log.info("running jobs put back to pending", extra={"event": "jobs_released", "count": released})
            self.store.drop_owner_lock(self.owner, self._lock_fh)
            self._lock_fh = None

    def queue_counts(self) -> dict[str, int | None]:
        """The queue's counts as the heartbeat last read them (None before the first read)."""
        c = self.counts
        return {"pending": c.pending if c else None, "running": c.running if c else None,
                "claimed": c.claimed if c else None}

    def wake(self) -> None:
        """A job was submitted here: look now instead of at the next poll."""
        self._wake.set()

    # -- the worker loop ----------------------------------------------------------------------

    def _our_turn(self) -> bool:
        """A free inference thread and no interactive request waiting for one, and a model to use."""
        pool = self.pool
        return self.lifecycle.live is not None and pool.queued == 0 and pool.admitted < pool.workers

    async def _wait_for_turn(self) -> None:
        while not self._our_turn():
            await asyncio.sleep(0.05)

    async def _idle(self) -> None:
        self._wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), self.settings.job_poll_s)

    async def _worker(self) -> None:
        while True:
            try:
                await self._wait_for_turn()
                if not self.store.exists():
                    await self._idle()
                    continue
                await self._housekeeping()
                job = await asyncio.to_thread(self.store.claim, self.owner)
                if job is None:
                    await self._idle()
                    continue
                if not await self._run(job):  # put back: its model has no version to run it yet
                    await asyncio.sleep(self.settings.job_poll_s)
            except asyncio.CancelledError:
                raise
            except Exception:  # a worker must outlive any one job or a broken disk moment
                log.exception("job worker error", extra={"event": "job_worker_error"})
                await asyncio.sleep(self.settings.job_poll_s)

    async def _housekeeping(self) -> None:
        async with self._recover_lock:
            now = time.monotonic()
            if (self._lock_fh is not None and now - self._last_recover >= RECOVER_EVERY_S
                    and not await asyncio.to_thread(self.store.owner_lock_held, self._lock_fh)):
                # the database restarted and took our lock along: peers may already have requeued
                # our running jobs, whose completion then fails as it should; go on as a new owner
                log.warning("owner lock lost; taking a new one", extra={"event": "jobs_owner_lost"})
                self.store.drop_owner_lock(self.owner, self._lock_fh)
                self._lock_fh = None
            if self._lock_fh is None:
                await asyncio.to_thread(self.store.ensure)
                host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:40]
                self.owner = f"{host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                # in a thread (PostgreSQL connects), shielded: a cancellation meanwhile must not lose
                # the handle, and the lock with it, with nobody to close it
                owner = self.owner
                take = asyncio.ensure_future(asyncio.to_thread(self.store.hold_owner_lock, owner))
                try:
                    self._lock_fh = await asyncio.shield(take)
                except asyncio.CancelledError:  # the thread goes on: its lock is dropped when it is done
                    take.add_done_callback(lambda t: None if t.cancelled() or t.exception() is not None
                                           else self.store.drop_owner_lock(owner, t.result()))
                    raise
            if now - self._last_recover >= RECOVER_EVERY_S:
                self._last_recover = now
                requeued, adopted = await asyncio.to_thread(
                    self.store.recover, self.owner, max_attempts=self.settings.job_max_attempts)
                if requeued:
                    log.warning("jobs of a stopped process put back to pending",
                                extra={"event": "jobs_recovered", "count": requeued})
                for job_id in adopted:
                    job = await asyncio.to_thread(self.store.get, job_id)
                    if job is not None:
                        self._notify(job)
            if now - self._last_sweep >= SWEEP_EVERY_S:
                self._last_sweep = now
                await asyncio.to_thread(self.store.sweep, self.settings.job_retention_s)

    async def _run(self, job: Job) -> bool:
        """Run one claimed job to its end; False when it went back to pending (no model loaded)."""
        log.info("job started", extra={"event": "job_start", "job": job.id, "attempt": job.attempts,
                                       "model": job.model})
        try:
            target = await asyncio.to_thread(self._target, job)
            data = await asyncio.to_thread(self.store.read_input, job)
            await self._wait_for_turn()  # decoding is pool work, bounded and yielding as inference is
            samples = await self.pool.run(self.service.decode, data)
            del data
            if target.stages is not None:  # a pipeline: the whole file in one go, every stage leased once
                await self._wait_for_turn()
                result = await self.pool.run(functools.partial(self.service.run_pipeline, watched=False),
                                             target.stages, samples, job.language, job.use_itn, target.version,
                                             job.hotwords or "")
            else:
                result = await self._transcribe(job, samples, target)
            finished = await asyncio.to_thread(self.store.complete, job, self.owner, result)
        except JobCancelled:
            finished = None
        except NotReady:
            await asyncio.to_thread(self.store.release, job, self.owner)  # no model: wait for one
            return False
        except (VoxswapError, FileNotFoundError) as exc:
            reason = exc.message if isinstance(exc, VoxswapError) else "the job's audio is gone from the data dir"
            finished = await asyncio.to_thread(self.store.fail, job, self.owner, reason)
        except asyncio.CancelledError:
            raise  # stop() puts it back to pending
        except Exception:
            log.exception("job failed", extra={"event": "job_error", "job": job.id})
            finished = await asyncio.to_thread(self.store.fail, job, self.owner,
                                               "internal error while transcribing (see the server log)")
        if finished is None:
            log.info("job cancelled", extra={"event": "job_cancelled", "job": job.id})
            return True
        self.jobs_run += 1
        self.service.metrics.jobs_finished.labels(finished.status).inc()
        log.info("job finished", extra={"event": "job_done", "job": job.id, "status": finished.status,
                                        "version": finished.model_version})
        self._notify(finished)
        return True

    def _target(self, job: Job) -> Target:
        """Blocking: the model the job asked for, as it is now. Gone since (a pipeline removed, a
        model's folder deleted), or unable to run the job: the job fails saying why. Nothing loaded
        for it yet: NotReady, before its audio is read, and the job waits for it."""
        models = self.service.models
        try:
            target = routing.resolve(models, job.model, None, self.pipelines)
            stages = target.stages
            for lifecycle in (target.model, *((stages.vad, stages.punc) if stages is not None else ())):
                if lifecycle is not None and not models.catalog.exists(lifecycle.name):
                    raise NotFound(f"model {lifecycle.name!r} was removed", param="model")
            self.service.check_request(target.model, hotwords=job.hotwords or "")
        except (NotFound, InvalidRequest) as exc:
            asked = job.model or models.default.name
            raise type(exc)(f"the job's model {asked!r} cannot run it now: {exc.message}", param="model") from exc
        if target.version is None and target.model.live is None:
            raise NotReady(target.model.not_ready_reason())
        return target

    async def _transcribe(self, job: Job, samples: NDArray[np.float32], target: Target) -> Transcription:
        """The routes' pipeline at a job's pace: one batch per inference call, each when it is our
        turn, with the progress stored (and a cancel noticed) after each.

        A lease is held per batch, not per file, so a swap never waits for a long job to drain: when
        the version a job started on is gone, the job starts over on the live one, and a result is
        always the work of the one version it records.
        """
        file = await asyncio.to_thread(self.service.file, samples, language=job.language, use_itn=job.use_itn,
                                       version=target.version, model=target.model, hotwords=job.hotwords or "")
        for restart in range(MAX_RESTARTS + 1):
            try:
                while not file.finished:
                    await self._wait_for_turn()
                    await self.pool.run(file.run, 1)
                    if not await asyncio.to_thread(self.store.progress, job.id, self.owner, file.progress):
                        raise JobCancelled(job.id)
                return file.result()
            except VersionNotLoaded as exc:
                if target.version is not None:  # pinned: that version or nothing
                    raise VersionNotLoaded(f"the job's model {job.model!r} cannot run it: {exc.message}",
                                           param="model") from exc
                if restart == MAX_RESTARTS:
                    raise
                log.info("the job's version was swapped out; starting over on the live one",
                         extra={"event": "job_restart", "job": job.id, "version": file.version})
                file.restart()
        raise AssertionError("unreachable")

    # -- webhooks -----------------------------------------------------------------------------

    def _notify(self, job: Job) -> None:
        self.webhooks.notify(job)  # signed, to checked addresses only: server/service/webhooks.py
