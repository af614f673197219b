"""The smoke gate of the kinds that do not transcribe: the REAL FSMN-VAD export and a ct-punc model
pass their built-in checks and their goldens, and a version whose goldens are wrong is refused
before it serves (422 swap_failed, smoke_failed), the live version untouched."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.engines.factory import load_engine
from server.engines.paraformer import ParaformerEngine
from server.engines.punc import CtPuncEngine
from server.engines.vad import FsmnVadEngine
from server.lifecycle.smoke import punctuation_error_rate, segments_off_by
from server.settings import Settings
from server.storage.catalog import ModelCatalog
from server.storage.registry import Registry
from server.testing import synth
from server.testing.modelgen_punc import COMMA
from server.tools.cli import main as cli
from tests.conftest import AUTH
from tests.fsmn_vad import fsmn_vad_dir  # noqa: F401  (a fixture)
from tests.kinds import KindFolder, kind_folder  # noqa: F401  (a fixture)

# two sentences' worth of speech between silences, and where FSMN-VAD should find them
ISLANDS = [("silence", 1.0), ("speech", 2.0), ("silence", 1.0), ("speech", 1.5), ("silence", 1.0)]
TRUE_SEGMENTS = [[1000, 3000], [4000, 5500]]


def _update(c: TestClient, model: str, version: str) -> Any:
    return c.post(f"/admin/models/{model}/update", json={"version": version}, headers=AUTH)


def _live(c: TestClient, model: str) -> dict[str, Any]:
    models = {m["name"]: m for m in c.get("/admin/models", headers=AUTH).json()["models"]}
    return dict(models[model])


def _assert_refused(c: TestClient, model: str, version: str, live: str, registry: Registry) -> dict[str, Any]:
    r = _update(c, model, version)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "swap_failed" and error["report"]["outcome"] == "smoke_failed", error
    assert _live(c, model)["live_version"] == live  # never served
    assert registry.state().current == live
    last = registry.history()[-1]
    assert (last["event"], last["version"], last["outcome"]) == ("swap_failed", version, "smoke_failed")
    return dict(error)


def test_the_real_fsmn_vad_passes_its_built_in_gate_and_golden_segments_and_a_wrong_golden_is_refused(
        registry: Registry, fsmn_vad_dir: Path, tmp_path: Path,  # noqa: F811
        make_settings: Callable[..., Settings]) -> None:
    cat = ModelCatalog(registry.root)
    clip = tmp_path / "two-sentences.wav"
    clip.write_bytes(synth.wav_bytes(synth.islands(ISLANDS, seed=3)))
    right, wrong = tmp_path / "right.json", tmp_path / "wrong.json"
    right.write_text(json.dumps(TRUE_SEGMENTS))
    wrong.write_text(json.dumps({"segments": [[1000, 3000], [4800, 5500]], "tolerance_ms": 300}))
    base = ["registry", "add", str(fsmn_vad_dir), "--registry", str(registry.root), "--model", "fsmn"]
    assert cli([*base, "--version", "v1"]) == 0  # detected as fsmn-vad, model created of that kind
    fsmn = cat.registry("fsmn")
    assert fsmn.kind() == "fsmn-vad" and fsmn.manifest("v1").smoke == []
    assert cli([*base, "--version", "v2", "--smoke-audio", str(clip), "--smoke-segments", str(right)]) == 0
    assert cli([*base, "--version", "v3", "--smoke-audio", str(clip), "--smoke-segments", str(wrong)]) == 0
    golden = fsmn.manifest("v2").smoke[0]
    assert golden.segments == ((1000, 3000), (4000, 5500)) and golden.tolerance_ms is None
    assert fsmn.manifest("v3").smoke[0].tolerance_ms == 300
    fsmn.promote("v1")
    with TestClient(create_app(make_settings())) as c:
        live = _live(c, "fsmn")
        assert (live["kind"], live["live_version"], live["smoke"]["golden"]) == ("fsmn-vad", "v1", False)
        assert [(clip["clip"], clip["passed"]) for clip in live["smoke"]["clips"]] == \
            [("builtin:speech", True), ("builtin:silence", True)]
        assert live["smoke"]["clips"][1]["got"] == "[]"
        r = _update(c, "fsmn", "v2")
        assert r.status_code == 200, r.text
        smoke = r.json()["smoke"]
        assert smoke["passed"] and smoke["golden"]
        found = json.loads(smoke["clips"][0]["got"])
        assert segments_off_by([tuple(s) for s in TRUE_SEGMENTS], [tuple(s) for s in found]) <= 400
        error = _assert_refused(c, "fsmn", "v3", "v2", fsmn)
        assert "boundary is" in error["message"] and "tolerance 300 ms" in error["message"], error
        # a VAD model is no transcription model
        r = c.post("/api/transcribe", files={"file": ("c.wav", clip.read_bytes())}, data={"model": "fsmn"})
        assert r.status_code == 400 and "is a voice activity detection model" in r.json()["error"]["message"]


def test_a_ct_punc_model_passes_its_gate_and_a_wrong_golden_text_is_refused(
        registry: Registry, kind_folder: KindFolder, tmp_path: Path,  # noqa: F811
        make_settings: Callable[..., Settings]) -> None:
    folder = kind_folder("ct-punc", comma_every=2)
    given = tmp_path / "given.txt"
    given.write_text("one two three four\n")
    base = ["registry", "add", str(folder), "--registry", str(registry.root), "--model", "punc"]
    assert cli([*base, "--version", "c1"]) == 0
    assert cli([*base, "--version", "c2", "--smoke-text-in", str(given), "--smoke-text", f"one two{COMMA} three four。",
                "--smoke-text-in", "hello world", "--smoke-text", "hello world。"]) == 0
    assert cli([*base, "--version", "c3", "--smoke-text-in", "one two three four",
                "--smoke-text", "one, two three four."]) == 0
    assert cli([*base, "--version", "c4", "--smoke-text", "an answer without its input"]) == 2
    punc = ModelCatalog(registry.root).registry("punc")
    assert punc.kind() == "ct-punc"
    assert [clip.audio for clip in punc.manifest("c2").smoke] == ["smoke/given-0.in.txt", "smoke/given-1.in.txt"]
    punc.promote("c1")
    with TestClient(create_app(make_settings())) as c:
        live = _live(c, "punc")
        assert (live["live_version"], live["smoke"]["passed"], live["smoke"]["golden"]) == ("c1", True, False)
        [builtin] = live["smoke"]["clips"]
        assert builtin["clip"] == "builtin:punctuation" and COMMA in builtin["got"]
        r = _update(c, "punc", "c2")
        assert r.status_code == 200 and r.json()["smoke"]["golden"], r.text
        error = _assert_refused(c, "punc", "c3", "c2", punc)
        assert "of the punctuation differs" in error["message"], error


def test_punctuation_and_segment_comparisons() -> None:
    assert punctuation_error_rate("Hello, world.", "hello, world.") == 0.0
    assert punctuation_error_rate("hello, world.", "hello world.") == 0.5
    assert punctuation_error_rate("hello world", "hello there") is None  # the words differ
    assert punctuation_error_rate(f"你好{COMMA}世界。", "你好世界。") == 0.5
    assert punctuation_error_rate("don't stop", "don't stop") == 0.0  # an apostrophe is part of a word
    assert segments_off_by([(0, 100)], [(30, 90)]) == 30
    assert segments_off_by([(0, 100)], []) is None
    assert segments_off_by([], []) == 0


def test_engines_of_each_family_answer_in_their_own_form(kind_folder: KindFolder,  # noqa: F811
                                                         fsmn_vad_dir: Path) -> None:  # noqa: F811
    punc = load_engine("ct-punc", kind_folder("ct-punc"), "model.onnx", 1)
    assert isinstance(punc, CtPuncEngine) and punc.kind == "ct-punc"
    assert punc.punctuate("hello world") == "hello world。"
    assert punc.punctuate("   ") == ""  # funasr-onnx would crash on it
    vad = load_engine("fsmn-vad", fsmn_vad_dir, "model.onnx", 1)
    assert isinstance(vad, FsmnVadEngine) and vad.providers == ["CPUExecutionProvider"]
    assert vad.segments(synth.silence(1.0)) == [] and vad.segments(synth.silence(0.01)) == []
    para = load_engine("paraformer", kind_folder("paraformer", text="short clip"), "model.onnx", 1)
    assert isinstance(para, ParaformerEngine)
    assert para.transcribe_batch([synth.speech_like(1.0), synth.speech_like(0.01), np.zeros(0, np.float32)]) == \
        ["short clip", "", ""]  # less than a frame holds no words (funasr-onnx would raise)
    assert para.metadata["voxswap_test_model"] == "1"
    for engine in (punc, vad, para):
        engine.close()
        assert engine.closed


def test_a_paraformer_result_funasr_onnx_dropped_is_an_error_not_a_shifted_transcript(
        kind_folder: KindFolder, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    from server.engines.base import EngineInferenceError

    para = load_engine("paraformer", kind_folder("paraformer", text="short clip"), "model.onnx", 1)
    assert isinstance(para, ParaformerEngine)
    monkeypatch.setattr(para, "_run", lambda waveform, hotwords: [])  # what funasr-onnx does on an ORT error
    with pytest.raises(EngineInferenceError, match="returned 0 results"):
        para.transcribe_batch([synth.speech_like(1.0)])
