"""Throughput: requests and audio seconds per second through the server against the bare model.

The direct maximum is N processes each looping the Engine on the same clip with the same threads as
an N-worker server. The processes stay up for the whole worker count and measure right before each
server cell, so every ratio compares two measurements taken under the same background load.
"""

from __future__ import annotations

import multiprocessing as mp
import time
from contextlib import suppress
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Barrier
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from bench.common import HEARTBEAT_S, Bench, Goal, Profile, Section, Table, median, ms, ratio, threads_for
from server.speech import audio
from server.testing import synth
from testkit.harness import LoadGenerator, wait_until

CLIP_SEED = 11


def _clip(seconds: float) -> bytes:
    return synth.wav_bytes(synth.speech_like(seconds, seed=CLIP_SEED))


def _direct_worker(folder: str, model_file: str, threads: int, clip_s: float, barrier: Barrier,
                   conn: Connection) -> None:
    """Spawned: load the bare Engine once, then loop it for as many seconds as each request says."""
    from server.engines.sensevoice import Engine

    engine = Engine(Path(folder), model_file=model_file, threads=threads)
    samples = audio.decode(_clip(clip_s), max_seconds=3600).samples
    engine.transcribe(samples)
    conn.send("ready")
    while (seconds := conn.recv()) is not None:
        barrier.wait(timeout=300)
        started = time.perf_counter()
        count = 0
        while time.perf_counter() - started < seconds:
            engine.transcribe(samples)
            count += 1
        conn.send((count, time.perf_counter() - started))
    engine.close()


class DirectPool:
    """N processes each holding the bare Engine, measured on demand (all at once) between server cells."""

    def __init__(self, bench: Bench, processes: int):
        ctx = mp.get_context("spawn")  # never fork a process that may hold an onnxruntime session
        self.barrier = barrier = ctx.Barrier(processes)  # held here: the children rebuild it from its name
        models, self.clip_s = bench.models, bench.profile.throughput_clip_s
        self.pipes: list[Connection] = []
        self.children: list[mp.process.BaseProcess] = []
        for i in range(processes):
            ours, theirs = ctx.Pipe()
            self.pipes.append(ours)
            self.children.append(ctx.Process(
                target=_direct_worker, name=f"direct-{i}", daemon=True,
                args=(str(models.a), models.model_file, threads_for(processes), self.clip_s, barrier, theirs)))

    def __enter__(self) -> DirectPool:
        try:
            for child in self.children:
                child.start()
            for pipe in self.pipes:
                self._receive(pipe)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def rate(self, seconds: float) -> float:
        """Requests per second of all the processes looping at once for ``seconds``."""
        for pipe in self.pipes:
            pipe.send(seconds)
        results: list[tuple[int, float]] = [self._receive(pipe, 300 + seconds) for pipe in self.pipes]
        return sum(count / elapsed for count, elapsed in results)

    def _receive(self, pipe: Connection, timeout_s: float = 300) -> Any:
        if not pipe.poll(timeout_s):
            raise RuntimeError("a direct benchmark process did not answer")
        return pipe.recv()

    def close(self) -> None:
        for pipe in self.pipes:
            with suppress(OSError):  # that child is gone already
                pipe.send(None)
        for child in self.children:
            if child.pid is None:
                continue
            child.join(timeout=30)
            if child.is_alive():
                child.kill()
                child.join(timeout=10)
        for pipe in self.pipes:
            pipe.close()


def run(bench: Bench) -> Section:
    profile = bench.profile
    clip_s = profile.throughput_clip_s
    section = Section(
        "throughput", "2. Throughput: server against the direct maximum",
        f"Closed-loop clients posting a {clip_s:g} s clip to `voxswap serve --workers N` (N = 1: uvicorn; "
        "N = 2: gunicorn), each worker with one inference thread and cores/N onnxruntime threads, "
        f"in {profile.throughput_rounds} windows of {profile.throughput_s:g} s per cell, each after every client has "
        "had one answer. *Direct* is N processes each looping `Engine.transcribe` on the same clip with the same "
        f"threads (multiprocessing, spawn), measured in {profile.throughput_s:g} s windows taken in turn with the "
        "server's, so each ratio compares neighbours. "
        "The load generator runs on the same machine as the server and costs it some CPU.",
    )
    rows: list[list[str]] = []
    goals_data: dict[str, dict[str, object]] = {}
    wav = _clip(clip_s)
    for workers in profile.worker_counts:
        cells: list[tuple[int, float, float, float, int, list[int]]] = []
        with DirectPool(bench, workers) as direct, bench.server(bench.registry, workers=workers) as server:
            for concurrency in profile.concurrencies:
                cells.append((concurrency, *_alternating(direct, server.url, wav, concurrency, workers, profile)))
        best = 0.0
        for concurrency, adjacent, rate, p50, failed, shares in cells:
            best = max(best, rate / adjacent)
            split = " / ".join(map(str, shares)) if shares else "-"
            rows.append([str(workers), str(concurrency), f"{adjacent:.2f}", f"{rate:.2f}", f"{rate * clip_s:.1f}",
                         ratio(rate / adjacent), ms(p50, 0), str(failed), split])
        directs = [c[1] for c in cells]
        goals_data[str(workers)] = {
            "direct": median(directs), "direct_min": min(directs), "direct_max": max(directs), "best_ratio": best,
            **{f"c{c[0]}": c[2] for c in cells}, **{f"d{c[0]}": c[1] for c in cells},
            "shares": {str(c[0]): c[5] for c in cells}, "failed": float(sum(c[4] for c in cells))}
        section.goals.append(Goal(f"throughput, {workers} worker{'s' if workers > 1 else ''}",
                                  ">= 0.9 of direct", f"{best:.2f} (best concurrency)", best >= 0.9))
    section.tables.append(Table(["workers", "concurrency", "direct req/s", "server req/s", "server audio s/s",
                                 "of direct", "p50 ms", "failed", "per worker"], rows))
    section.notes.append("*per worker*: requests each gunicorn worker answered in the window (from its "
                         "heartbeat). A keep-alive connection stays on the worker that accepted it, so a few "
                         "clients can leave one worker idle while the other queues.")
    section.notes.append("A worker count's goal is judged at its best concurrency: a closed loop of one "
                         "client leaves the model idle while the answer travels back and the next upload "
                         "is decoded, which no server can hide.")
    section.data = {"workers": goals_data, "clip_s": clip_s}
    return section


def _alternating(direct: DirectPool, url: str, wav: bytes, concurrency: int, workers: int,
                 profile: Profile) -> tuple[float, float, float, int, list[int]]:
    """Direct and server windows taken in turn, so drifting background load hits both alike."""
    directs, rates, latencies, failed, shares = [], [], [], 0, [0] * (workers if workers > 1 else 0)
    for _ in range(profile.throughput_rounds):
        directs.append(direct.rate(profile.throughput_s))
        rate, p50, lost, split = _cell(url, wav, concurrency, profile.throughput_s, workers)
        rates.append(rate)
        latencies.append(p50)
        failed += lost
        shares = [a + b for a, b in zip(shares, split, strict=False)] if split else shares
    return (sum(directs) / len(directs), sum(rates) / len(rates), median(latencies), failed,
            sorted(shares, reverse=True))


def _cell(url: str, wav: bytes, concurrency: int, seconds: float,
          workers: int) -> tuple[float, float, int, list[int]]:
    """(requests/s, p50 latency, failed requests, requests per worker) of one concurrency level."""
    with LoadGenerator(url, wav, concurrency=concurrency, timeout_s=300) as load:
        wait_until(lambda: load.count() >= concurrency, timeout_s=300, message="every client answered once")
        start, wall_start = time.monotonic(), time.time()
        time.sleep(seconds)
        end, wall_end = time.monotonic(), time.time()
    done = [o for o in load.outcomes if start < o.finished <= end]
    ok = [o for o in done if o.ok]
    shares = _per_worker(url, wall_start, wall_end) if workers > 1 else []
    return len(ok) / (end - start), median([o.latency_s for o in ok]), len(load.failures()), shares


def _per_worker(url: str, start: float, end: float) -> list[int]:
    """Requests each worker answered in the window, from the heartbeats in /api/system/status."""
    time.sleep(HEARTBEAT_S + 0.3)  # every worker has published the window's requests
    workers = httpx.get(f"{url}/api/system/status", timeout=30).json()["workers"]
    return sorted((sum(start < at <= end for stats in w["stats"].values() for at in stats["at"])
                   for w in workers), reverse=True)
