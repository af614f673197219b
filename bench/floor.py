"""voxswap's own cost per request: p50(voxswap) - p50(bare echo) - p50(direct model call), on the tiny model.

Three calls in turn, in rotating order so that background load lands on all three alike: the model
itself in this process (the tiny test model's ``transcribe_batch`` on the decoded samples), a bare
FastAPI endpoint that receives the same multipart upload and decodes it (``bench/echo.py``: what
any Python server pays for HTTP, multipart and decoding), and ``POST /api/transcribe`` on
``voxswap serve``. What is left when the other two are subtracted is voxswap's: middleware, the
guard, routing, admission and the thread hop, the lease, parsing and JSON.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable

import httpx

from bench.common import Bench, Goal, Section, Table, median, ms
from server.engines.sensevoice import Engine
from server.speech import audio
from server.storage.registry import Registry
from server.testing import synth
from server.testing.modelgen import TestModelSpec, make_test_model
from testkit.harness import wait_until
from testkit.processes import free_port, start_server

WARMUP = 20


def run(bench: Bench) -> Section:
    calls = 30 if bench.profile.quick else 300
    section = Section(
        "floor", "9. voxswap's own cost per request, against a bare FastAPI echo",
        "The tiny test model (its inference is a couple of milliseconds, so the server's own cost is "
        f"visible). {calls} rounds of three calls in rotating order over loopback with keep-alive clients: "
        "the model called directly in this process, a bare FastAPI endpoint receiving the same multipart "
        "upload and decoding it on a thread (`bench/echo.py`), and `POST /api/transcribe` on `voxswap serve` "
        "(1 worker, 1 onnxruntime thread for both the server and the direct call). "
        "*Own cost* = p50(voxswap) - p50(echo) - p50(direct).",
    )
    root = bench.workdir / "floor"
    model = make_test_model(root / "model", TestModelSpec(text="floor model"))
    registry = Registry(root / "registry").ensure()
    registry.add(model, "a", source="bench")
    registry.promote("a", actor="bench")
    wav = synth.wav_bytes(synth.speech_like(1.0, seed=1))
    samples = audio.decode(wav, max_seconds=60).samples
    engine = Engine(registry.version_dir("a"), model_file="model.onnx", threads=1)
    port = free_port()
    echo = subprocess.Popen([sys.executable, "-m", "bench.echo", "--port", str(port)])
    server = start_server(registry.root, root / "server", env={"VOXSWAP_INTRA_OP_THREADS": "1"})
    times: dict[str, list[float]] = {"direct": [], "echo": [], "voxswap": []}
    try:
        wait_until(lambda: _up(f"http://127.0.0.1:{port}/docs"), timeout_s=30, message="the echo server")
        with httpx.Client(base_url=server.url, timeout=60) as vox, \
                httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as bare:
            files = {"file": ("clip.wav", wav, "audio/wav")}
            order: list[tuple[str, Callable[[], object]]] = [
                ("direct", lambda: engine.transcribe_batch([samples], language="auto", use_itn=False)),
                ("echo", lambda: bare.post("/echo", files=files).raise_for_status()),
                ("voxswap", lambda: vox.post("/api/transcribe", files=files).raise_for_status()),
            ]
            for index in range(WARMUP + calls):
                for offset in range(3):
                    name, call = order[(index + offset) % 3]
                    started = time.perf_counter()
                    call()
                    if index >= WARMUP:
                        times[name].append(time.perf_counter() - started)
    finally:
        server.stop()
        echo.terminate()
        echo.wait(10)
        engine.close()
    p50 = {name: median(values) for name, values in times.items()}
    own = p50["voxswap"] - p50["echo"] - p50["direct"]
    section.tables.append(Table(["calls", "direct p50 ms", "echo p50 ms", "voxswap p50 ms", "own cost ms"],
                                [[str(calls), ms(p50["direct"], 3), ms(p50["echo"], 3), ms(p50["voxswap"], 3),
                                  ms(own, 3)]]))
    section.goals.append(Goal("voxswap's own cost per request", "<= 0.3 ms", f"{ms(own, 3)} ms", own <= 0.0003))
    section.notes.append("Before this release the same measure was about 1.0 ms (voxswap 4.42, echo 1.57, direct "
                         "1.80 ms): FastAPI ran every plain-def dependency on its thread pool (a hop per "
                         "request), the answer was deep-copied, and every request stat'ed two registry files.")
    section.data = {"calls": calls, "p50": p50, "own_cost": own}
    return section


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    from bench.standalone import main

    raise SystemExit(main("floor", __doc__ or "", run))
