"""Overhead: the same clip through the bare Engine in this process and through POST /api/transcribe.

Calls alternate (direct, server, server, direct, ...) so that load from anything else on the machine
lands on both sides alike; the ratio and the difference of the medians are what the report judges.
"""

from __future__ import annotations

import time

import httpx
import numpy as np
from numpy.typing import NDArray

from bench.common import Bench, Goal, Section, Table, median, ms, pct, ratio, threads_for
from server.engines.sensevoice import Engine
from server.speech import audio
from server.testing import synth

WARMUP = 2


def run(bench: Bench) -> Section:
    threads = threads_for(1)
    models = bench.models
    section = Section(
        "overhead", "1. Overhead: server against the bare model",
        "The same WAV clip transcribed by `Engine.transcribe(float32 array)` in the benchmark process and "
        f"by `POST /api/transcribe` to `voxswap serve` (1 worker, {threads} onnxruntime threads, the same "
        "thread count for the direct call) over loopback with a keep-alive client. Calls alternate, so "
        "background load hits both sides alike. *Server outside inference* is the server latency minus the "
        "inference time the server itself reports (`processing_ms`): HTTP, multipart, decoding, thread hops, JSON.",
    )
    rows: list[list[str]] = []
    data: dict[str, dict[str, float]] = {}
    engine = Engine(models.a, model_file=models.model_file, threads=threads)
    try:
        with bench.server(bench.registry) as server, httpx.Client(base_url=server.url, timeout=300) as client:
            for clip_s, pairs in bench.profile.overhead_pairs:
                wav = synth.wav_bytes(synth.speech_like(clip_s, seed=int(clip_s)))
                samples = audio.decode(wav, max_seconds=3600).samples
                direct, served, inside = _measure(engine, client, wav, samples, pairs)
                paired = median([s - d for s, d in zip(served, direct, strict=True)])
                row = {
                    "clip_s": clip_s, "n": len(direct),
                    "direct_p50": median(direct), "direct_p99": pct(direct, 99),
                    "server_p50": median(served), "server_p99": pct(served, 99),
                    "inside_p50": median(inside), "paired_overhead": paired,
                }
                row["ratio_p50"] = row["server_p50"] / row["direct_p50"]
                row["ratio_p99"] = row["server_p99"] / row["direct_p99"]
                row["overhead_p50"] = row["server_p50"] - row["direct_p50"]
                data[f"{clip_s:g}"] = row
                rows.append([f"{clip_s:g} s", str(len(direct)), ms(row["direct_p50"]), ms(row["direct_p99"]),
                             ms(row["server_p50"]), ms(row["server_p99"]), ratio(row["ratio_p50"], 3),
                             ratio(row["ratio_p99"], 3), ms(row["overhead_p50"], 2), ms(paired, 2),
                             ms(row["server_p50"] - row["inside_p50"], 2)])
            floor = _http_floor(client, 20 if bench.profile.quick else 200)
    finally:
        engine.close()
    section.tables.append(Table(
        ["clip", "n", "direct p50 ms", "direct p99 ms", "server p50 ms", "server p99 ms", "ratio p50",
         "ratio p99", "overhead p50 ms", "paired overhead ms", "server outside inference ms"], rows))
    section.notes.append("*overhead p50* = server p50 - direct p50; *paired overhead* = median of "
                         "(server - direct) over neighbouring pairs, less sensitive to drifting load; "
                         "*outside inference* = server p50 - the server's own inference p50.")
    section.notes.append("The stand-in's compute is a per-frame MatMul chain whose cost per audio second falls "
                         "as clips grow (larger matrices run faster per row), so compare rows by their ratios, "
                         "not their absolute times.")
    section.notes.append("p99 of a few dozen samples is close to the maximum: read it as 'worst seen'.")
    one, ten = data.get("1"), data.get("10")
    if one:
        section.goals.append(Goal("overhead, 1 s clips", "p50 overhead <= 1 ms",
                                  f"{ms(one['overhead_p50'], 2)} ms (paired {ms(one['paired_overhead'], 2)} ms)",
                                  one["overhead_p50"] <= 0.001))
    if ten:
        section.goals.append(Goal("overhead, 10 s clips", "p50 ratio server/direct <= 1.05",
                                  ratio(ten["ratio_p50"], 3), ten["ratio_p50"] <= 1.05))
    section.notes.append(f"For scale: a bare `GET /health/live` round trip on the same connection (no body, no "
                         f"model) takes {ms(floor, 2)} ms at p50 here.")
    section.data = {"clips": data, "threads": threads, "http_floor_p50": floor}
    return section


def _http_floor(client: httpx.Client, count: int) -> float:
    """p50 of the cheapest request the server answers: what any HTTP call costs before its work."""
    times = []
    for _ in range(count):
        started = time.perf_counter()
        client.get("/health/live").raise_for_status()
        times.append(time.perf_counter() - started)
    return median(times)


def _measure(engine: Engine, client: httpx.Client, wav: bytes, samples: NDArray[np.float32],
             pairs: int) -> tuple[list[float], list[float], list[float]]:
    """Alternating direct and server calls; returns direct, server and server-side inference seconds."""
    direct: list[float] = []
    served: list[float] = []
    inside: list[float] = []

    def call_direct() -> None:
        started = time.perf_counter()
        engine.transcribe(samples)
        direct.append(time.perf_counter() - started)

    def call_server() -> None:
        started = time.perf_counter()
        response = client.post("/api/transcribe", files={"file": ("clip.wav", wav, "audio/wav")})
        elapsed = time.perf_counter() - started
        if response.status_code != 200:
            raise RuntimeError(f"the server answered {response.status_code}: {response.text[:300]}")
        served.append(elapsed)
        inside.append(float(response.json()["processing_ms"]) / 1000)

    for _ in range(WARMUP):
        call_direct()
        call_server()
    direct.clear()
    served.clear()
    inside.clear()
    for i in range(pairs):
        first, second = (call_direct, call_server) if i % 2 == 0 else (call_server, call_direct)
        first()
        second()
    return direct, served, inside
