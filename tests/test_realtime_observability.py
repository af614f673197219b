"""Realtime transcription as operations see it: its metrics, and the shipped nginx config in front of it.

A client streams a spoken turn over a real WebSocket (the ``websockets`` library, as any client of
OpenAI's Realtime protocol would), and ``/metrics`` must tell the story the dashboard's realtime
row and the VoxswapRealtimeTurnsFailing alert read: a session open while it is, a completed turn,
how long its first delta and its final text took, and the audio it streamed. Then the same session
goes through ``deploy/nginx.conf``, past an instance that refuses the handshake.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from websockets.sync.client import connect
from websockets.sync.connection import Connection

from server.app import create_app
from server.settings import Settings
from server.storage.registry import Registry
from server.testing import synth
from testkit.harness import serve_in_thread, wait_until
from testkit.nginx import nginx_binary, run_nginx
from tests.conftest import TEXT_A, TOKEN

RATE = 24_000  # the protocol's default input rate
SPEECH_S, SILENCE_S = 2.5, 1.5  # a turn longer than realtime_segment_s (a delta before the end), then a pause
APPEND_S = 0.1
TURN_TIMEOUT_S = 60.0
NGINX_CONF = Path(__file__).resolve().parents[1] / "deploy" / "nginx.conf"
TRANSCRIPTION = "conversation.item.input_audio_transcription"
SESSION_UPDATE = {"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
    "format": {"type": "audio/pcm", "rate": RATE},
    "transcription": {"model": "default", "language": "en"},
    "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500},
}}}}


def spoken_turn() -> list[str]:
    """Speech then silence as base64 PCM16 at 24 kHz, in 100 ms appends."""
    clip = np.concatenate([synth.speech_like(SPEECH_S, seed=5), synth.silence(SILENCE_S)])
    at_rate = np.interp(np.arange(round(len(clip) * RATE / synth.SAMPLE_RATE)) / RATE,
                        np.arange(len(clip)) / synth.SAMPLE_RATE, clip)
    pcm = (np.clip(at_rate, -1, 1) * 32767).astype("<i2")
    step = round(APPEND_S * RATE)
    return [base64.b64encode(pcm[i:i + step].tobytes()).decode() for i in range(0, len(pcm), step)]


def ws_url(http_url: str) -> str:
    return http_url.replace("http://", "ws://", 1) + "/v1/realtime?intent=transcription"


def receive(ws: Connection) -> dict[str, Any]:
    event: dict[str, Any] = json.loads(ws.recv(timeout=TURN_TIMEOUT_S))
    return event


def transcribe_one_turn(ws: Connection) -> list[dict[str, Any]]:
    """Configure the session, stream the turn, and return the server's events up to its end."""
    ws.send(json.dumps(SESSION_UPDATE))
    assert receive(ws)["type"] == "session.updated"
    for audio in spoken_turn():
        ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + TURN_TIMEOUT_S
    while time.monotonic() < deadline:
        seen.append(receive(ws))
        assert seen[-1]["type"] != "error", seen[-1]
        if seen[-1]["type"] in (f"{TRANSCRIPTION}.completed", f"{TRANSCRIPTION}.failed"):
            return seen
    raise AssertionError(f"no end of the turn within {TURN_TIMEOUT_S} s: {[e['type'] for e in seen]}")


class Talker:
    """A realtime client on a thread of its own, speaking turn after turn in one session until it is
    stopped, ``speed`` times faster than real time: sessions stay open and turns keep ending, so the
    dashboard's realtime row has something to show (tests/e2e/test_observability.py)."""

    def __init__(self, http_url: str, speed: float = 4.0):
        self.url, self.speed = ws_url(http_url), speed
        self.completed = 0
        self.problems: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._talk, name="realtime-talker", daemon=True)

    def __enter__(self) -> Talker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=TURN_TIMEOUT_S + 5)

    def _talk(self) -> None:
        turn = spoken_turn()
        try:
            with connect(self.url) as ws:
                ws.send(json.dumps(SESSION_UPDATE))
                while not self._stop.is_set():
                    for audio in turn:
                        ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))
                        time.sleep(APPEND_S / self.speed)
                        self._read_waiting(ws)
        except Exception as exc:  # reported by the test, never lost on this thread
            self.problems.append(repr(exc))

    def _read_waiting(self, ws: Connection) -> None:
        while True:
            try:
                raw = ws.recv(timeout=0)  # only what has arrived
            except TimeoutError:
                return
            self._note(json.loads(raw))

    def _note(self, event: dict[str, Any]) -> None:
        if event["type"] == f"{TRANSCRIPTION}.completed":
            self.completed += 1
        elif event["type"] in ("error", f"{TRANSCRIPTION}.failed"):
            self.problems.append(json.dumps(event))


def metric(exposition: str, name: str, **labels: str) -> float | None:
    """One sample's value (``name`` as exposed, e.g. ``..._total`` or ``..._count``), None if absent."""
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return float(sample.value)
    return None


def test_a_realtime_session_and_its_turn_show_in_the_metrics(live_server: tuple[str, FastAPI],
                                                             settings: Settings) -> None:
    url, _ = live_server
    model = settings.default_model
    with httpx.Client(base_url=url, timeout=30) as http:
        def scrape() -> str:
            return http.get("/metrics").text

        assert metric(scrape(), "voxswap_realtime_sessions") == 0
        with connect(ws_url(url)) as ws:
            assert receive(ws)["type"] == "session.created"
            # open: the gauge the "Realtime sessions open" panel sums
            assert metric(scrape(), "voxswap_realtime_sessions") == 1
            events = transcribe_one_turn(ws)
            types = [e["type"] for e in events]
            assert types[-1] == f"{TRANSCRIPTION}.completed", types
            assert f"{TRANSCRIPTION}.delta" in types  # partial text came before the end
            assert TEXT_A in events[-1]["transcript"] and events[-1]["model_version"] == "a"
            exposition = scrape()
            assert metric(exposition, "voxswap_realtime_sessions") == 1  # still open between turns

        # the turn: counted once, completed, with both latencies observed, all under the model's name
        assert metric(exposition, "voxswap_realtime_turns_total", model=model, outcome="completed") == 1
        assert not metric(exposition, "voxswap_realtime_turns_total", model=model, outcome="failed")
        for histogram in ("voxswap_realtime_first_delta_seconds", "voxswap_realtime_finalize_seconds"):
            assert metric(exposition, f"{histogram}_count", model=model) == 1, histogram
            observed = metric(exposition, f"{histogram}_sum", model=model)
            assert observed is not None and 0 < observed < TURN_TIMEOUT_S, (histogram, observed)
        # every second streamed, silence included (resampling keeps a few samples of filter delay)
        streamed = metric(exposition, "voxswap_realtime_audio_seconds_total", model=model)
        assert streamed == pytest.approx(SPEECH_S + SILENCE_S, abs=0.05)
        # closed: the gauge comes back down (the session's cleanup runs after the close)
        wait_until(lambda: metric(scrape(), "voxswap_realtime_sessions") == 0, timeout_s=10,
                   message="the session gauge to drop when the session closed")


# -- through deploy/nginx.conf -------------------------------------------------------------------


@pytest.fixture
def full_instance(tmp_path: Path, model_dir: Any) -> Iterator[str]:
    """Another instance that refuses every realtime handshake with a 503, as a full or draining one does."""
    registry = Registry(tmp_path / "full-registry").ensure()
    registry.add(model_dir(TEXT_A), "a")
    registry.promote("a")
    settings = Settings(registry=registry.root, admin_token=TOKEN, seed_demo=False,  # type: ignore[arg-type]
                        realtime_max_sessions=0)
    with serve_in_thread(create_app(settings)) as url:
        yield url


@pytest.mark.e2e
@pytest.mark.skipif(nginx_binary() is None, reason="nginx is not installed")
def test_realtime_sessions_pass_through_nginx_and_skip_an_instance_that_refuses_them(
        live_server: tuple[str, FastAPI], full_instance: str, tmp_path: Path) -> None:
    url, _ = live_server
    refused = httpx.get(f"{full_instance}/v1/realtime?intent=transcription", timeout=10, headers={
        "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": base64.b64encode(b"voxswap-test-key").decode()})
    assert refused.status_code == 503 and "retry-after" in refused.headers, refused.text

    ports = [int(full_instance.rsplit(":", 1)[1]), int(url.rsplit(":", 1)[1])]
    with run_nginx(NGINX_CONF, ports, tmp_path / "nginx") as lb:
        # round robin sends every other handshake to the full instance first: each must land on the
        # other one (proxy_next_upstream http_503), and the upgrade must pass the proxy both ways
        for _ in range(3):
            with connect(ws_url(lb)) as ws:
                assert receive(ws)["type"] == "session.created"
        with connect(ws_url(lb)) as ws:
            assert receive(ws)["type"] == "session.created"
            events = transcribe_one_turn(ws)
            assert events[-1]["type"] == f"{TRANSCRIPTION}.completed" and TEXT_A in events[-1]["transcript"]
