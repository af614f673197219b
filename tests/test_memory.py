"""The old version's memory comes back after a swap and after an unload, measured as RSS."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import psutil
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings
from server.storage.registry import Registry
from tests.conftest import AUTH, TEXT_A, TEXT_B, TOKEN

WEIGHTS_MB = 96
MiB = 2**20


def test_swaps_and_unload_give_the_old_versions_memory_back(
    tmp_path: Path, model_dir: Callable[..., Path], speech_wav: bytes
) -> None:
    reg = Registry(tmp_path / "registry").ensure()
    reg.add(model_dir(TEXT_A, weights_mb=WEIGHTS_MB), "a")
    reg.add(model_dir(TEXT_B, weights_mb=WEIGHTS_MB), "b")
    reg.promote("a")
    # loaded from the original file, whose weights onnxruntime copies: the --weights-mb stand-in reads
    # its weights through one Gather row, so mapped from a prepared graph they never become resident
    settings = Settings(registry=reg.root, admin_token=TOKEN, seed_demo=False,  # type: ignore[arg-type]
                        prepare_on_load=False, prepare_on_add=False)
    process = psutil.Process()
    with TestClient(create_app(settings)) as client:
        settled = process.memory_info().rss
        for version in ("b", "a", "b"):
            report = client.post("/admin/model/update", json={"version": version}, headers=AUTH).json()
            assert report["outcome"] == "success", report
            memory = report["memory"]
            # the old session's weights are what the free step gave back
            assert memory["freed_bytes"] > 0.8 * WEIGHTS_MB * MiB, memory
            assert memory["rss_after_free_bytes"] < memory["rss_before_free_bytes"] - 0.8 * WEIGHTS_MB * MiB
        r = client.post("/api/transcribe", files={"file": ("s.wav", speech_wav)})
        assert r.json()["text"] == TEXT_B
        # three swaps later the process holds one model, not four
        assert process.memory_info().rss < settled + 0.5 * WEIGHTS_MB * MiB
        loaded = process.memory_info().rss
        assert client.post("/admin/model/unload", headers=AUTH).status_code == 200
        assert process.memory_info().rss < loaded - 0.8 * WEIGHTS_MB * MiB
        status = client.get("/api/system/status").json()
        assert status["model_loaded"] is False


def test_a_model_saved_with_external_weights_is_registered_verified_and_served(
    tmp_path: Path, model_dir: Callable[..., Path], speech_wav: bytes
) -> None:
    """The export the README recommends for big models: weights beside the graph, memory-mapped."""
    import shutil

    import onnx

    folder = tmp_path / "external"
    shutil.copytree(model_dir(TEXT_B, weights_mb=8), folder)
    model = onnx.load(str(folder / "model.onnx"))
    onnx.save(model, str(folder / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    assert (folder / "model.onnx").stat().st_size < 2**20 < (folder / "model.onnx.data").stat().st_size
    reg = Registry(tmp_path / "registry").ensure()
    reg.add(model_dir(TEXT_A), "a")
    manifest = reg.add(folder, "b-external")
    assert "model.onnx.data" in {f["path"] for f in manifest.files}
    reg.promote("a")
    settings = Settings(registry=reg.root, admin_token=TOKEN, seed_demo=False)  # type: ignore[arg-type]
    with TestClient(create_app(settings)) as client:
        r = client.post("/admin/model/update", json={"version": "b-external"}, headers=AUTH)
        assert r.status_code == 200, r.text
        r = client.post("/api/transcribe", files={"file": ("s.wav", speech_wav)})
        assert (r.json()["text"], r.json()["model_version"]) == (TEXT_B, "b-external")
