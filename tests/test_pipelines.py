"""Pipelines: the real FSMN-VAD cuts the audio, SenseVoice transcribes each piece, a punctuation
model marks the sentences; every stage is a named model that swaps blue/green on its own, and no
answer mixes two versions of a stage."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings
from server.storage.catalog import ModelCatalog
from server.storage.registry import Registry
from server.testing import synth
from server.testing.modelgen_punc import QUESTION, PuncSpec, make_punc_model
from server.tools.cli import main as cli
from testkit.harness import serve_in_thread, wait_until
from tests.conftest import AUTH, TEXT_A, TEXT_B
from tests.fsmn_vad import fsmn_vad_dir  # noqa: F401  (a fixture)

# three stretches of speech between long pauses: with a 5 s window the VAD's segments cannot all merge
ISLANDS = [("silence", 0.5), ("speech", 2.0), ("silence", 2.5), ("speech", 2.0), ("silence", 2.5), ("speech", 2.0),
           ("silence", 0.5)]
MARKS = {"p1": "。", "p2": QUESTION}


@pytest.fixture
def stages(registry: Registry, fsmn_vad_dir: Path, tmp_path: Path) -> ModelCatalog:  # noqa: F811
    """The default SenseVoice model (``a`` live, ``b``), ``fsmn`` (the real FSMN-VAD, v1 live, v2 a copy)
    and ``punc`` (p1 live, marking with a full stop; p2 with a question mark), and a pipeline ``meeting``
    of all three."""
    cat = ModelCatalog(registry.root)
    fsmn = cat.create("fsmn", "fsmn-vad")
    fsmn.add(fsmn_vad_dir, "v1")
    fsmn.add(fsmn_vad_dir, "v2")
    fsmn.promote("v1")
    punc = cat.create("punc", "ct-punc")
    for version, mark in MARKS.items():
        punc.add(make_punc_model(tmp_path / version, PuncSpec(mark=mark)), version)
    punc.promote("p1")
    assert cli(["pipeline", "set", "meeting", "--vad", "fsmn", "--asr", "sensevoice", "--punc", "punc",
                "--registry", str(registry.root)]) == 0
    return cat


@pytest.fixture
def pipeline_client(stages: ModelCatalog, make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(segment_window_s=5))) as c:
        yield c


def _clip() -> bytes:
    return synth.wav_bytes(synth.islands(ISLANDS, seed=11))


def test_a_pipeline_cuts_at_the_vad_s_segments_punctuates_and_names_every_stage(
        pipeline_client: TestClient) -> None:
    c = pipeline_client
    r = c.post("/api/transcribe", files={"file": ("c.wav", _clip(), "audio/wav")}, data={"model": "meeting"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["pipeline"] == "meeting" and body["model"] == "sensevoice"
    assert body["model_versions"] == {"vad": "fsmn@v1", "asr": "sensevoice@a", "punc": "punc@p1"}
    assert r.headers["x-model-version"] == "a"  # it names the speech recognition stage
    segments = body["segments"]
    assert len(segments) >= 2, segments  # cut at the detector's pauses, not one 10 s piece
    assert all(s["text"] == TEXT_A + "。" for s in segments), segments
    assert [s["start"] for s in segments] == sorted(s["start"] for s in segments)
    assert all(0 <= s["start"] < s["end"] <= 12.0 for s in segments)  # inside the 12 s of audio
    verbose = c.post("/v1/audio/transcriptions", files={"file": ("c.wav", _clip(), "audio/wav")},
                     data={"model": "meeting", "response_format": "verbose_json"}).json()
    assert verbose["model_versions"] == body["model_versions"]
    plain = c.post("/api/transcribe", files={"file": ("c.wav", _clip(), "audio/wav")}).json()
    assert "pipeline" not in plain and plain["text"] == " ".join([TEXT_A] * len(plain["segments"]))


def _answers(url: str, stop: threading.Event, out: list[dict[str, Any]]) -> None:
    with httpx.Client(base_url=url, timeout=60) as http:
        while not stop.is_set():
            r = http.post("/api/transcribe", files={"file": ("c.wav", _clip(), "audio/wav")},
                          data={"model": "meeting"})
            out.append({"status": r.status_code, **(r.json() if r.status_code == 200 else {"error": r.text})})


def test_swapping_each_stage_under_load_loses_nothing_and_never_mixes_versions(
        stages: ModelCatalog, make_settings: Callable[..., Settings]) -> None:
    answers: list[dict[str, Any]] = []
    stop = threading.Event()
    with serve_in_thread(create_app(make_settings(segment_window_s=5))) as url:
        clients = [threading.Thread(target=_answers, args=(url, stop, answers)) for _ in range(2)]
        for t in clients:
            t.start()
        try:
            for path, version in (("/admin/models/punc/update", "p2"), ("/admin/model/update", "b"),
                                  ("/admin/models/fsmn/update", "v2")):
                before = len(answers)
                wait_until(lambda n=before: len(answers) >= n + 4, timeout_s=60, message="traffic between swaps")
                r = httpx.post(f"{url}{path}", json={"version": version}, headers=AUTH, timeout=120)
                assert r.status_code == 200, r.text
            before = len(answers)
            wait_until(lambda: len(answers) >= before + 4, timeout_s=60, message="traffic after the swaps")
        finally:
            stop.set()
            for t in clients:
                t.join()
    assert [a for a in answers if a["status"] != 200] == []
    texts = {"sensevoice@a": TEXT_A, "sensevoice@b": TEXT_B}
    seen = set()
    for a in answers:
        versions = a["model_versions"]
        mark = MARKS[versions["punc"].split("@")[1]]
        # every segment is the work of the one asr and the one punc version the answer names
        assert all(s["text"] == texts[versions["asr"]] + mark for s in a["segments"]), a
        seen.add(tuple(sorted(versions.items())))
    assert {v for combo in seen for _, v in combo} >= {"punc@p1", "punc@p2", "sensevoice@a", "sensevoice@b",
                                                       "fsmn@v1", "fsmn@v2"}


def test_pipelines_are_managed_by_cli_and_admin_api(stages: ModelCatalog, pipeline_client: TestClient,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    c, root = pipeline_client, str(stages.root)
    capsys.readouterr()
    assert cli(["pipeline", "list", "--json", "--registry", root]) == 0
    listed = json.loads(capsys.readouterr().out)["pipelines"]
    assert [(p["name"], p["vad"], p["asr"], p["punc"]) for p in listed] == [("meeting", "fsmn", "sensevoice", "punc")]
    r = c.put("/admin/pipelines/plain", json={"asr": "sensevoice", "punc": "punc"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["vad"] is None
    answer = c.post("/api/transcribe", files={"file": ("c.wav", _clip(), "audio/wav")}, data={"model": "plain"})
    assert answer.json()["model_versions"] == {"asr": "sensevoice@a", "punc": "punc@p1"}  # energy cuts, no vad
    for body, status in (({"asr": "punc"}, 400), ({"asr": "sensevoice", "vad": "punc"}, 400),
                         ({"asr": "nope"}, 404)):
        assert c.put("/admin/pipelines/bad", json=body, headers=AUTH).status_code == status, body
    assert c.put("/admin/pipelines/fsmn", json={"asr": "sensevoice"}, headers=AUTH).status_code == 409  # a model
    assert c.put("/admin/pipelines/a@b", json={"asr": "sensevoice"}, headers=AUTH).status_code == 400
    assert {p["name"] for p in c.get("/admin/pipelines", headers=AUTH).json()["pipelines"]} == {"meeting", "plain"}
    assert c.delete("/admin/pipelines/plain", headers=AUTH).status_code == 200
    assert c.get("/admin/pipelines/plain", headers=AUTH).status_code == 404
    gone = c.post("/api/transcribe", files={"file": ("c.wav", _clip(), "audio/wav")}, data={"model": "plain"})
    assert gone.status_code == 404
    history = c.get("/admin/history", params={"model": "sensevoice"}, headers=AUTH).json()["events"]
    events = [e["event"] for e in history]
    assert events.count("pipeline_set") == 2 and events.count("pipeline_remove") == 1
    assert cli(["pipeline", "remove", "meeting", "--registry", root]) == 0
    assert cli(["pipeline", "remove", "meeting", "--registry", root]) == 1


def test_a_new_version_of_any_stage_must_pass_the_pipelines_golden_clip(
        stages: ModelCatalog, make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    clip = tmp_path / "golden.wav"
    clip.write_bytes(synth.wav_bytes(synth.islands([("silence", 0.5), ("speech", 2.0), ("silence", 0.5)], seed=5)))
    root = str(stages.root)
    assert cli(["pipeline", "set", "meeting", "--vad", "fsmn", "--asr", "sensevoice", "--punc", "punc",
                "--smoke-audio", str(clip), "--smoke-text", TEXT_A + "。", "--registry", root]) == 0
    with TestClient(create_app(make_settings(smoke_cer_threshold=0.0))) as c:
        ok = c.post("/admin/models/fsmn/update", json={"version": "v2"}, headers=AUTH)  # the same detector
        assert ok.status_code == 200, ok.text
        assert ok.json()["timings"]["pipeline_smoke_s"] > 0
        for path, version, expected in (("/admin/model/update", "b", TEXT_B),
                                        ("/admin/models/punc/update", "p2", QUESTION)):
            refused = c.post(path, json={"version": version}, headers=AUTH)
            assert refused.status_code == 422, refused.text
            error = refused.json()["error"]
            assert error["code"] == "swap_failed" and error["report"]["outcome"] == "smoke_failed"
            assert "pipeline 'meeting'" in error["message"] and expected in error["message"], error["message"]
        answer = c.post("/api/transcribe", files={"file": ("c.wav", clip.read_bytes(), "audio/wav")},
                        data={"model": "meeting"}).json()
        assert answer["model_versions"] == {"vad": "fsmn@v2", "asr": "sensevoice@a", "punc": "punc@p1"}
        assert answer["text"] == TEXT_A + "。"
    lone_clip = ["--smoke-audio", str(clip)]  # without its text
    assert cli(["pipeline", "set", "meeting", "--asr", "sensevoice", *lone_clip, "--registry", root]) == 2


def test_a_five_minute_recording_through_vad_asr_and_punctuation_has_ordered_segments_and_words(
        stages: ModelCatalog, make_settings: Callable[..., Settings]) -> None:
    talk = [("silence", 1.0)] + [part for _ in range(60) for part in (("speech", 3.0), ("silence", 2.0))]
    clip = synth.wav_bytes(synth.islands(talk, seed=21))  # 301 s: sixty 3 s turns between 2 s pauses
    with TestClient(create_app(make_settings())) as c:
        r = c.post("/api/transcribe", files={"file": ("talk.wav", clip, "audio/wav")},
                   data={"model": "meeting", "timestamps": "true"})
        assert r.status_code == 200, r.text
        body = r.json()
        segments, words = body["segments"], body["words"]
        assert body["duration_s"] == pytest.approx(301.0, abs=0.01)
        assert len(segments) >= 10  # the detector's segments merged up to the 30 s window, not one piece
        assert all(a["end"] <= b["start"] for a, b in pairwise(segments))
        assert all(0 <= s["start"] < s["end"] <= 301.0 and s["text"] == TEXT_A + "。" for s in segments)
        assert [w["word"] for w in words] == TEXT_A.split() * len(segments)
        assert all(a["start"] <= b["start"] and a["end"] <= b["start"] + 1e-6
                   for a, b in pairwise(words))  # in order, never overlapping
        per_segment = len(TEXT_A.split())
        for i, segment in enumerate(segments):  # each segment's words lie inside it
            for word in words[i * per_segment:(i + 1) * per_segment]:
                assert segment["start"] <= word["start"] <= word["end"] <= segment["end"], (segment, word)
        verbose = c.post("/v1/audio/transcriptions", files={"file": ("talk.wav", clip, "audio/wav")},
                         data={"model": "meeting", "response_format": "verbose_json",
                               "timestamp_granularities[]": ["word", "segment"]}).json()
        assert verbose["words"] == words and verbose["model_versions"] == body["model_versions"]
        bad = c.post("/v1/audio/transcriptions", files={"file": ("talk.wav", clip, "audio/wav")},
                     data={"timestamp_granularities[]": "word"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "timestamp_granularities"


def test_timestamps_from_a_model_that_gives_none_are_a_400(
        registry: Registry, make_settings: Callable[..., Settings], tmp_path: Path, speech_wav: bytes) -> None:
    from server.testing.modelgen_paraformer import make_model

    para = ModelCatalog(registry.root).create("para", "paraformer")
    para.add(make_model("paraformer", tmp_path / "p1", text="plain paraformer"), "p1")
    para.promote("p1")
    with TestClient(create_app(make_settings())) as c:
        r = c.post("/api/transcribe", files={"file": ("c.wav", speech_wav, "audio/wav")},
                   data={"model": "para", "timestamps": "true"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "timestamps", r.text
        assert "does not give timestamps" in r.json()["error"]["message"]
        ok = c.post("/api/transcribe", files={"file": ("c.wav", speech_wav, "audio/wav")}, data={"model": "para"})
        assert ok.status_code == 200 and "words" not in ok.json()
