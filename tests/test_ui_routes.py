"""The small JSON routes the operator page reads: its vocabulary and its traffic chart."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.http.ui import histogram_quantile
from server.metrics import LATENCY_BUCKETS
from server.vocab import AUDIO_SUFFIXES, LANGUAGES, HistoryEvent, JobStatus
from tests.conftest import AUTH


def test_the_vocabulary_names_every_event_status_language_and_suffix_without_a_token(client: TestClient) -> None:
    r = client.get("/api/ui/vocabulary")
    assert r.status_code == 200
    vocab = r.json()
    events = {term["id"]: term["label"] for term in vocab["history_events"]}
    assert set(events) == {event.value for event in HistoryEvent}
    assert events["promote"] == "promoted" and events["swap_failed"] == "refused"
    assert "revert" not in events and "reload" not in events  # never written to the history
    assert all(label.strip() for label in events.values())
    statuses = {term["id"]: term for term in vocab["job_statuses"]}
    assert list(statuses) == [status.value for status in JobStatus]
    assert [s for s, term in statuses.items() if term["finished"]] == ["completed", "failed", "cancelled"]
    assert [s for s, term in statuses.items() if term["succeeded"]] == ["completed"]
    assert [term["id"] for term in vocab["languages"]] == list(LANGUAGES)
    assert vocab["audio_suffixes"] == list(AUDIO_SUFFIXES)


def _traffic(client: TestClient) -> dict[str, Any]:
    r = client.get("/api/system/traffic")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def _transcribe(client: TestClient, clip: bytes) -> int:
    return client.post("/api/transcribe", files={"file": ("a.wav", clip)}).status_code


def test_traffic_counts_transcriptions_per_version_with_errors_and_latency(
    client: TestClient, speech_wav: bytes
) -> None:
    assert _traffic(client)["points"] == []  # the first poll only starts the clock
    assert [_transcribe(client, speech_wav) for _ in range(3)] == [200, 200, 200]
    assert _transcribe(client, b"") == 400  # the client's mistake: counted, but no error
    assert client.post("/admin/model/unload", headers=AUTH).status_code == 200
    assert _transcribe(client, speech_wav) == 503  # nothing serves: a failed request
    client.get("/api/system/status")  # the page's own polling is not transcription traffic
    time.sleep(1.0)

    body = _traffic(client)
    assert body["routes"] == ["/api/transcribe", "/v1/audio/"]
    [point] = body["points"]
    assert (point["requests"], point["errors"]) == (5, 1)
    assert point["rate_per_s"] == pytest.approx(5 / point["seconds"])
    assert 1.0 <= point["seconds"] < 30 and point["end"] == pytest.approx(time.time(), abs=30)
    versions = {v["version"]: v for v in point["versions"]}
    assert set(versions) == {"a", None}
    assert (versions["a"]["requests"], versions["a"]["errors"]) == (3, 0)
    assert (versions[None]["requests"], versions[None]["errors"]) == (2, 1)
    assert 0 < versions["a"]["p50_s"] <= versions["a"]["p95_s"] < 30
    assert 0 < point["p50_s"] <= point["p95_s"]

    time.sleep(1.0)
    quiet = _traffic(client)["points"][-1]  # polls only: an interval without transcriptions
    assert (quiet["requests"], quiet["rate_per_s"], quiet["p95_s"], quiet["versions"]) == (0, 0.0, None, [])


def test_polls_closer_than_a_second_add_no_interval(client: TestClient, speech_wav: bytes) -> None:
    _traffic(client)
    _transcribe(client, speech_wav)
    assert _traffic(client)["points"] == []  # too short to mean anything: the next poll covers it
    time.sleep(1.0)
    [point] = _traffic(client)["points"]
    assert point["requests"] == 1 and point["versions"][0]["version"] == "a"


def _buckets(latencies: list[float]) -> dict[float, float]:
    return {le: float(sum(x <= le for x in latencies)) for le in (*LATENCY_BUCKETS, math.inf)}


def test_quantiles_are_prometheus_histogram_quantile() -> None:
    # 10 answers between 0.1 and 0.25 s: the median lies halfway through that bucket
    assert histogram_quantile(0.5, _buckets([0.2] * 10)) == pytest.approx(0.175)
    assert histogram_quantile(0.95, _buckets([0.2] * 10)) == pytest.approx(0.2425)
    # one slow answer in 20 beyond the last bound: p95 still in the fast bucket, p99 at the last bound
    slow = _buckets([0.02] * 19 + [500.0])
    assert histogram_quantile(0.95, slow) == pytest.approx(0.025)
    assert histogram_quantile(0.99, slow) == LATENCY_BUCKETS[-1]
    assert histogram_quantile(0.5, _buckets([])) is None


# Two "workers" count requests in gunicorn's multiprocess mode; a third process, which answered
# none of them, charts them. The mode is fixed when prometheus_client is imported: a fresh interpreter.
MULTIPROCESS = """
import json, multiprocessing, time
from server.http.ui import TrafficSampler
from server.metrics import Metrics

def worker(version):
    metrics = Metrics()
    for status in ("200", "200", "503"):
        metrics.requests.labels("/api/transcribe", status, "sensevoice", version).inc()
        metrics.request_duration.labels("/api/transcribe", "sensevoice", version).observe(0.2)

if __name__ == "__main__":
    sampler = TrafficSampler(Metrics())
    sampler.series()
    for version in ("a", "b"):
        child = multiprocessing.get_context("fork").Process(target=worker, args=(version,))
        child.start()
        child.join()
        assert child.exitcode == 0
    time.sleep(1.0)
    print(sampler.series().model_dump_json())
"""


def test_under_gunicorn_each_worker_charts_the_requests_of_every_worker(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", MULTIPROCESS], env=env, capture_output=True, text=True,
                          timeout=120, cwd=Path(__file__).resolve().parents[1], check=False)
    assert done.returncode == 0, done.stderr
    [point] = json.loads(done.stdout)["points"]
    assert (point["requests"], point["errors"]) == (6, 2)
    assert [(v["version"], v["requests"], v["errors"]) for v in point["versions"]] == [("a", 3, 1), ("b", 3, 1)]
    assert 0.1 < point["p50_s"] <= 0.25
