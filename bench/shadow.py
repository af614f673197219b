"""Shadow traffic: what a shadow mirroring 10% of requests costs the live traffic it mirrors.

``python -m bench.shadow [--quick] [--compute-ms 40] [--weights-mb 240]`` runs it alone; ``python -m
bench.run`` runs it as the part ``shadow``.

One server, one run: windows without a shadow and windows with one (version ``b`` shadowing the live
``a`` through ``POST /admin/model/canary`` with ``mode: shadow``) alternate under the same closed-loop
load, off-on-off-...-off, so that drifting background load lands on both alike. The shadow's start
(the candidate's build and smoke test) and stop (its free) happen between windows and belong to
neither. Two load levels: saturated (the swap benchmark's clients, no pause: no core is ever idle,
the shadow's worst case) and half load (one client that waits as long as a request takes).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench import standalone
from bench.common import (
    Bench,
    Goal,
    Section,
    Table,
    median,
    ms,
    pct,
    ratio,
    threads_for,
)
from server.metrics import SHADOW_OUTCOMES
from server.testing import synth
from testkit.harness import LoadGenerator, Outcome, wait_until
from testkit.processes import ServerProcess

PERCENT = 10.0
SETTLE_S = 0.5  # after a shadow starts or stops, before the next window opens
# versions a and b of the stand-in say different words: the shadow must run its whole window, not be
# failed by its transcripts (a real model's a and b are one folder, whose transcripts agree)
CRITERIA = {"max_cer_mean": 10.0, "cer_threshold": 10.0, "max_cer_share": 1.0}
SHADOW_METRIC = "voxswap_shadow_requests_total"


@dataclass
class Window:
    shadow: bool
    start: float  # monotonic
    end: float
    mirrors: dict[str, float] = field(default_factory=dict)  # voxswap_shadow_requests_total's increase
    mirror_p95: float = float("nan")  # seconds: the candidate's p95 over the shadow's window, as GET reports it

    def holds(self, o: Outcome) -> bool:
        return self.start <= o.started and o.finished <= self.end


@dataclass
class Level:
    name: str
    concurrency: int
    pause_s: float
    windows: list[Window] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)

    def latencies(self, shadow: bool) -> list[float]:
        return [o.latency_s for w in self.windows if w.shadow == shadow for o in self.outcomes
                if o.ok and w.holds(o)]

    def seconds(self, shadow: bool) -> float:
        return sum(w.end - w.start for w in self.windows if w.shadow == shadow)

    def mirrors(self, outcome: str) -> float:
        return sum(w.mirrors.get(outcome, 0.0) for w in self.windows if w.shadow)

    def mirror_p95(self) -> float:
        """The worst of the shadow windows' p95 of mirror inference time."""
        values = [w.mirror_p95 for w in self.windows if w.shadow and w.mirror_p95 == w.mirror_p95]
        return max(values, default=float("nan"))


def run(bench: Bench) -> Section:
    profile = bench.profile
    clip_s = profile.swap_load_clip_s
    window_s = profile.throughput_s * 3
    rounds = profile.throughput_rounds
    clip = synth.wav_bytes(synth.speech_like(clip_s, seed=41))
    section = Section(
        "shadow", "6. Shadow traffic: live latency with a shadow running",
        f"`voxswap serve` (1 worker, one inference thread, {threads_for(1)} onnxruntime threads) under closed-loop "
        f"load posting a {clip_s:g} s clip, in windows of {window_s:g} s taken in turn without and with a shadow: "
        f"version `b` mirroring {PERCENT:g}% of requests (`POST /admin/model/canary`, `mode: shadow`), started "
        f"before and stopped after each window with it ({rounds} such windows, {rounds + 1} without, "
        f"off-on-off order, {SETTLE_S:g} s of settling after each start and stop). Only requests whose whole life "
        "falls inside a window count. *Saturated*: the swap benchmark's "
        f"{profile.swap_load_concurrency} clients without a pause, so no core is ever idle; *half load*: one client "
        "that pauses as long as a lone request takes.",
    )
    with bench.server(bench.registry) as server, \
            httpx.Client(base_url=server.url, headers=server.auth, timeout=600) as admin:
        service_s = _service_time(admin, clip)
        levels = [Level("saturated", profile.swap_load_concurrency, 0.0), Level("half load", 1, service_s)]
        for level in levels:
            _measure(server, admin, clip, level, window_s, rounds)
    section.data = _analyse(section, levels, service_s)
    return section


def _service_time(admin: httpx.Client, clip: bytes) -> float:
    """Median latency of one request with the server otherwise idle (after a warm-up)."""
    times = []
    for i in range(8):
        started = time.perf_counter()
        response = admin.post("/api/transcribe", files={"file": ("clip.wav", clip, "audio/wav")})
        response.raise_for_status()
        if i >= 3:
            times.append(time.perf_counter() - started)
    return median(times)


def _measure(server: ServerProcess, admin: httpx.Client, clip: bytes, level: Level, window_s: float,
             rounds: int) -> None:
    with LoadGenerator(server.url, clip, concurrency=level.concurrency, pause_s=level.pause_s,
                       timeout_s=300) as load:
        wait_until(lambda: load.count() >= 2 * level.concurrency, timeout_s=300,
                   message="traffic before the first window")
        for _ in range(rounds):
            level.windows.append(_window(admin, False, window_s))
            started = admin.post("/admin/model/canary", json={
                "version": "b", "mode": "shadow", "percent": PERCENT, "duration_s": 3600, "on_pass": "hold",
                "criteria": CRITERIA})
            if started.status_code != 200:
                raise RuntimeError(f"the shadow did not start: {started.status_code} {started.text[:300]}")
            time.sleep(SETTLE_S)
            window = _window(admin, True, window_s)
            state = admin.get("/admin/model/canary").json()
            if state["state"] != "running":
                raise RuntimeError(f"the shadow ended during its window: {state['state']}: {state['reason']}")
            p95_ms = state["comparison"].get("candidate", {}).get("p95_ms")
            window.mirror_p95 = p95_ms / 1000 if p95_ms is not None else float("nan")
            level.windows.append(window)
            stopped = admin.delete("/admin/model/canary")
            if stopped.status_code != 200:
                raise RuntimeError(f"the shadow did not stop: {stopped.status_code} {stopped.text[:300]}")
            time.sleep(SETTLE_S)
        level.windows.append(_window(admin, False, window_s))
    level.outcomes = list(load.outcomes)


def _window(admin: httpx.Client, shadow: bool, seconds: float) -> Window:
    before = _mirrors(admin)
    start = time.monotonic()
    time.sleep(seconds)
    end = time.monotonic()
    after = _mirrors(admin)
    return Window(shadow, start, end, {k: after.get(k, 0.0) - before.get(k, 0.0) for k in SHADOW_OUTCOMES})


def _mirrors(admin: httpx.Client) -> dict[str, float]:
    """The server's ``voxswap_shadow_requests_total`` by outcome (every model's: it serves one)."""
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, float] = {}
    for family in text_string_to_metric_families(admin.get("/metrics").text):
        for sample in family.samples:
            if sample.name == SHADOW_METRIC:
                outcome = sample.labels["outcome"]
                found[outcome] = found.get(outcome, 0.0) + float(sample.value)
    return found


def _analyse(section: Section, levels: list[Level], service_s: float) -> dict[str, Any]:
    rows: list[list[str]] = []
    data: dict[str, Any] = {"percent": PERCENT, "service_s": service_s, "levels": {}}
    failed = 0
    total = 0
    for level in levels:
        off, on = level.latencies(False), level.latencies(True)
        failed += sum(1 for o in level.outcomes if not o.ok)
        total += len(level.outcomes)
        mirrored, dropped, errors = (level.mirrors(k) for k in SHADOW_OUTCOMES)
        cell = {
            "n_off": len(off), "n_on": len(on), "p50_off": median(off), "p50_on": median(on),
            "p99_off": pct(off, 99), "p99_on": pct(on, 99), "max_off": max(off, default=float("nan")),
            "max_on": max(on, default=float("nan")), "rps_off": len(off) / level.seconds(False),
            "rps_on": len(on) / level.seconds(True), "mirrored": mirrored, "dropped": dropped,
            "failed_mirrors": errors, "failed": sum(1 for o in level.outcomes if not o.ok),
            "concurrency": level.concurrency, "pause_s": level.pause_s, "mirror_p95": level.mirror_p95(),
        }
        cell["p99_ratio"] = cell["p99_on"] / cell["p99_off"]
        cell["p50_ratio"] = cell["p50_on"] / cell["p50_off"]
        cell["rps_ratio"] = cell["rps_on"] / cell["rps_off"]
        cell["mirrored_share"] = (mirrored + dropped) / len(on) if on else float("nan")
        data["levels"][level.name] = cell
        for shadow, values in ((False, off), (True, on)):
            rows.append([
                level.name, f"{PERCENT:g}%" if shadow else "none", str(len(values)),
                f"{cell['rps_on' if shadow else 'rps_off']:.2f}", ms(median(values), 0), ms(pct(values, 99), 0),
                ms(max(values, default=float("nan")), 0),
                *([ratio(cell["p50_ratio"]), ratio(cell["p99_ratio"]), ratio(cell["rps_ratio"]),
                   f"{mirrored:.0f} / {dropped:.0f} / {errors:.0f}", ms(cell["mirror_p95"], 0)]
                  if shadow else ["-"] * 5),
            ])
    section.tables.append(Table(
        ["load", "shadow", "n", "req/s", "p50 ms", "p99 ms", "max ms", "p50 / without", "p99 / without",
         "req/s / without", "mirrored / dropped / failed", "mirror p95 ms"],
        rows, "Live requests without and with a shadow running"))
    data["failed"] = failed
    data["requests"] = total
    saturated, half = data["levels"]["saturated"], data["levels"]["half load"]
    limit = 1 + PERCENT / 100
    section.goals += [
        Goal(f"live p99 with a {PERCENT:g}% shadow, saturated", f"<= {limit:g}x without",
             f"{ratio(saturated['p99_ratio'])}x ({ms(saturated['p99_on'], 0)} ms vs {ms(saturated['p99_off'], 0)} ms)",
             saturated["p99_ratio"] <= limit),
        Goal(f"live p99 with a {PERCENT:g}% shadow, half load", f"<= {limit:g}x without",
             f"{ratio(half['p99_ratio'])}x ({ms(half['p99_on'], 0)} ms vs {ms(half['p99_off'], 0)} ms)",
             half["p99_ratio"] <= limit),
        Goal(f"live throughput with a {PERCENT:g}% shadow, saturated", f">= {1 / limit:.2f}x without",
             f"{ratio(saturated['rps_ratio'])}x ({saturated['rps_on']:.2f} vs {saturated['rps_off']:.2f} req/s)",
             saturated["rps_ratio"] >= 1 / limit),
        Goal("failed live requests with a shadow", "0", f"{failed} of {total}", failed == 0),
    ]
    section.notes.append(
        "*mirrored / dropped / failed*: the increase of `voxswap_shadow_requests_total` over the shadow's windows. "
        "A mirror runs on one thread of its own at nice 10, outside the inference pool, behind a queue of "
        "`VOXSWAP_SHADOW_QUEUE`; a request that finds the queue full is not mirrored (dropped), never delayed. "
        "*mirror p95*: the candidate's p95 inference time as `GET /admin/model/canary` reports it (the worst "
        "window). Ratios compare the pooled windows with the shadow against the pooled windows without it.")
    section.notes.append(
        f"The goals allow a {PERCENT:g}% shadow the share of work it adds: at most {PERCENT:g}% on live p99, and "
        f"on throughput when no core is idle. At half load the mirrors can use the idle time.")
    slow = max(saturated["mirror_p95"], half["mirror_p95"])
    if slow == slow and slow > 3 * service_s:
        section.notes.append(
            f"Mirrors took up to {ms(slow, 0)} ms at p95, {slow / service_s:.1f}x a lone live request "
            f"({ms(service_s, 0)} ms) of the same cost: by design. A shadow's candidate is built with one "
            "onnxruntime thread, so all its compute runs on the mirror's niced thread and waits for cores the "
            "live requests leave idle. (Built like the live version, its onnxruntime pool threads ran at "
            "normal priority and spun for the cores: a 10% shadow then cost 30-40% of saturated throughput.)")
    section.notes.append(f"A lone request took {ms(service_s, 0)} ms at p50 (the half-load client's pause). "
                         "p99 of a few hundred samples is close to the maximum: read it as 'worst seen'.")
    return data


def main(argv: Sequence[str] | None = None) -> int:
    return standalone.main("shadow", __doc__ or "", run, argv)


if __name__ == "__main__":
    sys.exit(main())
