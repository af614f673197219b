"""Memory: does resident memory come back after every swap, and how high does a swap peak?

The server's RSS is sampled every 2 ms from outside (psutil) during each swap; the process's base
(everything but a model) is measured once by unloading the model through the admin API, so
"old + new model" can be compared with what the swap really held at its peak.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import shutil
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.common import MIB, Bench, Goal, ModelSet, RssSampler, Section, Table, median, mib, ratio, threads_for
from bench.swaps import post_update
from server.storage.registry import Registry
from server.testing import synth
from testkit.harness import LoadGenerator, wait_until

PEAK_SLACK = 0.10
TREND_LIMIT = 0.05


@dataclass
class MemoryPoint:
    swap: int
    version: str
    rss_before: int  # sampled just before the update was sent
    peak: int  # highest sample while the update ran
    rss_after_free: int  # the server's own measurement right after freeing the old version
    rss_status: int  # /api/system/status a moment later
    model_bytes: int  # what the server says the new model added when it loaded


def _series(bench: Bench, registry: Registry, models: ModelSet, swaps: int,
            large: bool) -> tuple[int, list[MemoryPoint], int]:
    """(base RSS without a model, one point per swap, failed requests) of one server."""
    clip = synth.wav_bytes(synth.speech_like(1.0, seed=31))
    points: list[MemoryPoint] = []
    with bench.server(registry, large=large) as server, \
            httpx.Client(base_url=server.url, headers=server.auth, timeout=600) as admin, \
            RssSampler(server.proc.pid, 0.002) as rss:
        base = _base_rss(admin, server.url)
        with LoadGenerator(server.url, clip, concurrency=1, pause_s=0.05, timeout_s=300) as load:
            wait_until(lambda: load.count() >= 3, timeout_s=300, message="traffic before the first swap")
            live = "a"
            for i in range(swaps):
                target = "b" if live == "a" else "a"
                record = post_update(admin, target)
                if not record.ok:
                    raise RuntimeError(f"swap {i + 1} to {target} failed: {record.status} {record.reason}")
                live = target
                status = httpx.get(f"{server.url}/api/system/status", timeout=60).json()
                points.append(MemoryPoint(
                    i + 1, target, rss.before(record.sent), rss.peak(record.sent, record.answered),
                    int(record.memory.get("rss_after_free_bytes", 0)), int(status["resident_memory_bytes"]),
                    int(record.memory.get("model_bytes", 0))))
                time.sleep(0.1)
        failed = len(load.failures())
    return base, points, failed


def _base_rss(admin: httpx.Client, url: str) -> int:
    """RSS with no model loaded: unload (the server frees and trims), read, load again."""
    # 409 while the fresh server's registry watcher still holds the swap lock for its first look
    wait_until(lambda: admin.post("/admin/model/unload").status_code != 409, timeout_s=60,
               message="the server free to unload")
    if httpx.get(f"{url}/api/system/status", timeout=60).json()["model_loaded"]:
        raise RuntimeError("the model is still loaded after /admin/model/unload")
    rss = int(httpx.get(f"{url}/api/system/status", timeout=60).json()["resident_memory_bytes"])
    admin.post("/admin/model/load").raise_for_status()
    wait_until(lambda: httpx.get(f"{url}/health/ready", timeout=10).status_code == 200, timeout_s=300,
               message="the model back after measuring the base")
    return rss


def _bare_child(folder: str, model_file: str, threads: int, conn: Connection) -> None:
    """Spawned: import everything, say so, build the Engine when told, report, wait to be ended."""
    import funasr_onnx  # noqa: F401  (Engine imports it lazily; its cost is not the model's)
    import onnxruntime  # noqa: F401

    from server.engines.sensevoice import Engine

    conn.send("imported")
    conn.recv()
    engine = Engine(Path(folder), model_file=model_file, threads=threads)
    conn.send("built")
    conn.recv()
    engine.close()


def bare_load_memory(models: ModelSet, threads: int) -> tuple[int, int, int]:
    """(RSS before, peak during, RSS after) a bare Engine build in a fresh process, sampled from here:
    what onnxruntime itself needs to load this model, with no server around it."""
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_bare_child, args=(str(models.a), models.model_file, threads, theirs), daemon=True)
    child.start()
    try:
        if not ours.poll(300):
            raise RuntimeError("the bare-load process did not start")
        ours.recv()
        with RssSampler(child.pid or 0, 0.002) as rss:
            time.sleep(0.05)
            started = time.monotonic()
            ours.send("build")
            if not ours.poll(600):
                raise RuntimeError("the bare-load process did not build its engine")
            ours.recv()
            time.sleep(0.05)
            ended = time.monotonic()
        result = rss.before(started), rss.peak(started, ended), rss.before(ended + 1)
        ours.send("exit")
        return result
    finally:
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
            child.join(timeout=10)
        ours.close()
        theirs.close()


def external_data_copy(models: ModelSet, folder: Path) -> ModelSet:
    """The same model re-saved with its weights in a separate file, which onnxruntime memory-maps."""
    import onnx

    folder.mkdir(parents=True, exist_ok=True)
    for child in models.a.iterdir():
        if child.is_file() and child.name != models.model_file and not child.name.endswith(".onnx"):
            shutil.copyfile(child, folder / child.name)
    proto = onnx.load(str(models.a / models.model_file))
    onnx.save(proto, str(folder / models.model_file), save_as_external_data=True, all_tensors_to_one_file=True,
              location=f"{models.model_file}.data", size_threshold=1024)
    del proto
    return dataclasses.replace(models, a=folder, b=folder, label=f"{models.label}, weights as external data")


def run(bench: Bench) -> Section:
    profile = bench.profile
    section = Section(
        "memory", "4. Memory across swaps",
        f"A fresh `voxswap serve` (1 worker) swaps back and forth {profile.memory_swaps} times under light load "
        "(one client, 1 s clips). After each swap: the RSS the server measured right after freeing the old "
        "version (`memory.rss_after_free_bytes` of the update answer) and `/api/system/status`. During each "
        "swap the server's RSS is sampled every 2 ms with psutil. The *base* is the RSS with no model loaded "
        "(measured once via `/admin/model/unload`), and *old + new* uses the model file sizes, so the peak "
        "goal reads: peak <= base + 1.1 x (old + new).",
    )
    runs: list[tuple[str, ModelSet, Registry, int, bool]] = [
        ("standard", bench.models, bench.registry, profile.memory_swaps, False)]
    if bench.large is not None and bench.large_registry is not None and profile.large_swaps:
        runs.append(("large", bench.large, bench.large_registry, profile.large_swaps, True))
    summary_rows: list[list[str]] = []
    data: dict[str, Any] = {}
    for name, models, registry, swaps, large in runs:
        base, points, failed = _series(bench, registry, models, swaps, large)
        bare_before, bare_peak, bare_after = bare_load_memory(models, threads_for(1))
        size = models.weights_bytes
        overshoot = [(p.peak - base) / (2 * size) for p in points]
        added = [(p.peak - p.rss_before) / size for p in points]  # what a swap adds above the steady state
        first, last = points[0].rss_after_free, points[-1].rss_after_free
        drift = last / first - 1
        middle = points[len(points) // 2].rss_after_free
        late_drift = last / middle - 1
        slope = float(np.polyfit([p.swap for p in points], [p.rss_after_free for p in points], 1)[0]) \
            if len(points) > 1 else 0.0
        steady = median([p.rss_before - base for p in points])
        data[name] = {
            "label": models.label, "weights_bytes": size, "base": base, "first": first, "last": last,
            "drift": drift, "late_drift": late_drift, "slope_bytes_per_swap": slope,
            "bare_load": {"before": bare_before, "peak": bare_peak, "after": bare_after},
            "peak_ratio_max": max(overshoot),
            "peak_ratio_median": median(overshoot), "steady_model_bytes": steady, "failed": failed,
            "added_ratio_max": max(added), "added_ratio_median": median(added),
            "points": [vars(p) for p in points],
        }
        summary_rows.append([
            f"{mib(size)} MiB ({name})", str(len(points)), mib(base), mib(steady), mib(first), mib(last),
            f"{drift:+.1%} ({late_drift:+.1%})", f"{slope / MIB:+.2f}", mib(max(p.peak for p in points)),
            f"{median(overshoot):.2f} / {max(overshoot):.2f}",
            f"+{mib(bare_peak - bare_before)} / +{mib(bare_after - bare_before)}", str(failed)])
        if name == "standard":
            external = external_data_copy(models, bench.workdir / "external-data")
            ext_before, ext_peak, ext_after = bare_load_memory(external, threads_for(1))
            shutil.rmtree(external.a, ignore_errors=True)
            data[name]["bare_load_external"] = {"before": ext_before, "peak": ext_peak, "after": ext_after}
            section.notes.append(
                f"The same {mib(size)} MiB model re-saved with its weights as ONNX external data "
                f"(`onnx.save(..., save_as_external_data=True)`): a bare build peaks at +{mib(ext_peak - ext_before)} "
                f"MiB and keeps +{mib(ext_after - ext_before)} MiB, against +{mib(bare_peak - bare_before)} / "
                f"+{mib(bare_after - bare_before)} MiB for the single file: onnxruntime memory-maps external "
                "weights instead of parsing and copying them, so pages are file-backed and come in as inference "
                "touches them (a stand-in's inference touches one row; a real model's touches all of them).")
            section.goals.append(Goal(f"RSS after swap {len(points)} vs swap 1", "within 5%",
                                      f"{drift:+.1%} ({mib(first)} -> {mib(last)} MiB)", abs(drift) <= TREND_LIMIT))
        section.goals.append(Goal(f"a swap's peak above the steady state, {mib(size)} MiB model",
                                  "<= 1.15 x the new model's file", f"{ratio(max(added))} x at worst, "
                                  f"{ratio(median(added))} median", max(added) <= 1.15))
        section.goals.append(Goal(f"peak RSS during a swap, {mib(size)} MiB model", "<= base + 1.1 x (old + new)",
                                  f"{ratio(max(overshoot))} x (old + new) at worst, {ratio(median(overshoot))} median",
                                  max(overshoot) <= 1 + PEAK_SLACK))
    section.tables.append(Table(
        ["model", "swaps", "base MiB", "resident model MiB", "RSS after swap 1 MiB",
         "RSS after last MiB", "drift (second half)", "MiB per swap (fit)", "peak MiB",
         "(peak - base) / (old + new) median / max", "bare build alone: peak / kept MiB", "failed requests"],
        summary_rows))
    section.notes.append("*resident model* = median RSS before a swap minus the base: what one loaded version "
                         "really costs, against its file size in the first column.")
    section.notes.append("*drift (second half)*: RSS after the last swap against the swap half-way, which tells "
                         "a heap that settles from one that keeps growing.")
    section.notes.append("*bare build alone*: a fresh process that only builds the `Engine`, its RSS sampled every "
                         "2 ms: how far above its final size onnxruntime's load of this model file peaks, and "
                         "what it keeps. A swap's peak is the old version plus this.")
    plot = f"{bench.plot_stem}-memory.png"
    _plot(bench.out_dir / plot, data)
    section.plots.append(plot)
    section.data = data
    return section


def _plot(path: Path, data: dict[str, Any]) -> None:
    """Per model size: RSS after every swap (zoomed, to show any drift) above the peak during it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(data), figsize=(7 * len(data), 6), squeeze=False, sharex="col")
    for column, (name, run) in enumerate(data.items()):
        points = run["points"]
        swaps = [p["swap"] for p in points]
        top, bottom = axes[0][column], axes[1][column]
        top.plot(swaps, [p["rss_after_free"] / MIB for p in points], marker=".", label="after free (server)")
        top.plot(swaps, [p["rss_status"] / MIB for p in points], marker=".", lw=0.6, label="status after swap")
        first = points[0]["rss_after_free"] / MIB
        top.axhspan(first * (1 - TREND_LIMIT), first * (1 + TREND_LIMIT), color="tab:green", alpha=0.1,
                    label="goal: within 5% of swap 1")
        top.set_title(f"{name}: {run['weights_bytes'] / MIB:.0f} MiB model, RSS after each swap")
        top.set_ylabel("server RSS (MiB)")
        top.legend(fontsize=7)
        bottom.plot(swaps, [p["peak"] / MIB for p in points], marker="^", lw=0.6, color="tab:green",
                    label="peak during swap")
        limit = (run["base"] + (1 + PEAK_SLACK) * 2 * run["weights_bytes"]) / MIB
        bottom.axhline(limit, color="tab:red", ls="--", lw=0.8, label="goal: base + 1.1 x (old + new)")
        bottom.axhline(run["base"] / MIB, color="grey", ls=":", lw=0.8, label="base (no model)")
        bottom.set_xlabel("swap")
        bottom.set_ylabel("server RSS (MiB)")
        bottom.set_ylim(bottom=0)
        bottom.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
