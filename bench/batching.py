"""Dynamic batching: the same closed-loop load on one worker with the batcher on and off.

Two ``voxswap serve`` processes on the same registry, alike but for ``VOXSWAP_BATCH_MAX_SIZE`` (8,
the default, against 1: every request alone), measured in windows taken in turn so that drifting
background load hits both alike. Short clips, where a session call's fixed cost weighs most.
"""

from __future__ import annotations

import re

import httpx

from bench.common import Bench, Goal, Section, Table, median, ms, ratio, threads_for
from bench.throughput import _cell
from server.testing import synth
from testkit.processes import start_server

CLIP_S = 2.0
CONCURRENCIES = (1, 8)


def run(bench: Bench) -> Section:
    profile = bench.profile
    threads = threads_for(1)
    section = Section(
        "batching", "11. Dynamic batching across requests",
        f"Closed-loop clients posting a {CLIP_S:g} s clip to `voxswap serve` (1 worker, 1 inference thread, "
        f"{threads} onnxruntime threads), once with the batcher (`VOXSWAP_BATCH_MAX_SIZE=8`, the default) and once "
        f"without (`=1`), in {profile.throughput_rounds} windows of {profile.throughput_s:g} s per cell taken in "
        "turn. *Mean batch* is requests per session call, from `voxswap_batch_requests`.",
    )
    wav = synth.wav_bytes(synth.speech_like(CLIP_S, seed=5))
    bench.registry.promote("a", actor="bench")
    servers = {}
    rows, data = [], {}
    try:
        for label, size in (("on", "8"), ("off", "1")):
            env = {**bench.server_env(threads), "VOXSWAP_BATCH_MAX_SIZE": size}
            servers[label] = start_server(bench.registry.root, bench.workdir / f"batching-{label}", env=env)
        for concurrency in CONCURRENCIES:
            rates: dict[str, list[float]] = {"on": [], "off": []}
            p50s: dict[str, list[float]] = {"on": [], "off": []}
            for _ in range(profile.throughput_rounds):
                for label, server in servers.items():
                    rate, p50, _, _ = _cell(server.url, wav, concurrency, profile.throughput_s, 1)
                    rates[label].append(rate)
                    p50s[label].append(p50)
            cell = {label: sum(values) / len(values) for label, values in rates.items()}
            gain = cell["on"] / cell["off"] if cell["off"] else 0.0
            data[str(concurrency)] = {"on": cell["on"], "off": cell["off"], "gain": gain,
                                      "p50_on": median(p50s["on"]), "p50_off": median(p50s["off"])}
            rows.append([str(concurrency), f"{cell['off']:.2f}", f"{cell['on']:.2f}", ratio(gain, 2),
                         ms(median(p50s["off"])), ms(median(p50s["on"]))])
        mean = _mean_batch(servers["on"].url)
    finally:
        for server in servers.values():
            server.stop()
    section.tables.append(Table(["concurrency", "off req/s", "on req/s", "on / off", "off p50 ms", "on p50 ms"], rows))
    top = data[str(CONCURRENCIES[-1])]
    section.goals.append(Goal(f"batching at concurrency {CONCURRENCIES[-1]}", ">= 1.3x without, if the CPU allows",
                              f"{ratio(top['gain'], 2)} (mean batch {mean:.1f})", top["gain"] >= 1.3))
    section.notes.append(f"Mean batch over the whole run with the batcher on: {mean:.2f} requests per session call. "
                         "At concurrency 1 a request never waits for companions (the batcher waits only while "
                         "most arrivals find others in flight), so the two rows should match.")
    section.data = {"cells": data, "mean_batch": mean, "clip_s": CLIP_S}
    return section


def _mean_batch(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    found = {key: float(value) for key, value in
             re.findall(r'voxswap_batch_requests_(count|sum)\{model="sensevoice"\} ([0-9.e+]+)', text)}
    return found.get("sum", 0.0) / found["count"] if found.get("count") else 0.0


if __name__ == "__main__":
    from bench.standalone import main

    raise SystemExit(main("batching", __doc__ or "", run))
