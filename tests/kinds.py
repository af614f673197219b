"""Generated model folders of every kind, built once per session, for the tests of models of each
kind (import the fixture into a test module: ``from tests.kinds import kind_folder``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from server.testing.modelgen_paraformer import make_model

KindFolder = Callable[..., Path]


@pytest.fixture(scope="session")
def kind_folder(tmp_path_factory: pytest.TempPathFactory) -> KindFolder:
    """``kind_folder(kind, **options)`` -> a generated folder (``make_model``), one per distinct request."""
    cache: dict[tuple[str, tuple[tuple[str, Any], ...]], Path] = {}
    root = tmp_path_factory.mktemp("kind-folders")

    def build(kind: str, **options: Any) -> Path:
        key = (kind, tuple(sorted(options.items())))
        if key not in cache:
            cache[key] = make_model(kind, root / f"m{len(cache)}", **options)
        return cache[key]

    return build
