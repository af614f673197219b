"""``python -m bench.abuse [--seconds 599] [--rate 384000] [--naive-four]``: memory under abuse.

Issue 18's finding B: a FLAC of 599 s of silence at 384 kHz (under a megabyte, inside every limit)
took 1.9 GB to decode, and 4 at once 7.5 GB. This measures peak resident memory (psutil, sampled
every 2 ms) above where each measurement started, for that file:

- in a fresh process each: decoding it whole then resampling (the naive way the server used to
  decode, as the baseline), and ``server.speech.audio.decode`` (block by block, resampled as it
  goes), alone and 4 threads at once;
- in a real ``voxswap serve`` with one inference thread: one request alone, then 4 at once.

Ratios are taken within the run, so the numbers hold on a loaded machine too. Naive decoding 4 at
once costs about 8 GB and only runs with ``--naive-four``.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path

import httpx
import numpy as np
from numpy.typing import NDArray

from bench.common import QUICK, Bench, Goal, RssSampler, Section, Table, generate, make_registry, mib, ratio
from bench.standalone import print_section
from server.testing import synth

PER_REQUEST_BUDGET = 50 * 1000 * 1000  # issue 18: at most 50 MB of extra memory per request




def naive_decode(data: bytes) -> NDArray[np.float32]:
    """What decoding cost before: the whole source in memory at its own rate, then one resample."""
    from fractions import Fraction

    import soundfile as sf
    from scipy.signal import resample_poly

    samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    mono = samples.mean(axis=1, dtype=np.float32)
    del samples
    factor = Fraction(16_000, rate).limit_denominator(1000)
    resampled: NDArray[np.float32] = resample_poly(mono, factor.numerator, factor.denominator).astype(np.float32)
    return resampled


def streaming_decode(data: bytes) -> NDArray[np.float32]:
    from server.speech import audio

    return audio.decode(data, max_seconds=600).samples


def _child(kind: str, path: str, concurrent: int, conn: Connection) -> None:
    """In a fresh process: warm up, then (peak RSS growth, seconds) of ``concurrent`` decodes."""
    decode = naive_decode if kind == "naive" else streaming_decode
    data = Path(path).read_bytes()
    decode(synth.silence_flac(1, 48_000))  # imports, FFmpeg and libsndfile start-up: not the file's cost
    threads = [threading.Thread(target=decode, args=(data,)) for _ in range(concurrent)]
    with RssSampler(os.getpid(), 0.002) as rss:
        started, ended = _at_once(threads)
    conn.send((rss.peak(started, ended) - rss.before(started), ended - started))
    conn.close()


def _at_once(threads: Sequence[threading.Thread]) -> tuple[float, float]:
    """Start every thread together and wait for all; (start, end) on the monotonic clock, after a
    pause so the sampler has a reading from before the start."""
    time.sleep(0.05)
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return started, time.monotonic()


def in_process(kind: str, path: Path, concurrent: int) -> tuple[int, float]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(kind, str(path), concurrent, child), name=f"abuse-{kind}")
    proc.start()
    child.close()
    result: tuple[int, float] = parent.recv()
    proc.join(60)
    return result


def through_server(bench: Bench, data: bytes, counts: Sequence[int]) -> dict[int, tuple[int, float, list[int]]]:
    """{n: (peak RSS growth of the worker, seconds, statuses)} for n requests sent at once."""
    out: dict[int, tuple[int, float, list[int]]] = {}
    with bench.server(bench.registry) as server, httpx.Client(base_url=server.url, timeout=600) as client:
        pid = client.get("/api/system/status").json()["workers"][0]["pid"]
        client.post("/api/transcribe", files={"file": ("warm.flac", synth.silence_flac(2, 384_000))})
        with RssSampler(pid, 0.002) as rss:
            for n in counts:
                statuses: list[int] = []
                threads = [threading.Thread(target=_post, args=(server.url, data, statuses)) for _ in range(n)]
                started, ended = _at_once(threads)
                out[n] = (rss.peak(started, ended) - rss.before(started), ended - started, statuses)
    return out


def _post(url: str, data: bytes, statuses: list[int]) -> None:
    with httpx.Client(base_url=url, timeout=600) as client:
        statuses.append(client.post("/api/transcribe", files={"file": ("s.flac", data)}).status_code)


def run(bench: Bench, *, seconds: int = 599, rate: int = 384_000, naive_four: bool = False) -> Section:
    section = Section(
        "abuse", "Memory under abuse: a tiny FLAC of 599 s of silence at 384 kHz",
        f"Peak resident memory above the start of each measurement, sampled every 2 ms with psutil, for "
        f"{seconds} s of silence at {rate} Hz as FLAC. *naive* decodes it whole at its own rate and then "
        "resamples (what the server did before issue 18); *streaming* is `audio.decode` (block by block "
        "to 16 kHz); *server* is a real `voxswap serve` with one inference thread.")
    data = synth.silence_flac(seconds, rate)
    path = bench.workdir / "abuse.flac"
    path.write_bytes(data)
    result_bytes = seconds * 16_000 * 4
    measured: dict[str, tuple[int, float, int]] = {}  # name -> (growth, seconds, requests)
    measured["naive, alone"] = (*in_process("naive", path, 1), 1)
    if naive_four:
        measured["naive, 4 at once"] = (*in_process("naive", path, 4), 4)
    measured["streaming, alone"] = (*in_process("streaming", path, 1), 1)
    measured["streaming, 4 threads at once"] = (*in_process("streaming", path, 4), 4)
    for n, (growth, took, statuses) in through_server(bench, data, (1, 4)).items():
        if statuses != [200] * n:
            raise RuntimeError(f"the server answered {statuses} to {n} requests at once")
        measured["server, alone" if n == 1 else "server, 4 at once"] = (growth, took, n)
    section.tables.append(Table(
        ["measurement", "requests", "peak growth MiB", "per request MiB", "seconds"],
        [[name, str(n), mib(growth), mib(growth / n), f"{took:.1f}"] for name, (growth, took, n) in measured.items()],
        title=f"{len(data) / 1000:.0f} kB upload; its 16 kHz float32 result is {mib(result_bytes)} MiB"))
    naive, streaming = measured["naive, alone"][0], measured["streaming, alone"][0]
    alone, four = measured["server, alone"][0], measured["server, 4 at once"][0]
    section.goals += [
        Goal("decoding the 384 kHz FLAC", f"under {PER_REQUEST_BUDGET / 1e6:.0f} MB per request",
             f"{mib(streaming)} MiB streaming vs {mib(naive)} MiB naive ({ratio(naive / max(1, streaming), 0)}x less)",
             streaming < PER_REQUEST_BUDGET),
        Goal("4 at once through the server", "bounded: about what one costs",
             f"{mib(four)} MiB for 4 vs {mib(alone)} MiB alone ({ratio(four / max(1, alone))}x)",
             four < 1.5 * alone),
    ]
    section.data = {"upload_bytes": len(data), "result_bytes": result_bytes,
                    **{name: {"growth_bytes": g, "seconds": t, "requests": n} for name, (g, t, n) in measured.items()}}
    return section


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.abuse", description=__doc__.splitlines()[2])
    parser.add_argument("--seconds", type=int, default=599, help="length of the silent FLAC (default %(default)s)")
    parser.add_argument("--rate", type=int, default=384_000, help="its sample rate (default %(default)s)")
    parser.add_argument("--naive-four", action="store_true", help="also decode it naively 4 at once (~8 GB)")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="voxswap-abuse-"))
    try:
        models = generate(workdir / "models", QUICK.weights_mb, 0.0, refusals=False)
        bench = Bench(QUICK, workdir, workdir, "abuse", models, make_registry(workdir / "registry", models))
        section = run(bench, seconds=args.seconds, rate=args.rate, naive_four=args.naive_four)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return print_section(section)


if __name__ == "__main__":
    sys.exit(main())
