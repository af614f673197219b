"""Paraformer-family named models served beside the default SenseVoice: transcription, hotwords,
the refusals a request gets for a model of the wrong kind, and a blue/green swap under load."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings
from server.storage.catalog import ModelCatalog
from server.storage.registry import Registry
from server.testing import synth
from testkit.harness import LoadGenerator, serve_in_thread, wait_until
from tests.conftest import AUTH, TEXT_A, TEXT_B, TOKEN
from tests.kinds import KindFolder, kind_folder  # noqa: F401  (a fixture)

PARA_1 = "paraformer one speaks"
PARA_2 = "paraformer two speaks"
HOT = "call the team"


@pytest.fixture
def kinds(registry: Registry, kind_folder: KindFolder) -> ModelCatalog:  # noqa: F811
    """The default SenseVoice model (``a`` current), ``para`` (paraformer: ``p1`` current, ``p2``),
    ``hot`` (seaco-paraformer: ``h1``) and ``punc`` (ct-punc: ``c1``)."""
    cat = ModelCatalog(registry.root)
    para = cat.create("para", "paraformer")
    para.add(kind_folder("paraformer", text=PARA_1), "p1")
    para.add(kind_folder("paraformer", text=PARA_2, timestamps=True), "p2")
    para.promote("p1")
    hot = cat.create("hot", "seaco-paraformer")
    hot.add(kind_folder("seaco-paraformer", text=HOT), "h1")
    hot.promote("h1")
    punc = cat.create("punc", "ct-punc")
    punc.add(kind_folder("ct-punc"), "c1")
    punc.promote("c1")
    return cat


@pytest.fixture
def app(kinds: ModelCatalog, make_settings: Callable[..., Settings]) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings())) as c:
        yield c


def _post(c: TestClient, clip: bytes, path: str = "/api/transcribe", **form: str) -> httpx.Response:
    return c.post(path, files={"file": ("clip.wav", clip, "audio/wav")}, data=form)


def test_paraformer_models_transcribe_beside_the_default_sensevoice(app: TestClient, speech_wav: bytes) -> None:
    r = _post(app, speech_wav, model="para")
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["text"], body["model"], body["model_version"]) == (PARA_1, "para", "p1")
    assert (body["language"], body["emotion"], body["events"]) == (None, None, [])  # a Paraformer has no tags
    assert [s["text"] for s in body["segments"]] == [PARA_1]
    assert (r.headers["x-model"], r.headers["x-model-version"]) == ("para", "p1")
    r = _post(app, speech_wav, "/v1/audio/transcriptions", model="para", response_format="verbose_json")
    assert (r.json()["text"], r.json()["model"], r.json()["language"]) == (PARA_1, "para", None)
    assert _post(app, speech_wav, "/v1/audio/transcriptions", model="hot").json() == {"text": HOT}
    r = _post(app, speech_wav, "/v1/audio/transcriptions", model="para", response_format="srt")
    assert PARA_1 in r.text
    assert _post(app, speech_wav).json()["text"] == TEXT_A  # the default model is untouched
    silence = synth.wav_bytes(synth.silence(1.0))
    assert _post(app, silence, model="para").json()["text"] == ""
    cards = {m["id"]: m for m in app.get("/v1/models").json()["data"]}
    assert (cards["para"]["kind"], cards["hot"]["kind"], cards["punc"]["kind"]) == \
        ("paraformer", "seaco-paraformer", "ct-punc")
    models = {m["name"]: m for m in app.get("/admin/models", headers=AUTH).json()["models"]}
    assert models["para"]["live_version"] == "p1" and models["para"]["smoke"]["passed"] is True


def test_hotwords_change_a_seaco_answer_and_are_a_400_for_models_that_cannot_use_them(
        app: TestClient, speech_wav: bytes) -> None:
    r = _post(app, speech_wav, model="hot", hotwords="voxswap")
    assert r.status_code == 200 and r.json()["text"] == f"{HOT} voxswap", r.text
    assert _post(app, speech_wav, model="hot", hotwords="  voxswap   blue ").json()["text"] == f"{HOT} voxswap blue"
    assert _post(app, speech_wav, model="hot", hotwords="").json()["text"] == HOT
    # OpenAI's prompt is the hotwords of a model that takes them; its too-long words are left out
    r = _post(app, speech_wav, "/v1/audio/transcriptions", model="hot", prompt="voxswap transcription")
    assert r.json()["text"] == f"{HOT} voxswap"
    for model, kind in (("", "sensevoice"), ("para", "paraformer")):
        r = _post(app, speech_wav, model=model, hotwords="voxswap")
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert "cannot use hotwords" in error["message"] and kind in error["message"], error
        assert error["param"] == "hotwords"
        # OpenAI clients send a prompt routinely: ignored for a model without hotwords
        r = _post(app, speech_wav, "/v1/audio/transcriptions", model=model or "whisper-1", prompt="voxswap")
        assert r.status_code == 200, r.text
    r = _post(app, speech_wav, model="hot", hotwords="abcdefghijk")
    assert r.status_code == 400 and "longer than 10 characters" in r.json()["error"]["message"]
    r = _post(app, speech_wav, model="hot", hotwords=" ".join(["w"] * 101))
    assert r.status_code == 400 and "at most 100" in r.json()["error"]["message"]
    r = _post(app, speech_wav, model="hot", hotwords="x " * 600)
    assert r.status_code == 400 and r.json()["error"]["param"] == "hotwords"
    assert _post(app, speech_wav, model="hot").json()["text"] == HOT  # nothing stuck from the refusals


def test_a_punctuation_model_named_on_a_transcription_route_is_a_clear_400(app: TestClient,
                                                                           speech_wav: bytes) -> None:
    for path in ("/api/transcribe", "/v1/audio/transcriptions"):
        for model in ("punc", "punc@c1"):
            r = _post(app, speech_wav, path, model=model)
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["message"].startswith("model 'punc' is a punctuation model"), error
            assert "use it in a pipeline" in error["message"] and error["param"] == "model"


def test_a_paraformer_update_under_load_loses_nothing_and_labels_every_answer(
        kinds: ModelCatalog, make_settings: Callable[..., Settings]) -> None:
    settings = make_settings(inference_workers=2, intra_op_threads=1, max_queue=32, drain_timeout_s=30)
    texts = {("para", "p1"): PARA_1, ("para", "p2"): PARA_2, ("sensevoice", "a"): TEXT_A,
             ("sensevoice", "b"): TEXT_B}
    clip = synth.wav_bytes(synth.speech_like(1.5, seed=4))
    answer: dict[str, Any] = {}

    def update(url: str) -> None:
        r = httpx.post(f"{url}/admin/models/para/update", json={"version": "p2", "expected_current": "p1"},
                       headers={"Authorization": f"Bearer {TOKEN}"}, timeout=120)
        answer.update(status=r.status_code, body=r.json(), answered=time.monotonic())

    with serve_in_thread(create_app(settings)) as url, \
            LoadGenerator(url, clip, concurrency=3, form={"model": "para"}) as para_load, \
            LoadGenerator(url, clip, concurrency=1) as default_load:
        wait_until(lambda: para_load.count() >= 10 and default_load.count() >= 3, message="traffic on both models")
        swap = threading.Thread(target=update, args=(url,))
        swap.start()
        swap.join()
        settled = para_load.count()
        wait_until(lambda: para_load.count() >= settled + 10, message="traffic after the swap")
    assert answer["status"] == 200, answer
    assert (answer["body"]["model"], answer["body"]["version"]) == ("para", "p2")
    assert para_load.failures() == [] and default_load.failures() == []
    for outcome in para_load.outcomes + default_load.outcomes:
        assert outcome.text == texts[(outcome.model or "", outcome.version or "")], outcome
    assert {o.version for o in para_load.outcomes} == {"p1", "p2"}
    after = [o.version for o in para_load.outcomes if o.started > answer["answered"]]
    assert after and set(after) == {"p2"}  # sent once the update answered: the new version only
    assert {o.model for o in para_load.outcomes} == {"para"}
    assert {(o.model, o.version) for o in default_load.outcomes} == {("sensevoice", "a")}
