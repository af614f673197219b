"""Start-up: from launching ``voxswap serve`` to the first 200 on /health/ready, against the bare load.

The server's own verify / load / smoke times come from its Prometheus histograms (the start-up load
is the only swap a fresh process has made), and the import cost from a bare interpreter, so the
table shows where the seconds between "launched" and "ready" go.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from bench.common import Bench, Goal, ModelSet, Section, Table, median, mib, ratio, threads_for
from server.storage.registry import Registry

IMPORTS = "import server.app, server.engines.sensevoice, funasr_onnx, onnxruntime"
PHASE_SUM = re.compile(r'^voxswap_swap_phase_duration_seconds_sum\{model="[^"]*",phase="(\w+)"\} ([0-9.e+-]+)$', re.M)


def _ready_time(bench: Bench, registry: Registry, workers: int, large: bool) -> tuple[float, float, dict[str, float]]:
    """(seconds to the first ready answer, seconds until every worker serves, server phase sums)."""
    registry.promote("a", actor="bench")
    started = time.monotonic()
    server = bench.start(registry, workers=workers, large=large, wait=False)
    try:
        first = _poll(lambda: httpx.get(f"{server.url}/health/ready", timeout=5).status_code == 200, server.proc)
        ready = first - started

        def every_worker() -> bool:
            workers_seen = httpx.get(f"{server.url}/api/system/status", timeout=5).json()["workers"]
            return len(workers_seen) >= workers and all(w["version"] == "a" for w in workers_seen)

        all_ready = _poll(every_worker, server.proc) - started if workers > 1 else ready
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        phases = {name: float(value) / workers for name, value in PHASE_SUM.findall(metrics)}
    finally:
        server.stop()
    return ready, all_ready, phases


def _poll(predicate: Callable[[], bool], proc: subprocess.Popen[bytes], timeout_s: float = 300.0) -> float:
    """Time (monotonic) at which ``predicate()`` first held, polling every 10 ms."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"voxswap exited with {proc.returncode} during start-up")
        try:
            if predicate():
                return time.monotonic()
        except httpx.HTTPError:
            pass  # not listening yet
        time.sleep(0.01)
    raise TimeoutError("voxswap did not become ready")


def import_seconds() -> float:
    """A fresh interpreter importing what a server imports before it can load a model."""
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", IMPORTS], check=True, cwd=Path(__file__).resolve().parents[1])
    return time.monotonic() - started


def run(bench: Bench) -> Section:
    profile = bench.profile
    section = Section(
        "startup", "5. Start-up",
        "Seconds from launching `voxswap serve` to its first 200 on `/health/ready` (polled every 10 ms), "
        "for 2 workers also until every worker reports the version. The server's verify/load/smoke come "
        "from its `voxswap_swap_phase_duration_seconds` histogram; *imports* is a fresh interpreter "
        f"running `{IMPORTS}`; *bare build* is `Engine(...)` alone in an already warm process.",
    )
    imports = import_seconds()
    cases: list[tuple[str, ModelSet, Registry, int, bool, int]] = [
        ("standard", bench.models, bench.registry, 1, False, profile.startup_repeats)]
    if 2 in profile.worker_counts:
        cases.append(("standard", bench.models, bench.registry, 2, False, 1))
    if bench.large is not None and bench.large_registry is not None:
        cases.append(("large", bench.large, bench.large_registry, 1, True, max(1, profile.startup_repeats - 1)))
    rows: list[list[str]] = []
    data: dict[str, dict[str, float]] = {}
    for name, models, registry, workers, large, repeats in cases:
        runs = [_ready_time(bench, registry, workers, large) for _ in range(repeats)]
        ready = median([r[0] for r in runs])
        all_ready = median([r[1] for r in runs])
        phases = {p: median([r[2].get(p, float("nan")) for r in runs]) for p in ("verify", "load", "smoke")}
        bare = median(bench.bare_builds(models, threads_for(workers)))
        key = f"{name}-{workers}w"
        data[key] = {"ready_s": ready, "all_ready_s": all_ready, "bare_build_s": bare, "imports_s": imports,
                     "runs": float(repeats), **{f"{p}_s": v for p, v in phases.items()}}
        rows.append([f"{mib(models.weights_bytes)} MiB ({name})", str(workers), str(repeats), f"{ready:.2f}",
                     f"{all_ready:.2f}" if workers > 1 else "-", f"{imports:.2f}", f"{phases['verify']:.2f}",
                     f"{phases['load']:.2f}", f"{phases['smoke']:.2f}", f"{bare:.2f}", ratio(ready / bare, 1)])
        model_s = phases["verify"] + phases["load"] + phases["smoke"]
        data[key]["outside_model_s"] = ready - model_s
        section.goals.append(Goal(f"start-up, {mib(models.weights_bytes)} MiB model, {workers} worker"
                                  + ("s" if workers > 1 else ""), "ready <= verify + load + smoke + 0.5 s",
                                  f"{ready:.2f} s to ready: {ready - model_s:.2f} s outside the model's own phases "
                                  f"({bare:.2f} s bare build)", ready - model_s <= 0.5))
    section.tables.append(Table(["model", "workers", "runs", "to ready s", "every worker s", "imports s",
                                 "verify s", "load s", "smoke s", "bare build s", "ready / bare"], rows))
    section.notes.append("Start-up = interpreter and imports + verify (sha256 of every file) + load + smoke "
                         "+ binding the socket; only load is the model's own cost. With 2 workers each worker "
                         "loads its own session after the fork, at the same time, on the same cores.")
    section.data = data
    return section
