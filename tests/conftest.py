"""Shared fixtures: generated model folders (built once per session) and isolated apps."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from server.app import create_app
from server.settings import Settings
from server.storage.catalog import ModelCatalog
from server.storage.registry import Registry
from server.testing import synth
from server.testing.modelgen import TestModelSpec, make_test_model
from testkit.harness import serve_in_thread

# generated folders of every kind, and the real FSMN-VAD export: fixtures any test module may ask for
pytest_plugins = ["tests.kinds"]

TEXT_A = "model a says hello"
TEXT_B = "model b greets you"
MEET_1 = "meeting model one speaks"
MEET_2 = "meeting model two speaks"
TOKEN = "test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(autouse=True)
def _private_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Apps that name no data dir keep their jobs in the test's own folder, not in the checkout."""
    monkeypatch.setenv("VOXSWAP_DATA_DIR", str(tmp_path / "data"))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``model_dir(text=..., **spec)`` -> a generated model folder, built once per distinct spec."""
    cache: dict[TestModelSpec, Path] = {}
    root = tmp_path_factory.mktemp("models")

    def build(text: str = TEXT_A, **kwargs: Any) -> Path:
        spec = TestModelSpec(text=text, **kwargs)
        if spec not in cache:
            cache[spec] = make_test_model(root / f"m{len(cache)}", spec)
        return cache[spec]

    return build


@pytest.fixture
def registry(tmp_path: Path, model_dir: Callable[..., Path]) -> Registry:
    """A registry with versions ``a`` (current) and ``b`` (added, not promoted)."""
    reg = Registry(tmp_path / "registry").ensure()
    reg.add(model_dir(TEXT_A), "a")
    reg.add(model_dir(TEXT_B), "b")
    reg.promote("a")
    return reg


@pytest.fixture
def catalog(registry: Registry, model_dir: Callable[..., Path]) -> ModelCatalog:
    """Beside ``registry`` (the default model): a model ``meeting`` with ``m1`` (current) and ``m2``."""
    cat = ModelCatalog(registry.root)
    meeting = cat.create("meeting", "sensevoice")
    meeting.add(model_dir(MEET_1), "m1")
    meeting.add(model_dir(MEET_2), "m2")
    meeting.promote("m1")
    return cat


@pytest.fixture
def settings(registry: Registry) -> Settings:
    return Settings(registry=registry.root, admin_token=TOKEN, seed_demo=False,  # type: ignore[arg-type]
                    watch_interval_s=0.05, drain_timeout_s=10)


@pytest.fixture
def make_settings(registry: Registry) -> Callable[..., Settings]:
    def build(**overrides: Any) -> Settings:
        base: dict[str, Any] = dict(registry=registry.root, admin_token=TOKEN, seed_demo=False,
                                    watch_interval_s=0.05, drain_timeout_s=10)
        base.update(overrides)
        return Settings(**base)

    return build


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture
def live_server(settings: Settings) -> Iterator[tuple[str, FastAPI]]:
    app = create_app(settings)
    with serve_in_thread(app) as url:
        yield url, app


@pytest.fixture(scope="session")
def speech_wav() -> bytes:
    return synth.wav_bytes(synth.speech_like(1.5, seed=1))


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# -- batch jobs ---------------------------------------------------------------------------------


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def jobs_app(make_settings: Callable[..., Any], data_dir: Path) -> Callable[..., TestClient]:
    """``jobs_app(**settings)`` -> a TestClient (not yet started) whose jobs live in ``data_dir``."""
    def build(**overrides: Any) -> TestClient:
        base: dict[str, Any] = dict(data_dir=data_dir, job_poll_s=0.05, webhook_backoff_s=0.05,
                                    webhook_allow_networks="127.0.0.1/32")  # the test receivers
        return TestClient(create_app(make_settings(**{**base, **overrides})))

    return build


@pytest.fixture
def jobs_client(jobs_app: Callable[..., TestClient]) -> Iterator[TestClient]:
    with jobs_app() as c:
        yield c


# groups that run only when selected by name (-m long, -m container), as .ci/run does after the
# default run: the README's test command stays near 10 minutes and builds no image
ON_REQUEST = {"long": "a suite of a minute or more", "container": "builds and runs the image"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    selected = config.getoption("markexpr") or ""
    for marker, what in ON_REQUEST.items():
        if marker in selected:
            continue
        skip = pytest.mark.skip(reason=f"{what}: selected only by -m {marker} (.ci/run runs it)")
        for item in items:
            if item.get_closest_marker(marker):
                item.add_marker(skip)
