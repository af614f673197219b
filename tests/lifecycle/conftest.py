"""Lifecycle objects built directly on the generated models: no app, no HTTP."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from server.lifecycle.builder import CandidateBuilder
from server.lifecycle.holder import LoadedModel
from server.lifecycle.report import SwapReport
from server.metrics import Metrics
from server.settings import Settings
from server.storage.registry import Registry


@pytest.fixture
def build(registry: Registry, settings: Settings) -> Callable[[str], LoadedModel]:
    """``build(version)`` -> a verified, loaded, smoke-tested candidate of the registry's version."""
    builder = CandidateBuilder(registry, settings, Metrics().for_model("sensevoice"))

    def make(version: str) -> LoadedModel:
        return builder.build(version, SwapReport(version=version, from_version=None, event="test"))

    return make
