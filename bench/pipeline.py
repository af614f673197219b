"""Pipelines: what voice activity detection costs per audio second, and what a pipeline costs over ASR alone.

``python -m bench.pipeline [--quick] [--compute-ms 40] [--weights-mb 240]`` runs it alone; ``python -m
bench.run`` runs it as the part ``pipeline``.

One server, one run. Its registry holds the benchmark's speech recognition model (``sensevoice``), the
REAL FSMN-VAD export (``fsmn``, fetched by ``tests/fsmn_vad.py``) and a stand-in CT-Transformer
punctuation model (``punc``), and two pipelines: ``full`` (vad + asr + punc) and ``asr-punc``. Clips of
speech-like audio with pauses go, round by round, to the engine's VAD in this process and to the server
as ``model=sensevoice``, ``model=asr-punc`` and ``model=full``, in an order that rotates every round, so
background load lands on every path alike. The VAD's time inside the server is what its stage records
per request (the ``fsmn`` model's request stats, published in its heartbeat).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from numpy.typing import NDArray

from bench import standalone
from bench.common import (
    HEARTBEAT_S,
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
from server.engines.vad import FsmnVadEngine
from server.lifecycle.board import WorkerBoard
from server.storage.catalog import ModelCatalog
from server.storage.registry import Registry
from server.testing import synth
from server.testing.modelgen_punc import PuncSpec, make_punc_model
from tests.fsmn_vad import cache_root, obtain_fsmn_vad

ASR, VAD, PUNC = "sensevoice", "fsmn", "punc"
VAD_VERSION = "v1"
PATHS = {  # the request's ``model`` -> the stages it runs
    ASR: "asr alone",
    "asr-punc": "asr + punc",
    "full": "vad + asr + punc",
}
PIPELINES = {"asr-punc": {"asr": ASR, "punc": PUNC}, "full": {"vad": VAD, "asr": ASR, "punc": PUNC}}
EXPECTED = {  # what each path's answer must name
    ASR: None,
    "asr-punc": {"asr": f"{ASR}@a", "punc": f"{PUNC}@p1"},
    "full": {"vad": f"{VAD}@{VAD_VERSION}", "asr": f"{ASR}@a", "punc": f"{PUNC}@p1"},
}
FULL_CLIPS = ((10.0, 24), (30.0, 12), (60.0, 8))  # (clip seconds, measured rounds)
QUICK_CLIPS = ((10.0, 3),)
WARMUP = 2
# Goals. The stand-in ASR costs what SenseVoice-small int8 does (40 ms of CPU per audio second, RTF
# 0.04), the cheapest speech recognition voxswap serves, so the ratios below are their worst case.
VAD_RTF_GOAL = 0.01  # a quarter of that ASR: the detector is never the larger part of a pipeline
STAGES_GOAL = 1.05  # asr + punc: two more leases and a punctuation pass, as small as the server's own overhead
FULL_GOAL = 1.25  # vad + asr + punc: the VAD's quarter at most, the rest of the stages within noise


@dataclass
class Clip:
    seconds: float
    rounds: int
    samples: NDArray[np.float32]
    wav: bytes
    speech_s: float
    direct: list[float] = field(default_factory=list)  # VAD engine seconds, in this process
    segments: list[int] = field(default_factory=list)  # VAD segments found (engine)
    latency: dict[str, list[float]] = field(default_factory=dict)  # path -> request seconds
    inference: dict[str, list[float]] = field(default_factory=dict)  # path -> the server's processing_ms / 1000
    pieces: dict[str, list[int]] = field(default_factory=dict)  # path -> segments in the answer
    served_vad: list[float] = field(default_factory=list)  # the VAD stage's seconds inside the server
    failed: int = 0
    mislabelled: int = 0
    measured_from: float = 0.0  # wall clock (the request stats' clock) of the measured rounds
    measured_to: float = 0.0


def speech_with_pauses(seconds: float, *, seed: int) -> tuple[NDArray[np.float32], float]:
    """``seconds`` of speech-like stretches of 2-6 s between pauses of 0.4-1.5 s; and the speech seconds."""
    rng = np.random.default_rng(seed)
    pattern: list[tuple[str, float]] = [("silence", 0.3)]
    total, speech = 0.3, 0.0
    while total < seconds:
        talk = min(float(rng.uniform(2.0, 6.0)), seconds - total)
        pause = float(rng.uniform(0.4, 1.5))
        pattern += [("speech", talk), ("silence", pause)]
        total += talk + pause
        speech += talk
    samples = synth.islands(pattern, seed=seed)[: round(seconds * synth.SAMPLE_RATE)]
    return samples, speech


def make_registry_with_stages(root: Path, asr_folder: Path, vad_folder: Path, punc_folder: Path) -> Registry:
    """The default model (version ``a``), ``fsmn`` (the real VAD) and ``punc``, each with a live version."""
    registry = Registry(root).ensure()
    registry.add(asr_folder, "a", source="bench")
    registry.promote("a", actor="bench")
    catalog = ModelCatalog(root)
    vad = catalog.create(VAD, "fsmn-vad")
    vad.add(vad_folder, VAD_VERSION, source="bench")
    vad.promote(VAD_VERSION, actor="bench")
    punc = catalog.create(PUNC, "ct-punc")
    punc.add(punc_folder, "p1", source="bench")
    punc.promote("p1", actor="bench")
    return registry


def run(bench: Bench) -> Section:
    profile = bench.profile
    threads = threads_for(1)
    clips_spec = QUICK_CLIPS if profile.quick else FULL_CLIPS
    section = Section(
        "pipeline", "7. Pipelines: voice activity detection and the cost of stages",
        f"One `voxswap serve` (1 worker, {threads} onnxruntime threads) whose registry holds the benchmark's "
        f"speech recognition model (`{ASR}`), the real FSMN-VAD export (`{VAD}`, `model.onnx`) and a stand-in "
        f"CT-Transformer punctuation model (`{PUNC}`), with the pipelines `asr-punc` (asr + punc) and `full` "
        "(vad + asr + punc). Clips of speech-like audio (stretches of 2-6 s between pauses of 0.4-1.5 s, "
        "`server.testing.synth.islands`) go, round by round, to `FsmnVadEngine.segments` in the benchmark process "
        f"({threads} threads) and to `POST /api/transcribe` with `model` = `{ASR}`, `asr-punc` and `full`, in an "
        f"order that rotates every round ({WARMUP} warm-up rounds first). The VAD's time in the server is the time "
        "its stage records per request (the `fsmn` model's request stats, from its heartbeat). *RTF*: seconds of "
        "compute per second of audio.",
    )
    try:
        vad_folder = obtain_fsmn_vad(cache_root())
    except RuntimeError as exc:
        section.notes.append(f"Not measured: the real FSMN-VAD export is unavailable here ({exc}).")
        section.data = {"vad_available": False, "clips": {}}
        return section
    root = bench.workdir / "pipeline"
    punc_folder = make_punc_model(root / "punc-model", PuncSpec())
    registry = make_registry_with_stages(root / "registry", bench.models.a, vad_folder, punc_folder)
    clips = []
    for i, (seconds, rounds) in enumerate(clips_spec):
        samples, speech = speech_with_pauses(seconds, seed=100 + i)
        clips.append(Clip(seconds, rounds, samples, synth.wav_bytes(samples), speech))
    engine = FsmnVadEngine(vad_folder, model_file="model.onnx", threads=threads)
    try:
        with bench.server(registry) as server, \
                httpx.Client(base_url=server.url, headers=server.auth, timeout=600) as client:
            for name, stages in PIPELINES.items():
                response = client.put(f"/admin/pipelines/{name}", json=stages)
                if response.status_code != 200:
                    raise RuntimeError(f"pipeline {name} was refused: {response.status_code} {response.text[:300]}")
            board = WorkerBoard(ModelCatalog(registry.root).registry(VAD))
            for clip in clips:
                _measure(engine, client, clip)
                clip.served_vad = _served_vad(board, clip)
    finally:
        engine.close()
    section.data = _analyse(clips, threads, bench.models.label)
    describe(section, section.data)
    return section


def _measure(engine: FsmnVadEngine, client: httpx.Client, clip: Clip) -> None:
    """Warm-up rounds, then ``clip.rounds`` rounds of the direct VAD and every path, rotating the order."""

    def direct() -> None:
        started = time.perf_counter()
        found = engine.segments(clip.samples)
        clip.direct.append(time.perf_counter() - started)
        clip.segments.append(len(found))

    def served(model: str) -> Callable[[], None]:
        def call() -> None:
            started = time.perf_counter()
            response = client.post("/api/transcribe", files={"file": ("clip.wav", clip.wav, "audio/wav")},
                                   data={"model": model})
            elapsed = time.perf_counter() - started
            if response.status_code != 200:
                clip.failed += 1
                return
            body = response.json()
            if body.get("model_versions") != EXPECTED[model] and not (EXPECTED[model] is None
                                                                       and "model_versions" not in body):
                clip.mislabelled += 1
            clip.latency.setdefault(model, []).append(elapsed)
            clip.inference.setdefault(model, []).append(float(body["processing_ms"]) / 1000)
            clip.pieces.setdefault(model, []).append(len(body["segments"]))
        return call

    calls = [direct, *(served(model) for model in PATHS)]
    for i in range(WARMUP + clip.rounds):
        if i == WARMUP:
            clip.direct.clear()
            clip.segments.clear()
            clip.latency.clear()
            clip.inference.clear()
            clip.pieces.clear()
            clip.failed = clip.mislabelled = 0
            clip.measured_from = time.time()
        for call in calls[i % len(calls):] + calls[: i % len(calls)]:
            call()
    clip.measured_to = time.time()


def _served_vad(board: WorkerBoard, clip: Clip) -> list[float]:
    """The VAD stage's per-request seconds inside the server over ``clip``'s measured rounds."""
    since, until = clip.measured_from, clip.measured_to
    deadline = time.monotonic() + 20 * HEARTBEAT_S
    while True:
        found: list[float] = []
        fresh = False
        for worker in board.workers():
            stats = worker.stats.get(VAD_VERSION, {})
            found += [latency for at, latency in zip(stats.get("at", []), stats.get("latency", []), strict=False)
                      if since <= at <= until]
            fresh = fresh or worker.heartbeat_at > until
        if (fresh and len(found) >= clip.rounds) or time.monotonic() > deadline:
            return found
        time.sleep(HEARTBEAT_S / 2)


def _worst(values: dict[str, float]) -> tuple[str, float]:
    """The clip with the largest value (NaN counts as the largest: nothing measured is not a pass)."""
    if not values:
        return "", float("nan")
    key = max(values, key=lambda k: float("inf") if values[k] != values[k] else values[k])
    return key, values[key]


def _analyse(clips: list[Clip], threads: int, asr_label: str) -> dict[str, Any]:
    """The numbers of the run, per clip: everything :func:`describe` needs."""
    data: dict[str, Any] = {"vad_available": True, "threads": threads, "clips": {}, "asr_model": asr_label}
    for clip in clips:
        alone = clip.latency.get(ASR, [])
        row: dict[str, Any] = {
            "clip_s": clip.seconds, "speech_s": clip.speech_s, "n": len(clip.direct),
            "vad_segments": median([float(n) for n in clip.segments]),
            "vad_direct_p50": median(clip.direct), "vad_served_p50": median(clip.served_vad),
            "n_served_vad": len(clip.served_vad), "failed": clip.failed, "mislabelled": clip.mislabelled,
            "paths": {},
        }
        row["vad_direct_rtf"] = row["vad_direct_p50"] / clip.seconds
        row["vad_served_rtf"] = row["vad_served_p50"] / clip.seconds
        for model in PATHS:
            latency, inference = clip.latency.get(model, []), clip.inference.get(model, [])
            row["paths"][model] = {
                "n": len(latency), "p50": median(latency), "p99": pct(latency, 99),
                "ratio_p50": median(latency) / median(alone),
                "inference_p50": median(inference),
                "outside_p50": median([t - i for t, i in zip(latency, inference, strict=True)]),
                "pieces": median([float(n) for n in clip.pieces.get(model, [])]),
            }
        add_stages(row)
        data["clips"][f"{clip.seconds:g}"] = row
    rows = data["clips"].values()
    data["failed"] = sum(r["failed"] for r in rows)
    data["mislabelled"] = sum(r["mislabelled"] for r in rows)
    data["requests"] = data["failed"] + sum(cell["n"] for r in rows for cell in r["paths"].values())
    return data


def add_stages(row: dict[str, Any]) -> None:
    """Each path's stages' own time: what it spends outside speech recognition beyond what ASR alone does,
    and that over ASR alone's p50."""
    alone = row["paths"][ASR]
    for cell in row["paths"].values():
        cell["stages_s"] = cell["outside_p50"] - alone["outside_p50"]
        cell["stages_ratio"] = 1 + cell["stages_s"] / alone["p50"]


def describe(section: Section, data: dict[str, Any]) -> None:
    """Tables, goals and notes from the numbers alone, so that a report can be rewritten from its JSON."""
    rows: dict[str, dict[str, Any]] = data["clips"]
    data["goals"] = {"vad_rtf": VAD_RTF_GOAL, "asr-punc": STAGES_GOAL, "full": FULL_GOAL}
    section.tables.append(Table(
        ["clip", "speech", "n", "segments", "engine p50 ms", "engine RTF", "n in server", "in server p50 ms",
         "in server RTF"],
        [[f"{k} s", f"{r['speech_s'] / r['clip_s']:.0%}", str(r["n"]), f"{r['vad_segments']:g}",
          ms(r["vad_direct_p50"], 1), ratio(r["vad_direct_rtf"], 4), str(r["n_served_vad"]), ms(r["vad_served_p50"], 1),
          ratio(r["vad_served_rtf"], 4)] for k, r in rows.items()],
        "FSMN-VAD: cost per audio second"))
    section.tables.append(Table(
        ["clip", "path", "n", "p50 ms", "p99 ms", "ASR inference p50 ms", "outside ASR p50 ms", "pieces",
         "stages ms", "stages: p50 / asr alone", "whole p50 / asr alone"],
        [[f"{k} s", PATHS[model], str(cell["n"]), ms(cell["p50"], 0), ms(cell["p99"], 0), ms(cell["inference_p50"], 0),
          ms(cell["outside_p50"], 1), f"{cell['pieces']:g}",
          *(["-"] * 3 if model == ASR else [ms(cell["stages_s"], 1), ratio(cell["stages_ratio"], 3),
                                           ratio(cell["ratio_p50"], 3)])]
         for k, r in rows.items() for model, cell in r["paths"].items()],
        "Requests: pipelines against the same ASR model named directly"))

    def each(values: dict[str, float], digits: int) -> str:
        return ", ".join(f"{k} s: {ratio(v, digits)}" for k, v in values.items())

    worst: dict[str, float] = {}
    for key, where in (("vad_direct_rtf", "engine"), ("vad_served_rtf", "in the server's pipeline")):
        values = {k: r[key] for k, r in rows.items()}
        clip, worst[key] = _worst(values)
        section.goals.append(Goal(
            f"FSMN-VAD cost per audio second, {where}", f"RTF <= {VAD_RTF_GOAL:g} on every clip",
            f"{ratio(worst[key], 4)} at worst ({clip} s); {each(values, 4)}", worst[key] <= VAD_RTF_GOAL))
    for model, limit in (("asr-punc", STAGES_GOAL), ("full", FULL_GOAL)):
        values = {k: r["paths"][model]["stages_ratio"] for k, r in rows.items()}
        clip, worst[model] = _worst(values)
        whole = {k: r["paths"][model]["ratio_p50"] for k, r in rows.items()}
        section.goals.append(Goal(
            f"pipeline {PATHS[model]}: its stages' time over asr alone", f"<= {limit:g}x asr alone's p50, every clip",
            f"{ratio(worst[model], 3)}x at worst ({clip} s); {each(values, 3)} (whole requests: {each(whole, 2)})",
            worst[model] <= limit))
    data["worst"] = worst
    section.goals.append(Goal("failed or mislabelled pipeline answers", "0",
                              f"{data['failed']} failed, {data['mislabelled']} mislabelled of {data['requests']}",
                              data["failed"] == 0 and data["mislabelled"] == 0))

    section.notes.append(
        f"ASR model: {data['asr_model']}. *outside ASR* = p50 of (a request's latency - the `processing_ms` its "
        "answer reports), `processing_ms` being the speech recognition stage's inference alone: for `asr alone` "
        "HTTP, decoding and the thread hops; a pipeline adds its VAD and punctuation stages and their leases. "
        "*stages ms* = a path's outside ASR - asr alone's: what the pipeline's stages cost a request; *stages: p50 "
        "/ asr alone* = (asr alone's p50 + stages ms) / asr alone's p50, which the goals judge. *whole p50 / asr "
        "alone* compares whole requests, ASR inference included. *pieces*: segments in the answer; the VAD path's "
        "are the detector's segments (merged while they fit the 30 s window), not the energy splitter's.")
    shares = [cell["inference_p50"] / cell["p50"] for r in rows.values() for cell in r["paths"].values()]
    section.notes.append(
        "Why the goals judge the stages' time and not whole requests: speech recognition is "
        f"{min(shares, default=float('nan')):.0%}-{max(shares, default=float('nan')):.0%} of a request's p50 here, "
        "and its time varied between neighbouring requests far more than any stage costs (see "
        "*ASR inference* of `asr alone` against `asr + punc`: the same model on the same pieces). Whole-request "
        "ratios of a few dozen requests on this shared machine measure that noise; the time outside ASR does not "
        "include it. It leaves out one real effect: ASR on the detector's pieces instead of the energy splitter's, "
        "which the stand-in (whose cost per second falls as pieces grow) cannot price the way a real model would.")
    section.notes.append(
        "The punctuation model is a stand-in (`server/testing/modelgen_punc.py`) whose graph costs next to "
        "nothing, so `asr + punc` measures the stage machinery (a second lease and one punctuation pass per "
        "segment through funasr-onnx's `CT_Transformer`), not a real CT-Transformer's compute.")
    section.notes.append(
        f"Goals: the stand-in ASR costs what SenseVoice-small int8 does (about 40 ms of CPU per audio second, RTF "
        f"0.04), the cheapest speech recognition voxswap serves, so its ratios are the worst case (a Paraformer-"
        f"large costs more per second, and the same VAD less in proportion). VAD RTF <= {VAD_RTF_GOAL:g} is a "
        f"quarter of that: the detector is never the larger part of a pipeline. asr + punc <= {STAGES_GOAL:g}x: "
        "the stages' machinery may cost what the server's own overhead does (section 1's 10 s goal). vad + asr + "
        f"punc <= {FULL_GOAL:g}x: the VAD's quarter at most, everything else within noise.")
    over = {k: r for k, r in rows.items() if not r["paths"]["full"]["stages_ratio"] <= FULL_GOAL}
    if over:
        section.notes.append(
            "Where vad + asr + punc missed its goal, asr alone ran at "
            + ", ".join(f"{r['paths'][ASR]['p50'] / r['clip_s'] * 1000:.0f} ms per audio second ({k} s)"
                        for k, r in over.items())
            + f" against the VAD's {', '.join(ms(r['vad_served_rtf'], 1) for r in over.values())} ms in the server: "
            "the stand-in's cost per second falls as its pieces grow, so on long single pieces it is cheaper than "
            "SenseVoice-small's 40 ms and the VAD's share larger. Against 40 ms per audio second the same stages "
            "would be " + ", ".join(f"{1 + r['paths']['full']['stages_s'] / (0.04 * r['clip_s']):.2f}x ({k} s)"
                                    for k, r in over.items()) + ".")
    section.notes.append("p99 of a few dozen samples is close to the maximum: read it as 'worst seen'.")


def main(argv: Sequence[str] | None = None) -> int:
    return standalone.main("pipeline", __doc__ or "", run, argv)


if __name__ == "__main__":
    sys.exit(main())
