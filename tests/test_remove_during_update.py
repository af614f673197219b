"""A DELETE of the version an update is rolling out is refused with a 409, and the update succeeds.

Issue 18 found that ``DELETE /admin/model/versions/{name}`` sent while an update to ``name`` was
building it passed the "is it loaded?" check (it was not loaded yet), pulled the files from under
the build, and the update then failed with a misleading 422.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from server.settings import Settings
from server.storage.registry import Registry
from testkit.harness import serve_in_thread, wait_until
from tests.conftest import AUTH, TEXT_B


def test_a_delete_while_the_version_is_being_rolled_out_is_a_409_and_the_update_succeeds(
    registry: Registry, make_settings: Callable[..., Settings], model_dir: Callable[..., Path], speech_wav: bytes
) -> None:
    registry.add(model_dir(TEXT_B, compute_ms=1500), "slow")  # its smoke test takes a few seconds
    from server.app import create_app

    with serve_in_thread(create_app(make_settings())) as url:
        answers: dict[str, Any] = {}

        def update() -> None:
            answers["update"] = httpx.post(f"{url}/admin/model/update", json={"version": "slow"}, headers=AUTH,
                                           timeout=120)

        updating = threading.Thread(target=update)
        updating.start()
        status = wait_until(lambda: (s := httpx.get(f"{url}/api/system/status").json())["rollout"] and s,
                            message="the update to start building the version")
        assert status["rollout"]["version"] == "slow" and "slow" not in status["workers"][0]["version"]

        r = httpx.delete(f"{url}/admin/model/versions/slow", headers=AUTH)
        assert r.status_code == 409, r.text
        assert r.json()["error"]["code"] == "swap_in_progress"
        assert "'slow' is being rolled out" in r.json()["error"]["message"]
        assert r.headers["retry-after"]

        updating.join(timeout=120)
        assert answers["update"].status_code == 200, answers["update"].text
        assert answers["update"].json()["version"] == "slow"
        r = httpx.post(f"{url}/api/transcribe", files={"file": ("a.wav", speech_wav)}, timeout=60)
        assert r.json()["model_version"] == "slow" and r.json()["text"] == TEXT_B
    assert registry.verify("slow").name == "slow"
    assert not [e for e in registry.history() if e["event"] == "remove"]


def test_a_version_no_update_is_rolling_out_is_removed_as_before(
    registry: Registry, make_settings: Callable[..., Settings], model_dir: Callable[..., Path]
) -> None:
    registry.add(model_dir(TEXT_B), "spare")
    from server.app import create_app

    with serve_in_thread(create_app(make_settings())) as url:
        (registry.root / "rollout.json").write_text(  # a rollout whose coordinator is long gone
            '{"id": "x", "version": "spare", "from_version": "a", "phase": "staging", '
            '"coordinator_pid": 999999999, "started_at": 0, "deadline": 1}')
        r = httpx.delete(f"{url}/admin/model/versions/spare", headers=AUTH)
        assert r.status_code == 200 and r.json() == {"removed": "spare"}
    assert not (registry.versions_dir / "spare").exists()
    assert not list(registry.staging_dir.iterdir())
