"""The shared vocabulary: every value the server writes or accepts is one it declares, once."""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import soundfile as sf
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings
from server.speech import richtext
from server.storage.registry import Registry
from server.testing import synth
from server.testing.modelgen import LANGUAGE_IDS, LANGUAGE_TAGS
from server.tools.client import collect
from server.vocab import AUDIO_SUFFIXES, LANGUAGES, HistoryEvent
from tests.conftest import AUTH, TEXT_A, TEXT_B


def _recorded(registry: Registry) -> list[str]:
    """Every event in history.jsonl, read as the file holds it (not through Registry.history)."""
    lines = registry.history_path.read_text().splitlines()
    return [json.loads(line)["event"] for line in lines if line.strip()]


def test_every_event_the_registry_records_is_a_history_event(tmp_path: Path, model_dir: Callable[..., Path]) -> None:
    registry = Registry(tmp_path / "registry").ensure()
    registry.add(model_dir(TEXT_A), "a")
    registry.add(model_dir(TEXT_B), "b")
    registry.add(model_dir(TEXT_B), "c")
    registry.promote("a")
    registry.promote("b")
    registry.promote(registry.rollback_target(), event=HistoryEvent.ROLLBACK)
    registry.set_held(True)
    registry.set_held(False)
    registry.revert("a", to="b", reason="it failed to load here")
    registry.remove("c")

    events = _recorded(registry)
    assert [HistoryEvent(e) for e in events] == [
        HistoryEvent.ADD, HistoryEvent.ADD, HistoryEvent.ADD, HistoryEvent.PROMOTE, HistoryEvent.PROMOTE,
        HistoryEvent.ROLLBACK, HistoryEvent.UNLOAD, HistoryEvent.LOAD, HistoryEvent.REFUSED, HistoryEvent.REMOVE]


def test_every_event_a_server_records_while_operated_is_a_history_event(
    client: TestClient, registry: Registry, model_dir: Callable[..., Path], tmp_path: Path
) -> None:
    """The swaps, refusals, unloads and watches a server writes, through the admin API."""
    broken = shutil.copytree(model_dir(TEXT_A), tmp_path / "broken")
    (broken / "model.onnx").write_bytes(b"not an onnx graph" * 64)
    registry.add(broken, "broken")
    before = len(_recorded(registry))
    steps = [("/admin/model/update", {"version": "b", "watch_seconds": 30}), ("/admin/model/rollback", None),
             ("/admin/model/unload", None), ("/admin/model/load", None),
             ("/admin/model/update", {"version": "broken"})]
    for path, body in steps:
        r = client.post(path, json=body, headers=AUTH)
        assert r.status_code in (200, 422), (path, r.text)

    events = _recorded(registry)[before:]
    assert {"promote", "watch_start", "rollback", "unload", "load", "swap_failed"} <= set(events)
    unknown = [e for e in events if e not in {event.value for event in HistoryEvent}]
    assert not unknown, f"history.jsonl holds events HistoryEvent does not declare: {unknown}"


def test_every_language_the_api_accepts_is_one_the_model_knows() -> None:
    assert set(LANGUAGE_IDS) == set(LANGUAGES)
    assert set(LANGUAGE_TAGS) == set(LANGUAGES) - {"auto"} == set(richtext.TAGGED_LANGUAGES)


def test_an_unknown_language_is_refused_with_the_declared_list(client: TestClient, speech_wav: bytes) -> None:
    r = client.post("/v1/audio/transcriptions", files={"file": ("a.wav", speech_wav)}, data={"language": "xx"})
    assert r.status_code == 400
    assert ", ".join(LANGUAGES) in r.json()["error"]["message"]


def _aiff(seconds: float) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, synth.speech_like(seconds).astype(np.float32), 16_000, format="AIFF")
    return buf.getvalue()


def test_a_golden_clip_in_any_accepted_format_is_a_smoke_clip(tmp_path: Path, model_dir: Callable[..., Path]) -> None:
    folder = shutil.copytree(model_dir(TEXT_A), tmp_path / "with-aiff")
    (folder / "smoke" / "hello.aiff").write_bytes(_aiff(1.5))
    (folder / "smoke" / "hello.txt").write_text(TEXT_A + "\n")
    registry = Registry(tmp_path / "registry").ensure()
    manifest = registry.add(folder, "v1")
    assert ("smoke/hello.aiff", TEXT_A) in [(c.audio, c.text) for c in manifest.smoke]


def test_the_client_and_the_jobs_api_take_the_same_files_as_recordings(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    folder = tmp_path / "recordings"
    folder.mkdir()
    takes = sorted(f"take-{suffix[1:]}{suffix.upper()}" for suffix in AUDIO_SUFFIXES)
    for name in takes:
        (folder / name).write_bytes(_aiff(0.5))  # the content, not the suffix, decides the decoding
    (folder / "notes.txt").write_text("not a recording")
    assert [p.name for p in collect([folder])] == takes

    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.iterdir()):
            zf.write(path, path.name)
    with TestClient(create_app(make_settings(data_dir=tmp_path / "data"))) as client:
        r = client.post("/api/jobs", files=[("files", ("recordings.zip", archive.getvalue()))])
    assert r.status_code == 202, r.text
    assert sorted(j["filename"] for j in r.json()["jobs"]) == takes
    assert r.json()["skipped"] == ["notes.txt"]
