"""Dynamic batching: requests that arrive together run as one session call, each answer still the
work of, and labelled with, the one version that computed it."""

from __future__ import annotations

import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from server.app import create_app
from server.settings import Settings
from server.storage.registry import Registry
from server.testing import synth
from testkit.harness import serve_in_thread
from tests.conftest import AUTH

SLOW_A, SLOW_B = "batched model a", "batched model b"


@pytest.fixture
def slow(registry: Registry, model_dir: Callable[..., Path]) -> Registry:
    """Versions that spend ~60 ms per audio second, so requests pile up behind one inference thread."""
    registry.add(model_dir(SLOW_A, compute_ms=60), "slow-a")
    registry.add(model_dir(SLOW_B, compute_ms=60), "slow-b")
    registry.promote("slow-a")
    return registry


def _batches(metrics: str) -> dict[str, float]:
    """voxswap_batch_requests' count and sum for the default model."""
    found = dict(re.findall(r'voxswap_batch_requests_(count|sum)\{model="sensevoice"\} ([0-9.]+)', metrics))
    return {key: float(value) for key, value in found.items()}


def _post(url: str, clip: bytes, **fields: str) -> httpx.Response:
    return httpx.post(f"{url}/api/transcribe", files={"file": ("c.wav", clip)}, data=fields, timeout=60)


def test_requests_that_arrive_together_share_session_calls_and_keep_their_own_answers(
        slow: Registry, make_settings: Callable[..., Settings]) -> None:
    clips = [synth.wav_bytes(synth.speech_like(1.0 + 0.25 * i, seed=i)) for i in range(12)]
    clips[5] = b"RIFF this is not audio"  # one bad upload in the crowd
    with serve_in_thread(create_app(make_settings(inference_workers=1, max_queue=32, batch_max_size=8))) as url, \
            ThreadPoolExecutor(12) as senders:
        answers = list(senders.map(lambda clip: _post(url, clip), clips))
        batches = _batches(httpx.get(f"{url}/metrics").text)
    assert answers[5].status_code in (400, 415)  # its own failure, nobody else's
    good = [a for i, a in enumerate(answers) if i != 5]
    assert all(a.status_code == 200 for a in good), [a.text for a in good if a.status_code != 200]
    for i, answer in enumerate(answers):
        if answer.status_code == 200:  # each answer is its own clip's: the right length, the right version
            body = answer.json()
            assert body["text"] == SLOW_A and body["model_version"] == "slow-a"
            assert body["duration_s"] == pytest.approx(1.0 + 0.25 * i, abs=0.01)
    assert batches["sum"] == 12 and batches["count"] < 12  # fewer batches than requests: some ran together


def test_a_swap_during_batched_load_never_mixes_versions(slow: Registry,
                                                         make_settings: Callable[..., Settings]) -> None:
    clip = synth.wav_bytes(synth.speech_like(1.5, seed=3))
    with serve_in_thread(create_app(make_settings(inference_workers=1, max_queue=64, batch_max_size=8))) as url, \
            ThreadPoolExecutor(9) as senders:
        first = [senders.submit(_post, url, clip) for _ in range(16)]
        swap = senders.submit(httpx.post, f"{url}/admin/model/update", json={"version": "slow-b"}, headers=AUTH,
                              timeout=60)
        second = [senders.submit(_post, url, clip) for _ in range(16)]
        assert swap.result().status_code == 200, swap.result().text
        answers = [f.result() for f in first + second]
        after = [_post(url, clip) for _ in range(2)]
        batches = _batches(httpx.get(f"{url}/metrics").text)
    texts = {"slow-a": SLOW_A, "slow-b": SLOW_B}
    for answer in answers + after:
        assert answer.status_code == 200, answer.text
        assert answer.json()["text"] == texts[answer.headers["x-model-version"]]  # computed by the version it names
    assert {a.headers["x-model-version"] for a in after} == {"slow-b"}
    assert batches["count"] < batches["sum"]


def test_batch_max_size_one_runs_every_request_alone(slow: Registry, make_settings: Callable[..., Settings]) -> None:
    clip = synth.wav_bytes(synth.speech_like(1.0, seed=1))
    with serve_in_thread(create_app(make_settings(inference_workers=1, batch_max_size=1))) as url, \
            ThreadPoolExecutor(6) as senders:
        answers = list(senders.map(lambda _: _post(url, clip), range(6)))
        batches = _batches(httpx.get(f"{url}/metrics").text)
    assert all(a.status_code == 200 and a.json()["text"] == SLOW_A for a in answers)
    assert batches == {"count": 6.0, "sum": 6.0}
