"""Building a candidate: verify, load, smoke. A refusal says why and leaves what serves alone."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from server.errors import SwapFailed
from server.lifecycle.builder import CandidateBuilder
from server.lifecycle.policy import ModelLifecycle
from server.lifecycle.report import SwapReport
from server.metrics import Metrics
from server.settings import Settings
from server.storage.registry import Registry
from server.testing import synth
from tests.conftest import TEXT_A


def _corrupt(registry: Registry, version: str) -> None:
    model = registry.version_dir(version) / "model.onnx"
    model.chmod(0o644)
    with model.open("r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00" * 16)


def test_a_refused_build_leaves_the_live_engine_untouched_and_reports_the_reason(
    registry: Registry, settings: Settings
) -> None:
    lifecycle = ModelLifecycle(registry, settings, Metrics().for_model("sensevoice"))
    lifecycle.load_current()
    try:
        live = lifecycle.live
        _corrupt(registry, "b")
        with pytest.raises(SwapFailed) as refused:
            lifecycle.swap_to("b")
        assert refused.value.outcome == "verify_failed"
        assert "model.onnx" in refused.value.message
        assert refused.value.report is not None and refused.value.report["outcome"] == "verify_failed"
        assert lifecycle.live is live and lifecycle.loaded_versions() == ["a"]
        assert registry.state().current == "a"
        with lifecycle.lease() as model:
            assert model.engine.transcribe(synth.speech_like(1.0, seed=2)).endswith(TEXT_A)
        failure = registry.history()[-1]
        assert failure["event"] == "swap_failed" and failure["outcome"] == "verify_failed"
    finally:
        lifecycle.shutdown()


def test_a_version_that_fails_its_golden_clip_is_refused_as_smoke_failed(
    registry: Registry, settings: Settings, model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    clip = tmp_path / "golden.wav"
    clip.write_bytes(synth.wav_bytes(synth.speech_like(1.5, seed=7)))
    registry.add(model_dir("it says something else"), "wrong", smoke=[(clip, "what the golden clip says")])
    report = SwapReport(version="wrong", from_version="a", event="test")
    with pytest.raises(SwapFailed) as refused:
        CandidateBuilder(registry, settings, Metrics().for_model("sensevoice")).build("wrong", report)
    assert refused.value.outcome == "smoke_failed"
    assert report.smoke is not None and report.smoke["passed"] is False
    assert {"verify_s", "load_s", "smoke_s"} <= set(report.timings)


def test_a_build_that_passes_reports_each_phase_and_the_memory_it_took(
    registry: Registry, settings: Settings
) -> None:
    report = SwapReport(version="b", from_version="a", event="test")
    candidate = CandidateBuilder(registry, settings, Metrics().for_model("sensevoice")).build("b", report)
    try:
        assert candidate.version == "b" and candidate.smoke.passed
        assert {"verify_s", "load_s", "smoke_s"} <= set(report.timings)
        assert report.memory["model_bytes"] == candidate.memory_bytes
    finally:
        candidate.engine.close()
