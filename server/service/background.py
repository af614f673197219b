"""What a worker process does beside answering requests: follow the registry and the rollouts of
its peers, publish its heartbeat, and leave gracefully when a swap left it over its memory budget.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import signal
from contextlib import suppress

from server.lifecycle.policy import ModelLifecycle
from server.lifecycle.report import SwapReport
from server.service.context import AppContext
from server.vocab import HistoryEvent

log = logging.getLogger("voxswap.app")


async def follow_registry(ctx: AppContext) -> None:
    """Follow every model's state.json (one stat per tick) and rollout.json, so a CLI promote, a
    peer's rollout or an operator's unload reaches this process; pick up models created since.

    Each model has a follower task of its own: one model's staging (a model-sized build) never
    delays another's, so peers stage two models' rollouts as concurrently as their coordinator.
    """
    following: set[str] = set()
    async with asyncio.TaskGroup() as group:  # cancelling this task cancels every follower
        while True:
            for lifecycle in ctx.models:
                if lifecycle.name not in following:
                    following.add(lifecycle.name)
                    group.create_task(_follow(ctx, lifecycle), name=f"voxswap-follow-{lifecycle.name}")
            await asyncio.sleep(ctx.settings.watch_interval_s)
            try:
                await asyncio.to_thread(ctx.models.discover)
            except Exception:
                log.exception("looking for new models failed", extra={"event": "watch_error"})


async def _follow(ctx: AppContext, lifecycle: ModelLifecycle) -> None:
    # the first tick always compares generations: a commit may land between this process loading
    # its model and this loop starting, and no later change of state.json would announce it
    last: tuple[int, int, int] | None = None
    pending = True
    while True:
        try:
            signature = lifecycle.registry.state_signature()
            if signature != last or pending:
                last = signature
                pending = not await asyncio.to_thread(lifecycle.follow_registry)
            if lifecycle.board.rollout_path.exists() or lifecycle.has_candidate or lifecycle.rollouts.staged:
                await asyncio.to_thread(lifecycle.rollouts.follow)
            if lifecycle.canary.active() is not None:
                await asyncio.to_thread(lifecycle.canary.check)  # its coordinator may have died
        except Exception:  # the watcher must survive anything one swap does, and try again
            pending = True
            log.exception("following the registry failed", extra={"event": "watch_error", "model": lifecycle.name})
        await asyncio.sleep(ctx.settings.watch_interval_s)


async def heartbeat(ctx: AppContext) -> None:
    """Publish this process's heartbeat and refresh its memory gauge; sweep dead workers' files."""
    beats = 0
    counting: asyncio.Task[None] | None = None
    while True:
        try:
            ctx.metrics.refresh_process()
            await asyncio.to_thread(_publish_all, ctx)
            # apart from the beat, one at a time: a job database that is slow or restarting must
            # neither delay the heartbeat nor pile up threads
            if ctx.jobs is not None and ctx.jobs.store.exists() and (counting is None or counting.done()):
                counting = asyncio.create_task(_count_jobs(ctx), name="voxswap-job-gauges")
            if beats % 10 == 0:
                for lifecycle in ctx.models:
                    await asyncio.to_thread(lifecycle.board.sweep)
        except Exception:
            log.exception("heartbeat failed", extra={"event": "heartbeat_error"})
        # a watch runs in the process that swapped, which is the one a swap pushes over budget:
        # recycling it mid-watch would leave the verdict at "watching" for good
        watching = any(lifecycle.watch.running for lifecycle in ctx.models)
        if ctx.recycle_reason and not ctx.shutting_down and not ctx.recycling and not watching:
            await asyncio.to_thread(try_recycle, ctx)
        beats += 1
        await asyncio.sleep(ctx.settings.heartbeat_interval_s)


def _publish_all(ctx: AppContext) -> None:
    for lifecycle in ctx.models:
        lifecycle.publish()


async def _count_jobs(ctx: AppContext) -> None:
    assert ctx.jobs is not None
    try:
        counts = await asyncio.to_thread(ctx.jobs.store.counts, ctx.jobs.owner)
    except Exception:  # the gauges keep their last values; the job workers log the outage
        return
    ctx.jobs.counts = counts
    queue = ctx.jobs.queue_label
    ctx.metrics.jobs_pending.labels(queue).set(counts.pending)  # the whole queue's, labelled with it
    ctx.metrics.jobs_running.labels(queue).set(counts.running)
    ctx.metrics.jobs_claimed.set(counts.claimed)  # this process's: sum() it


def check_memory_budget(ctx: AppContext, report: SwapReport) -> None:
    """Only a swap that freed an old model is judged: memory it did not give back is the leak that
    recycling cures. A fresh worker's first load is its baseline, not a leak."""
    budget = ctx.settings.memory_budget_mb
    if not budget or ctx.settings.workers < 2:
        return  # a lone process cannot be replaced without a gap; the metric and alert say it instead
    if not report.from_version or "rss_before_free_bytes" not in report.memory:
        return
    version = report.version
    rss = ctx.metrics.refresh_process()
    if rss > budget * 2**20:
        ctx.recycle_reason = (f"resident memory {rss / 2**20:.0f} MiB after the swap to {version!r} "
                              f"exceeds the {budget} MiB budget")


def try_recycle(ctx: AppContext) -> None:
    """Leave gracefully so gunicorn starts a fresh worker, but only when every other worker serves
    and no other worker is being recycled: one at a time, never a gap in capacity."""
    peers = ctx.lifecycle.board.peers()
    if len(peers) + 1 < ctx.settings.workers or any(p.state != "ready" for p in peers):
        return
    handle = (ctx.registry.root / ".recycle.lock").open("a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return
    ctx._recycle_lock = handle  # held until this process exits; the next worker waits for it
    ctx.recycling = True
    ctx.registry.record(HistoryEvent.RECYCLE, pid=os.getpid(), version=ctx.lifecycle.live_version,
                        actor="memory_budget", outcome="started", reason=ctx.recycle_reason)
    log.warning("recycling this worker", extra={"event": "recycle", "reason": ctx.recycle_reason})
    os.kill(os.getpid(), signal.SIGTERM)


def begin_shutdown(ctx: AppContext) -> bool:
    """SIGTERM arrived: readiness turns 503 now; serving goes on until the server stops accepting.

    Returns whether peers on the same listening socket cover for this worker (it is being
    recycled), so it can stop accepting at once instead of waiting for a load balancer to notice.
    """
    ctx.models.draining = True
    if ctx.recycling:
        return True  # peers keep this instance ready; only this worker leaves
    if not ctx.shutting_down:
        ctx.shutting_down = True
        log.info("shutdown requested: readiness is 503, still serving",
                 extra={"event": "shutdown_begin", "delay_s": ctx.settings.shutdown_delay_s})
        with suppress(OSError):
            _publish_all(ctx)
    return False
