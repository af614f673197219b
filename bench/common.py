"""What every benchmark shares: the profile, the models and registries, servers, samplers, results.

Benchmarks report ratios measured in one run on one machine (server against the bare model, during
a swap against outside one), because absolute numbers on a shared machine say little on their own.
"""

from __future__ import annotations

import bisect
import itertools
import os
import shutil
import statistics
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from server.storage.manifest import MODEL_FILES
from server.storage.registry import Registry
from server.testing import synth
from server.testing.modelgen import TestModelSpec, make_test_model
from testkit.processes import ServerProcess, start_server

TEXT_A = "benchmark model a"
TEXT_B = "benchmark model b"
WRONG_TEXT = "a transcript this model never produces"
MIB = 1024 * 1024
HEARTBEAT_S = 0.5  # how often the benchmark's servers publish their heartbeat (and request stats)


@dataclass(frozen=True)
class Profile:
    """How much of everything to run: the full run for the report, or the quick smoke run."""

    quick: bool
    weights_mb: int  # the stand-in for the int8 export
    large_weights_mb: int  # the stand-in for fp32; 0 skips the large rows
    compute_ms: float  # CPU per audio second at 2 threads
    overhead_pairs: tuple[tuple[float, int], ...]  # (clip seconds, direct/server pairs)
    throughput_clip_s: float
    throughput_s: float  # one measuring window
    throughput_rounds: int  # direct and server windows alternate this many times per cell
    concurrencies: tuple[int, ...]
    worker_counts: tuple[int, ...]
    swaps_ok: int
    refused_every: int  # one refused swap after every this many successful ones
    swap_gap_s: float  # quiet time between swaps, so "outside a swap" has samples
    swap_load_concurrency: int
    swap_load_clip_s: float
    memory_swaps: int
    large_swaps: int
    startup_repeats: int
    bare_builds: int


FULL = Profile(
    quick=False, weights_mb=240, large_weights_mb=900, compute_ms=40.0,
    overhead_pairs=((1.0, 100), (10.0, 30), (30.0, 12)),
    throughput_clip_s=5.0, throughput_s=4.0, throughput_rounds=3, concurrencies=(1, 2, 4, 8), worker_counts=(1, 2),
    swaps_ok=50, refused_every=5, swap_gap_s=1.5, swap_load_concurrency=2, swap_load_clip_s=2.0,
    memory_swaps=100, large_swaps=4, startup_repeats=3, bare_builds=3,
)
QUICK = Profile(
    quick=True, weights_mb=2, large_weights_mb=0, compute_ms=5.0,
    overhead_pairs=((1.0, 6), (10.0, 3), (30.0, 2)),
    throughput_clip_s=1.0, throughput_s=0.5, throughput_rounds=1, concurrencies=(1, 2, 4, 8), worker_counts=(1, 2),
    swaps_ok=4, refused_every=2, swap_gap_s=0.2, swap_load_concurrency=2, swap_load_clip_s=1.0,
    memory_swaps=5, large_swaps=0, startup_repeats=1, bare_builds=1,
)


# -- results -------------------------------------------------------------------------------------


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    title: str = ""


@dataclass
class Goal:
    """One line of the summary: what we promised, what we measured, whether it held."""

    name: str
    goal: str
    measured: str
    met: bool | None  # None: informational, no goal


@dataclass
class Section:
    key: str
    title: str
    intro: str
    tables: list[Table] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)  # file names next to the report
    load: tuple[list[float], list[float]] = ([], [])  # 1/5/15-minute load averages before, after
    ran_at: str = ""
    seconds: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)  # raw numbers, for the JSON and the tests

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Section:
        section = cls(**{**raw, "tables": [], "goals": []})
        section.tables = [Table(**t) for t in raw.get("tables", [])]
        section.goals = [Goal(**g) for g in raw.get("goals", [])]
        section.load = (list(raw["load"][0]), list(raw["load"][1]))
        return section


# -- numbers -------------------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    """Percentile with linear interpolation; NaN for no values (reported as "n/a", never a crash)."""
    return float(np.percentile(np.asarray(values, dtype=float), q)) if len(values) else float("nan")


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def ms(seconds: float, digits: int = 1) -> str:
    return "n/a" if seconds != seconds else f"{seconds * 1000:.{digits}f}"


def mib(nbytes: float) -> str:
    return "n/a" if nbytes != nbytes else f"{nbytes / MIB:.0f}"


def ratio(value: float, digits: int = 2) -> str:
    return "n/a" if value != value else f"{value:.{digits}f}"


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- models and registries -----------------------------------------------------------------------


@dataclass
class ModelSet:
    """Two servable versions, plus the two a server must refuse, of one model size."""

    a: Path
    b: Path
    model_file: str  # the file a server with prefer_quantized picks
    texts: dict[str, str]  # version -> the transcript it gives; empty for a real model
    weights_bytes: int  # size of model_file on disk
    label: str
    broken: Path | None = None
    wrong_smoke: Path | None = None


def _model_file(folder: Path, prefer_quantized: bool) -> str:
    order = MODEL_FILES if prefer_quantized else tuple(reversed(MODEL_FILES))
    return next(name for name in order if (folder / name).is_file())


def generate(root: Path, weights_mb: int, compute_ms: float, *, refusals: bool) -> ModelSet:
    """Two generated versions (different texts, same size and cost), optionally the refused pair."""
    a = make_test_model(root / f"a-{weights_mb}", TestModelSpec(TEXT_A, weights_mb=weights_mb, compute_ms=compute_ms))
    b = make_test_model(root / f"b-{weights_mb}", TestModelSpec(TEXT_B, weights_mb=weights_mb, compute_ms=compute_ms))
    models = ModelSet(a, b, "model.onnx", {"a": TEXT_A, "b": TEXT_B}, (a / "model.onnx").stat().st_size,
                      f"generated stand-in, {weights_mb} MB weights, {compute_ms:g} ms CPU per audio second")
    if refusals:
        add_refusals(models, root)
    return models


def faithful(root: Path, *, quantized: bool, refusals: bool) -> ModelSet:
    """Two versions of the stand-in with SenseVoice-small's real architecture and cost (234M
    parameters, ``make-test-model --arch sensevoice-small``), different texts and weights: int8
    (``model_quant.onnx`` only, as a deployment of the int8 export) or fp32 (``model.onnx`` only)."""
    from server.testing.modelgen_small import SmallSpec, make_sensevoice_small

    model_file = "model_quant.onnx" if quantized else "model.onnx"
    folders = []
    for name, text, seed in (("a", TEXT_A, 1), ("b", TEXT_B, 2)):
        folder = make_sensevoice_small(root / f"{name}-small-{model_file}", SmallSpec(text, quantize=quantized,
                                                                                     seed=seed))
        if quantized:
            (folder / "model.onnx").unlink()  # the registry copies and hashes what the folder holds
        folders.append(folder)
    a, b = folders
    models = ModelSet(a, b, model_file, {"a": TEXT_A, "b": TEXT_B}, (a / model_file).stat().st_size,
                      "SenseVoice-small stand-in (real architecture, 234M parameters, "
                      f"{'int8' if quantized else 'fp32'} {(a / model_file).stat().st_size / 2**20:.0f} MiB)")
    if refusals:
        add_refusals(models, root)
    return models


def real(folder: Path, root: Path, *, prefer_quantized: bool, refusals: bool) -> ModelSet:
    """A real SenseVoice folder used as both versions (the registry copies it twice)."""
    model_file = _model_file(folder, prefer_quantized)
    models = ModelSet(folder, folder, model_file, {}, (folder / model_file).stat().st_size,
                      f"{folder} ({model_file})")
    if refusals:
        add_refusals(models, root)
    return models


def add_refusals(models: ModelSet, root: Path) -> None:
    """A version whose model file is garbage (fails to load) and one whose smoke clip cannot pass."""
    broken = root / "broken"
    broken.mkdir(parents=True, exist_ok=True)
    for child in models.a.iterdir():
        if child.is_file() and child.name not in MODEL_FILES:
            shutil.copyfile(child, broken / child.name)
    (broken / models.model_file).write_bytes(np.random.default_rng(1).bytes(64 * 1024))
    models.broken = broken

    wrong = root / "wrong-smoke"
    wrong.mkdir(parents=True, exist_ok=True)
    for child in models.a.iterdir():
        if child.is_file():
            (wrong / child.name).symlink_to(child.resolve())  # the registry copies the real bytes
    (wrong / "smoke").mkdir(exist_ok=True)
    (wrong / "smoke" / "clip.wav").write_bytes(synth.wav_bytes(synth.speech_like(1.5, seed=7)))
    (wrong / "smoke" / "clip.txt").write_text(WRONG_TEXT + "\n")
    models.wrong_smoke = wrong


def make_registry(root: Path, models: ModelSet) -> Registry:
    """As ``voxswap registry add`` does: each version's graphs prepared for this host at add, so no
    server's first load of it has to make them (a one-off peak of about 2x the file)."""
    from server.lifecycle.builder import graph_maker

    registry = Registry(root).ensure()
    registry.preparer = graph_maker("cpu", prefer_quantized=models.model_file == "model_quant.onnx")
    registry.add(models.a, "a", source="bench")
    registry.add(models.b, "b", source="bench")
    if models.broken is not None:
        registry.add(models.broken, "broken", source="bench")
    if models.wrong_smoke is not None:
        registry.add(models.wrong_smoke, "wrong-smoke", source="bench")
    registry.promote("a", actor="bench")
    # from here on everything reads the registry's copies, as a server does
    models.a, models.b = registry.version_dir("a"), registry.version_dir("b")
    return registry


def bare_build_times(folder: Path, model_file: str, threads: int, repeats: int) -> list[float]:
    """Seconds to construct the Engine alone (imports done), the floor under any load or start-up."""
    from server.engines.sensevoice import Engine

    Engine(folder, model_file=model_file, threads=threads).close()  # imports and first-use costs
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        engine = Engine(folder, model_file=model_file, threads=threads)
        times.append(time.perf_counter() - started)
        engine.close()
        del engine
    return times


# -- servers -------------------------------------------------------------------------------------


def threads_for(workers: int) -> int:
    """onnxruntime threads per process so that workers x threads fills the cores, no more."""
    return max(1, min(64, (os.cpu_count() or 1) // workers))


@dataclass
class Bench:
    """One benchmark run: its profile, scratch folder, models and registries, and its servers."""

    profile: Profile
    workdir: Path
    out_dir: Path  # where the report and its plots go
    plot_stem: str  # plots are <stem>-<name>.png next to the report
    models: ModelSet
    registry: Registry
    large: ModelSet | None = None
    large_registry: Registry | None = None
    prefer_quantized_large: bool = True
    _ids: Iterator[int] = field(default_factory=itertools.count)
    _bare: dict[tuple[str, int], list[float]] = field(default_factory=dict)

    def bare_builds(self, models: ModelSet, threads: int) -> list[float]:
        """Bare Engine build times of ``models.a``, measured once per run and size."""
        key = (str(models.a), threads)
        if key not in self._bare:
            self._bare[key] = bare_build_times(models.a, models.model_file, threads, self.profile.bare_builds)
        return self._bare[key]

    def server_env(self, threads: int, *, large: bool = False) -> dict[str, str]:
        """Production defaults, except what a benchmark must pin: threads, a scratch data folder,
        no shutdown delay (nothing balances load here) and which model file a large run uses."""
        return {
            "VOXSWAP_INTRA_OP_THREADS": str(threads),
            "VOXSWAP_INFERENCE_WORKERS": "1",
            "VOXSWAP_DATA_DIR": str(self.workdir / "data"),
            "VOXSWAP_SHUTDOWN_DELAY_S": "0",
            "VOXSWAP_WATCH_INTERVAL_S": "0.2",
            "VOXSWAP_HEARTBEAT_INTERVAL_S": str(HEARTBEAT_S),
            "VOXSWAP_PREFER_QUANTIZED": "true" if not large or self.prefer_quantized_large else "false",
        }

    def start(self, registry: Registry, *, workers: int = 1, large: bool = False, wait: bool = True) -> ServerProcess:
        """``voxswap serve`` as a real process on the registry's current version; the caller stops it."""
        return start_server(registry.root, self.workdir / f"server-{next(self._ids)}", workers=workers,
                            env=self.server_env(threads_for(workers), large=large), wait=wait)

    @contextmanager
    def server(self, registry: Registry, *, workers: int = 1, large: bool = False) -> Iterator[ServerProcess]:
        """A started server on version ``a``, stopped however the block ends."""
        registry.promote("a", actor="bench")
        server = self.start(registry, workers=workers, large=large)
        try:
            yield server
        finally:
            server.stop()


class RssSampler:
    """Samples one process's resident memory in a thread, often enough to catch a swap's peak."""

    def __init__(self, pid: int, interval_s: float = 0.005):
        self._process = psutil.Process(pid)
        self.interval_s = interval_s
        self.times: list[float] = []  # monotonic, ascending; appended only by the sampling thread
        self.values: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = int(self._process.memory_info().rss)
            except psutil.Error:
                return
            self.values.append(rss)
            self.times.append(time.monotonic())
            self._stop.wait(self.interval_s)

    @property
    def samples(self) -> list[tuple[float, int]]:
        return list(zip(self.times, self.values, strict=False))

    def peak(self, start: float, end: float) -> int:
        lo, hi = bisect.bisect_left(self.times, start), bisect.bisect_right(self.times, end)
        return max(self.values[lo:hi], default=0)

    def before(self, when: float) -> int:
        """The last sample taken before ``when`` (0 if none)."""
        index = bisect.bisect_left(self.times, when)
        return self.values[index - 1] if index > 0 else 0
