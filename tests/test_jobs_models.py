"""Batch jobs on named models, pinned versions and pipelines: checked at submission, resolved again
when they run, and answered by exactly the model (and versions) their result names."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.storage.catalog import ModelCatalog
from server.storage.pipelines import PipelineStore
from server.storage.registry import Registry
from server.testing import synth
from server.testing.modelgen_punc import PuncSpec, make_punc_model
from tests.conftest import MEET_1, TEXT_A
from tests.fsmn_vad import fsmn_vad_dir  # noqa: F401  (a fixture)
from tests.jobs_helpers import submit, wait_for_jobs
from tests.kinds import KindFolder, kind_folder  # noqa: F401  (a fixture)
from tests.test_job_store_contract import PREVIOUS_SQLITE_SCHEMA

HOT = "call the team"
ISLANDS = [("silence", 0.5), ("speech", 2.0), ("silence", 2.5), ("speech", 2.0), ("silence", 2.5), ("speech", 2.0),
           ("silence", 0.5)]


@pytest.fixture
def clip() -> bytes:
    return synth.wav_bytes(synth.speech_like(1.5, seed=1))


@pytest.fixture
def c(catalog: ModelCatalog, jobs_app: Callable[..., TestClient]) -> Iterator[TestClient]:
    with jobs_app() as client:
        yield client


def _result(c: TestClient, job_id: str) -> dict[str, Any]:
    r = c.get(f"/api/jobs/{job_id}/result")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def _total(c: TestClient) -> int:
    total: int = c.get("/api/jobs").json()["total"]
    return total


def test_a_job_on_a_named_model_is_answered_by_it(c: TestClient, clip: bytes) -> None:
    [named] = submit(c, [("standup.wav", clip)], model="meeting")
    [pinned] = submit(c, [("standup.wav", clip)], model="meeting@m1")
    [plain] = submit(c, [("standup.wav", clip)])
    assert (named["model"], pinned["model"], plain["model"]) == ("meeting", "meeting@m1", None)
    done = wait_for_jobs(c, [named["id"], pinned["id"], plain["id"]])
    assert [j["status"] for j in done] == ["completed"] * 3, done
    assert [j["model_version"] for j in done] == ["m1", "m1", "a"]
    assert done[0]["model"] == "meeting"  # the job keeps what was asked; the result names what ran
    for job in done[:2]:
        result = _result(c, job["id"])
        assert (result["text"], result["model"], result["model_version"]) == (MEET_1, "meeting", "m1")
        assert "pipeline" not in result
        assert c.get(f"/api/jobs/{job['id']}/result", params={"format": "txt"}).headers["x-model-version"] == "m1"
    result = _result(c, plain["id"])
    assert (result["text"], result["model"], result["model_version"]) == (TEXT_A, "sensevoice", "a")


def test_a_pinned_version_that_is_not_loaded_fails_the_job_and_runs_nowhere_else(c: TestClient, clip: bytes) -> None:
    [job] = submit(c, [("standup.wav", clip)], model="meeting@m2")  # the registry holds m2; nothing loaded it
    [failed] = wait_for_jobs(c, [job["id"]])
    assert failed["status"] == "failed" and failed["model_version"] is None
    assert "'meeting@m2'" in failed["error"] and "'m2' is not loaded" in failed["error"], failed["error"]
    r = c.get(f"/api/jobs/{job['id']}/result")
    assert r.status_code == 409 and "not loaded" in r.json()["error"]["message"]


def test_an_unknown_model_is_a_404_at_submission_and_no_job_is_made(c: TestClient, clip: bytes,
                                                                     data_dir: Path) -> None:
    for unknown in ("nope", "nope@m1", "meeting@nope", "meeting@"):
        r = c.post("/api/jobs", files=[("files", ("a.wav", clip))], data={"model": unknown})
        assert r.status_code == 404, (unknown, r.text)
        assert r.json()["error"]["param"] == "model"
    r = c.post("/api/jobs", files=[("files", ("a.wav", clip))], data={"model": "meeting", "hotwords": "voxswap"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "hotwords"  # a SenseVoice takes none
    assert _total(c) == 0
    assert not (data_dir / "jobs").exists() or list((data_dir / "jobs").iterdir()) == []


def test_hotwords_reach_a_job_s_model_that_takes_them(registry: Registry, kind_folder: KindFolder,  # noqa: F811
                                                      jobs_app: Callable[..., TestClient], clip: bytes) -> None:
    hot = ModelCatalog(registry.root).create("hot", "seaco-paraformer")
    hot.add(kind_folder("seaco-paraformer", text=HOT), "h1")
    hot.promote("h1")
    with jobs_app() as c:
        [job] = submit(c, [("call.wav", clip)], model="hot", hotwords="  voxswap   blue ")
        assert job["hotwords"] == "voxswap blue"
        [done] = wait_for_jobs(c, [job["id"]])
        assert done["status"] == "completed", done
        assert _result(c, job["id"])["text"] == f"{HOT} voxswap blue"
        r = c.post("/api/jobs", files=[("files", ("a.wav", clip))], data={"model": "hot", "hotwords": "abcdefghijk"})
        assert r.status_code == 400 and "longer than 10 characters" in r.json()["error"]["message"]


@pytest.fixture
def pipeline(registry: Registry, fsmn_vad_dir: Path, tmp_path: Path) -> ModelCatalog:  # noqa: F811
    """``fsmn`` (the real FSMN-VAD, v1), ``punc`` (a stand-in ending each segment with a full stop,
    p1) and a pipeline ``notes`` of both around the default SenseVoice."""
    cat = ModelCatalog(registry.root)
    fsmn = cat.create("fsmn", "fsmn-vad")
    fsmn.add(fsmn_vad_dir, "v1")
    fsmn.promote("v1")
    punc = cat.create("punc", "ct-punc")
    punc.add(make_punc_model(tmp_path / "p1", PuncSpec(mark="。")), "p1")
    punc.promote("p1")
    PipelineStore(cat).set("notes", vad="fsmn", asr="sensevoice", punc="punc")
    return cat


def test_a_job_on_a_pipeline_runs_every_stage_and_names_each_version(
        pipeline: ModelCatalog, jobs_app: Callable[..., TestClient]) -> None:
    with jobs_app(segment_window_s=5) as c:
        [job] = submit(c, [("meeting.wav", synth.wav_bytes(synth.islands(ISLANDS, seed=11)))], model="notes")
        assert job["model"] == "notes"
        [done] = wait_for_jobs(c, [job["id"]])
        assert done["status"] == "completed" and done["progress"] == 1 and done["model_version"] == "a", done
        result = _result(c, job["id"])
        assert (result["pipeline"], result["model"], result["model_version"]) == ("notes", "sensevoice", "a")
        assert result["model_versions"] == {"vad": "fsmn@v1", "asr": "sensevoice@a", "punc": "punc@p1"}
        segments = result["segments"]
        assert len(segments) >= 2 and all(s["text"] == TEXT_A + "。" for s in segments), segments
        srt = c.get(f"/api/jobs/{job['id']}/result", params={"format": "srt"}).text
        assert srt.count(TEXT_A + "。") == len(segments)
        for stage in ("punc", "fsmn"):  # not speech recognition: a 400 at once, as for a request
            r = c.post("/api/jobs", files=[("files", ("a.wav", b"RIFF"))], data={"model": stage})
            assert r.status_code == 400 and "use it in a pipeline" in r.json()["error"]["message"], r.text
        assert _total(c) == 1
        # a job's minutes of audio are no request latency: the post-swap watch of its asr stage never sees them
        asr_stats = c.app.state.ctx.models.default.stats.summary()  # type: ignore[attr-defined]
        assert asr_stats.get("a", {"at": []})["at"] == [], asr_stats


def test_a_job_whose_model_was_removed_before_it_ran_fails_with_the_reason(
        catalog: ModelCatalog, jobs_app: Callable[..., TestClient], clip: bytes) -> None:
    pipelines = PipelineStore(catalog)
    pipelines.set("briefing", asr="meeting")
    with jobs_app(job_workers=0) as c:  # submitted, never run by this process
        [on_pipeline] = submit(c, [("a.wav", clip)], model="briefing")
        [on_model] = submit(c, [("b.wav", clip)], model="meeting")
        [on_default] = submit(c, [("c.wav", clip)])
    pipelines.remove("briefing")
    shutil.rmtree(catalog.root / "models" / "meeting")
    with jobs_app() as c:
        done = wait_for_jobs(c, [on_pipeline["id"], on_model["id"], on_default["id"]])
        assert [j["status"] for j in done] == ["failed", "failed", "completed"], done
        assert done[0]["error"].startswith("the job's model 'briefing' cannot run it now: no model 'briefing'")
        assert done[1]["error"].startswith("the job's model 'meeting' cannot run it now: no model 'meeting'")
        assert done[0]["model_version"] is None and done[1]["model_version"] is None
        assert _result(c, on_default["id"])["text"] == TEXT_A


def test_a_job_whose_model_folder_went_away_while_served_fails_rather_than_run(
        catalog: ModelCatalog, jobs_app: Callable[..., TestClient], clip: bytes) -> None:
    with jobs_app(job_workers=1) as c:
        runner = c.app.state.ctx.jobs  # type: ignore[attr-defined]
        [first] = submit(c, [("a.wav", clip)], model="meeting")
        assert wait_for_jobs(c, [first["id"]])[0]["status"] == "completed"
        shutil.rmtree(catalog.root / "models" / "meeting")  # the lifecycle is still loaded in memory
        [second] = submit(c, [("b.wav", clip)], model="meeting")  # by a client that learnt the name before
        [failed] = wait_for_jobs(c, [second["id"]])
        assert failed["status"] == "failed" and "model 'meeting' was removed" in failed["error"], failed
        assert runner.jobs_run == 2


def test_jobs_of_a_database_without_the_model_column_still_list_and_run(
        catalog: ModelCatalog, jobs_app: Callable[..., TestClient], data_dir: Path, clip: bytes) -> None:
    old_id = "a" * 32
    (data_dir / "jobs" / old_id).mkdir(parents=True)
    (data_dir / "jobs" / old_id / "input.wav").write_bytes(clip)
    with sqlite3.connect(data_dir / "jobs.sqlite3") as db:
        db.executescript(PREVIOUS_SQLITE_SCHEMA)  # no model and hotwords columns
        db.execute("INSERT INTO jobs (id, filename, input_name, size_bytes, status, language, use_itn, created_at) "
                   "VALUES (?, 'old.wav', 'input.wav', ?, 'pending', 'auto', 0, 1.0)", (old_id, len(clip)))
        db.execute("INSERT INTO disk_usage (id, bytes) VALUES (1, ?)", (len(clip),))
    db.close()
    with jobs_app() as c:
        listed = c.get("/api/jobs").json()
        assert listed["total"] == 1 and listed["jobs"][0]["model"] is None
        [old] = wait_for_jobs(c, [old_id])
        assert (old["status"], old["model"], old["model_version"]) == ("completed", None, "a"), old
        assert _result(c, old_id)["text"] == TEXT_A  # the default model, as the old release would have
        [new] = submit(c, [("new.wav", clip)], model="meeting")
        assert wait_for_jobs(c, [new["id"]])[0]["model_version"] == "m1"
    with sqlite3.connect(data_dir / "jobs.sqlite3") as db:
        columns = [row[1] for row in db.execute("PRAGMA table_info(jobs)")]
    db.close()
    assert columns.count("model") == 1 and columns.count("hotwords") == 1
