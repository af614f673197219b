"""Logs of a real server process: JSON lines, request ids everywhere, events with timings, quiet probes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx

from server.storage.registry import Registry
from server.testing import synth
from testkit.processes import start_server


def test_json_logs_carry_request_ids_and_swap_events_and_rotate(tmp_path: Path, model_dir: Callable[..., Path]) -> None:
    reg = Registry(tmp_path / "registry").ensure()
    reg.add(model_dir("logged model a"), "a")
    reg.add(model_dir("logged model b"), "b")
    reg.promote("a")
    log_file = tmp_path / "voxswap.log"
    server = start_server(reg.root, tmp_path / "run", env={
        "VOXSWAP_LOG_FORMAT": "json", "VOXSWAP_LOG_FILE": str(log_file), "VOXSWAP_LOG_LEVEL": "DEBUG",
        "VOXSWAP_LOG_MAX_MB": "0.02", "VOXSWAP_LOG_BACKUPS": "3"})
    try:
        clip = synth.wav_bytes(synth.speech_like(1.0))
        r = httpx.post(f"{server.url}/api/transcribe", files={"file": ("c.wav", clip)},
                       headers={"X-Request-Id": "req-log-1"})
        assert r.status_code == 200
        for _ in range(5):
            httpx.get(f"{server.url}/health")
            httpx.get(f"{server.url}/metrics")
        r = server.update("b")
        assert r.status_code == 200
        for i in range(60):  # enough lines to pass 20 KB and rotate
            httpx.post(f"{server.url}/api/transcribe", files={"file": ("c.wav", clip)},
                       headers={"X-Request-Id": f"req-fill-{i}"})
    finally:
        server.stop()
    files = sorted(tmp_path.glob("voxswap.log*"))
    assert len(files) >= 2, "the log file never rotated"
    records = [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]
    mine = [r for r in records if r.get("request_id") == "req-log-1"]
    assert {r["logger"] for r in mine} >= {"uvicorn.access", "voxswap.service"}  # the inference thread too
    transcribed = next(r for r in mine if r.get("event") == "transcribed")
    assert transcribed["version"] == "a" and transcribed["inference_s"] > 0
    assert not [r for r in records if r["logger"] == "uvicorn.access" and ("/health" in r["message"]
                                                                          or "/metrics" in r["message"])]
    done = [r for r in records if r.get("event") == "swap_done" and r.get("version") == "b"]
    assert done, "no swap_done event"
    for key in ("verify_s", "load_s", "smoke_s", "drain_s", "free_s", "total_s", "freed_bytes", "model_bytes"):
        assert key in done[-1], key
    assert any(r.get("event") == "swap_start" for r in records)
