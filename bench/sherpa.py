"""sherpa-onnx beside voxswap: the same generated graph run by sherpa-onnx's C++ ``OfflineRecognizer``.

``python -m bench.sherpa [--quick] [--arch sensevoice-small] [--model-dir DIR]`` prints a Markdown
section; ``run(bench)`` is the part ``bench.run`` can call on its own models.

Every generated stand-in carries the metadata and ``tokens.txt`` that sherpa-onnx's SenseVoice loader
reads (see :func:`server.testing.modelgen.sherpa_metadata`), so one model file is decoded three ways
with one thread budget (the cores): sherpa-onnx (``num_threads``), funasr-onnx called directly
(voxswap's bare ``Engine``, batches like voxswap's batcher makes) and a real ``voxswap serve`` with
the same onnxruntime threads. Each of the first two lives in its own spawned process (sherpa-onnx
brings its own onnxruntime library), idle while another is measured; the windows of the three are
taken in turn, so drifting background load hits them alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import multiprocessing as mp
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack, suppress
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from numpy.typing import NDArray

from bench.common import FULL, QUICK, TEXT_A, Bench, Goal, ModelSet, Profile, Section, Table, ratio, threads_for
from bench.standalone import print_section
from bench.throughput import _cell
from server.speech import audio
from server.storage.manifest import MODEL_FILES
from server.storage.registry import Registry
from server.testing import synth
from server.testing.modelgen import TOKENS_FILE
from server.testing.onnx_build import read_props
from testkit.harness import post_clip

CONCURRENCIES = (1, 4)  # closed-loop clients; the thread budget is the cores whatever the concurrency
CLIP_SEED = 11  # the throughput part's clip
# what sherpa-onnx's OfflineSenseVoiceModel exits without (the process ends: no exception to catch)
SHERPA_KEYS = ("vocab_size", "lfr_window_size", "lfr_window_shift", "normalize_samples", "with_itn", "without_itn",
               "lang_auto", "lang_zh", "lang_en", "lang_ja", "lang_ko", "lang_yue", "neg_mean", "inv_stddev")
TAG = re.compile(r"<\|[^|]*\|>")
Clip = NDArray[np.float32]
Decode = Callable[[list[Clip]], list[str]]


# -- the decoders, each in its own spawned process --------------------------------------------------


def _sherpa(folder: Path, model_file: str, threads: int) -> tuple[Decode, str]:
    import sherpa_onnx

    recognizer = sherpa_onnx.OfflineRecognizer.from_sense_voice(
        model=str(folder / model_file), tokens=str(folder / TOKENS_FILE), num_threads=threads)

    def decode(clips: list[Clip]) -> list[str]:
        streams = []
        for clip in clips:
            stream = recognizer.create_stream()
            stream.accept_waveform(synth.SAMPLE_RATE, clip)
            streams.append(stream)
        if len(streams) == 1:
            recognizer.decode_stream(streams[0])
        else:
            recognizer.decode_streams(streams)  # one batched session run, as its own server does
        return [str(s.result.text).strip() for s in streams]

    return decode, f"sherpa-onnx {sherpa_onnx.__version__} (its onnxruntime {_bundled_ort(sherpa_onnx.__file__)})"


def _bundled_ort(package_file: str) -> str:
    """The version of the onnxruntime library a sherpa-onnx wheel ships (OrtGetApiBase's string)."""
    import ctypes

    class ApiBase(ctypes.Structure):
        _fields_ = [("get_api", ctypes.c_void_p), ("get_version_string", ctypes.CFUNCTYPE(ctypes.c_char_p))]

    try:
        lib = ctypes.CDLL(str(Path(package_file).parent / "lib" / "libonnxruntime.so"))
        lib.OrtGetApiBase.restype = ctypes.POINTER(ApiBase)
        return str(lib.OrtGetApiBase().contents.get_version_string().decode())
    except (OSError, AttributeError, ValueError):
        return "version unknown"


def _funasr(folder: Path, model_file: str, threads: int) -> tuple[Decode, str]:
    import onnxruntime

    from server.engines.sensevoice import Engine

    engine = Engine(folder, model_file=model_file, threads=threads)

    def decode(clips: list[Clip]) -> list[str]:
        return [TAG.sub("", raw).strip() for raw in engine.transcribe_batch(clips)]

    return decode, f"funasr-onnx direct (onnxruntime {onnxruntime.__version__})"


def _rate(decode: Decode, clip: Clip, mode: str, concurrency: int, seconds: float) -> float:
    """Clips per second: ``concurrency`` callers of one clip each ("callers"), or one caller of
    batches of ``concurrency`` clips ("batch")."""
    callers, batch = (concurrency, 1) if mode == "callers" else (1, concurrency)
    counts = [0] * callers
    start = threading.Barrier(callers + 1)
    deadline: list[float] = []

    def loop(i: int) -> None:
        start.wait()
        while time.perf_counter() < deadline[0]:
            decode([clip] * batch)
            counts[i] += batch

    threads = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(callers)]
    for thread in threads:
        thread.start()
    began = time.perf_counter()
    deadline.append(began + seconds)
    start.wait()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - began)


def _child(kind: str, folder: str, model_file: str, threads: int, wav: bytes, conn: Connection) -> None:
    """Spawned: load one decoder, answer its texts for the clip, then measure as each request says."""
    try:
        decode, label = (_sherpa if kind == "sherpa" else _funasr)(Path(folder), model_file, threads)
        clip = audio.decode(wav, max_seconds=3600).samples
        conn.send(("ready", label, decode([clip])[0]))  # also the first-use costs, outside any window
    except Exception as exc:  # told to the parent, which reports it instead of waiting
        conn.send(("error", f"{type(exc).__name__}: {exc}", ""))
        return
    while (job := conn.recv()) is not None:
        conn.send(_rate(decode, clip, *job))


class Decoder:
    """A spawned process holding one decoder of the model, measured on demand."""

    def __init__(self, kind: str, folder: Path, model_file: str, threads: int, wav: bytes):
        ctx = mp.get_context("spawn")  # never fork a process that may hold an onnxruntime session
        self.pipe, theirs = ctx.Pipe()
        self.process = ctx.Process(target=_child, name=f"bench-{kind}", daemon=True,
                                   args=(kind, str(folder), model_file, threads, wav, theirs))
        self.label = self.text = ""

    def __enter__(self) -> Decoder:
        self.process.start()
        status, self.label, self.text = self._receive(600)
        if status != "ready":
            self.close()
            raise RuntimeError(f"{self.process.name} could not decode: {self.label}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def rate(self, mode: str, concurrency: int, seconds: float) -> float:
        self.pipe.send((mode, concurrency, seconds))
        return float(self._receive(600 + seconds))

    def _receive(self, timeout_s: float) -> Any:
        """The child's next message; raises at once if it died (sherpa-onnx exits on a bad model)."""
        deadline = time.monotonic() + timeout_s
        while not self.pipe.poll(1.0):
            if not self.process.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{self.process.name} did not answer (exit code {self.process.exitcode})")
        return self.pipe.recv()

    def close(self) -> None:
        with suppress(OSError):
            self.pipe.send(None)
        self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=10)
        self.pipe.close()


# -- the part --------------------------------------------------------------------------------------


def _skip(section: Section, why: str) -> Section:
    section.notes.append(f"Not measured: {why}.")
    section.data = {"skipped": why}
    return section


def run(bench: Bench, concurrencies: Sequence[int] = CONCURRENCIES) -> Section:
    profile, models = bench.profile, bench.models
    folder, model_file, clip_s = models.a, models.model_file, profile.throughput_clip_s
    threads = threads_for(1)
    section = Section(
        "sherpa", "10. sherpa-onnx's C++ runtime on the same graph",
        f"One model file (`{model_file}`) decoded by sherpa-onnx's C++ `OfflineRecognizer` "
        f"(`from_sense_voice`, `num_threads={threads}`), by funasr-onnx called directly (voxswap's bare `Engine`, "
        f"one batch of *c* clips per session run) and by `voxswap serve` (1 worker, {threads} onnxruntime threads, "
        f"its default settings), each in its own process, on a {clip_s:g} s clip, in "
        f"{profile.throughput_rounds} windows of {profile.throughput_s:g} s per cell taken in turn. "
        "*c callers*: c threads each decoding one clip on "
        "one recognizer; *batch*: `decode_streams` on c clips at once, as sherpa-onnx's own server batches. "
        "voxswap's clients are closed-loop HTTP clients on the same machine.")
    if importlib.util.find_spec("sherpa_onnx") is None:
        return _skip(section, "sherpa-onnx is not installed (`pip install sherpa-onnx`, a benchmark-only tool)")
    props = read_props(folder / model_file)
    missing = [key for key in SHERPA_KEYS if key not in props]
    if missing or not (folder / TOKENS_FILE).is_file():
        return _skip(section, f"{folder.name}/{model_file} lacks what sherpa-onnx's SenseVoice loader reads "
                              f"({', '.join(missing) or TOKENS_FILE}); only generated stand-ins carry it")
    expected = props.get("text", "")
    wav = synth.wav_bytes(synth.speech_like(clip_s, seed=CLIP_SEED))
    cells: dict[int, dict[str, float]] = {}
    with ExitStack() as stack:
        sherpa = stack.enter_context(Decoder("sherpa", folder, model_file, threads, wav))
        direct = stack.enter_context(Decoder("funasr", folder, model_file, threads, wav))
        server = stack.enter_context(bench.server(bench.registry))
        with httpx.Client(base_url=server.url, timeout=600) as client:
            answer = post_clip(client, "/api/transcribe", wav)
        said = {"sherpa-onnx": sherpa.text, "funasr-onnx": direct.text, "voxswap": (answer.text or "").strip()}
        for who, text in said.items():
            section.goals.append(Goal(f"{who} decodes the stand-in", f"its sentence, {expected!r}",
                                      repr(text), text == expected if expected else None))
        for c in concurrencies:
            cells[c] = _alternating(sherpa, direct, server.url, wav, c, profile)
    rows = []
    for c, cell in cells.items():
        best_sherpa = max(cell["sherpa_callers"], cell.get("sherpa_batch", 0.0))
        cell["vs_sherpa"], cell["vs_direct"] = cell["voxswap"] / best_sherpa, cell["voxswap"] / cell["direct"]
        rows.append([str(c), f"{cell['sherpa_callers']:.2f}",
                     f"{cell['sherpa_batch']:.2f}" if "sherpa_batch" in cell else "-", f"{cell['direct']:.2f}",
                     f"{cell['voxswap']:.2f}", f"{cell['voxswap'] * clip_s:.1f}", ratio(cell["vs_sherpa"]),
                     ratio(cell["vs_direct"]), str(int(cell["failed"]))])
        section.goals.append(Goal(f"voxswap against sherpa-onnx, concurrency {c}", "-",
                                  f"{cell['vs_sherpa']:.2f} of its best", None))
    section.tables.append(Table(
        ["concurrency", "sherpa-onnx clips/s (c callers)", "sherpa-onnx clips/s (batch)", "funasr-onnx direct clips/s",
         "voxswap clips/s", "voxswap audio s/s", "voxswap / sherpa-onnx", "voxswap / funasr-onnx", "failed"], rows))
    section.notes += [
        f"Runtimes: {sherpa.label}; {direct.label}; voxswap's server runs the latter.",
        "*voxswap / sherpa-onnx* divides by the better of sherpa-onnx's two ways at that concurrency.",
        "sherpa-onnx ran the stand-in's own graph, not a look-alike: it read the metadata and tokens.txt "
        "the generator writes, and its greedy CTC over the graph's logits spelled the stand-in's sentence.",
    ]
    section.data = {"clip_s": clip_s, "threads": threads, "model_file": model_file, "texts": said,
                    "cells": {str(c): cell for c, cell in cells.items()}}
    return section


def _alternating(sherpa: Decoder, direct: Decoder, url: str, wav: bytes, concurrency: int,
                 profile: Profile) -> dict[str, float]:
    """Mean clips/s of each way over the rounds, its windows taken in turn with the others'."""
    seconds, rounds = profile.throughput_s, profile.throughput_rounds
    sums: dict[str, float] = {"failed": 0.0}
    for _ in range(rounds):
        measured = {"sherpa_callers": sherpa.rate("callers", concurrency, seconds),
                    "direct": direct.rate("batch", concurrency, seconds)}
        if concurrency > 1:
            measured["sherpa_batch"] = sherpa.rate("batch", concurrency, seconds)
        rate, _p50, failed, _shares = _cell(url, wav, concurrency, seconds, 1)
        measured["voxswap"] = rate
        sums["failed"] += failed
        for key, value in measured.items():
            sums[key] = sums.get(key, 0.0) + value / rounds
    return sums


# -- on its own ------------------------------------------------------------------------------------


def _model(args: argparse.Namespace, profile: Profile, root: Path) -> tuple[Path, str]:
    """The model folder to measure and a line describing it."""
    if args.model_dir is not None:
        return args.model_dir, f"{args.model_dir}"
    if args.arch == "sensevoice-small":
        from server.testing.modelgen_small import SmallSpec, make_sensevoice_small

        spec = SmallSpec(text=TEXT_A, quantize=True)
        if profile.quick:
            spec = dataclasses.replace(spec, num_blocks=2, tp_blocks=1)
        print("[bench] generating the SenseVoice-small stand-in (a minute or more) ...", file=sys.stderr, flush=True)
        folder = make_sensevoice_small(root / "small", spec)
        (folder / "model.onnx").unlink()  # the int8 file is measured: the registry need not copy 940 MB more
        return folder, "SenseVoice-small stand-in, int8" + (" (2+1 blocks, quick)" if profile.quick else " (234M)")
    from server.testing.modelgen import TestModelSpec, make_test_model

    folder = make_test_model(root / "tiny", TestModelSpec(TEXT_A, weights_mb=profile.weights_mb,
                                                          compute_ms=profile.compute_ms))
    return folder, (f"generated stand-in, {profile.weights_mb} MB weights, {profile.compute_ms:g} ms CPU per "
                    "audio second")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sherpa", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short windows and a cheap model: proves the harness")
    parser.add_argument("--arch", choices=("tiny", "sensevoice-small"), default="tiny",
                        help="the stand-in to generate (sensevoice-small: the real architecture, int8)")
    parser.add_argument("--model-dir", type=Path, help="an already generated stand-in folder instead")
    parser.add_argument("--clip-s", type=float, help="clip length in seconds (default 5; quick 1)")
    parser.add_argument("--window-s", type=float, help="one measuring window in seconds (default 4; quick 0.5)")
    parser.add_argument("--concurrency", default=",".join(map(str, CONCURRENCIES)),
                        help="comma-separated closed-loop concurrencies (default %(default)s)")
    args = parser.parse_args(argv)
    profile = QUICK if args.quick else FULL
    if args.clip_s:
        profile = dataclasses.replace(profile, throughput_clip_s=args.clip_s)
    if args.window_s:
        profile = dataclasses.replace(profile, throughput_s=args.window_s)
    workdir = Path(tempfile.mkdtemp(prefix="voxswap-sherpa-"))
    try:
        folder, label = _model(args, profile, workdir / "models")
        registry = Registry(workdir / "registry").ensure()
        registry.add(folder, "a", source="bench")
        registry.promote("a", actor="bench")
        served = registry.version_dir("a")
        model_file = next(name for name in MODEL_FILES if (served / name).is_file())  # as prefer_quantized picks
        models = ModelSet(served, served, model_file, {}, (served / model_file).stat().st_size, label)
        section = run(Bench(profile, workdir, workdir, "sherpa", models, registry),
                      [int(c) for c in args.concurrency.split(",")])
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return print_section(section, models_label=label)


if __name__ == "__main__":
    sys.exit(main())
