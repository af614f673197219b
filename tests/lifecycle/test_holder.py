"""The holder: leases, flips, staging and retirement of one model's engines, without HTTP."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from server.errors import NotReady, VersionNotLoaded
from server.lifecycle.builder import CandidateBuilder
from server.lifecycle.holder import LoadedModel, ModelHolder
from server.lifecycle.report import SwapReport
from server.metrics import Metrics
from server.settings import Settings
from server.storage.registry import Registry
from server.testing import synth
from tests.conftest import TEXT_A, TEXT_B

CLIP = synth.speech_like(1.0, seed=3)


def _holder(drain_timeout_s: float = 5.0) -> ModelHolder:
    return ModelHolder(drain_timeout_s=drain_timeout_s, unavailable=lambda: "nothing is loaded in this test")


def test_a_lease_taken_before_a_flip_is_answered_by_the_old_version(build: Callable[[str], LoadedModel]) -> None:
    holder = _holder()
    holder.flip(build("a"))
    with holder.lease() as model:
        old = holder.flip(build("b"))
        assert old is model  # the flip hands the old engine back, still open for its requests
        assert model.engine.transcribe(CLIP).endswith(TEXT_A)
        with holder.lease() as newer:
            assert newer.version == "b"
            assert newer.engine.transcribe(CLIP).endswith(TEXT_B)
    retired = holder.retire(model)
    assert retired.drained and model.engine.closed
    holder.close_all()


def test_a_drain_timeout_frees_the_engine_when_its_last_lease_ends(build: Callable[[str], LoadedModel]) -> None:
    holder = _holder(drain_timeout_s=0.2)
    holder.flip(build("a"))
    leased = threading.Event()
    release = threading.Event()
    seen: list[str] = []

    def long_request() -> None:
        with holder.lease() as model:
            leased.set()
            release.wait(10)
            seen.append(model.engine.transcribe(CLIP))  # runs after the drain gave up on it

    worker = threading.Thread(target=long_request)
    worker.start()
    assert leased.wait(10)
    old = holder.flip(build("b"))
    assert old is not None
    retirement = holder.retire(old)
    assert not retirement.drained and retirement.in_flight_at_drain_end == 1
    assert not old.engine.closed  # never freed under a running request
    release.set()
    worker.join(10)
    assert seen and seen[0].endswith(TEXT_A)
    assert old.engine.closed  # the last lease closed it
    holder.close_all()


def test_a_staged_candidate_can_be_pinned_and_goes_when_its_last_pinned_request_ends(
    build: Callable[[str], LoadedModel],
) -> None:
    holder = _holder()
    holder.flip(build("a"))
    holder.stage(build("b"))
    assert holder.loaded_versions() == ["a", "b"]
    with holder.lease("b") as pinned:
        assert holder.discard_candidate()
        assert not pinned.engine.closed
        assert pinned.engine.transcribe(CLIP).endswith(TEXT_B)
    assert pinned.engine.closed
    with pytest.raises(VersionNotLoaded, match="loaded: a"), holder.lease("b"):
        pass
    holder.close_all()


def test_with_nothing_live_a_lease_is_refused_with_the_reason(build: Callable[[str], LoadedModel]) -> None:
    holder = _holder()
    with pytest.raises(NotReady, match="nothing is loaded in this test"), holder.lease():
        pass
    holder.flip(build("a"))
    old = holder.take_live()
    assert old is not None and holder.live is None
    assert holder.retire(old).drained and old.engine.closed


def test_retiring_a_model_gives_its_memory_back(
    build: Callable[[str], LoadedModel], registry: Registry, settings: Settings, model_dir: Callable[..., Path]
) -> None:
    """What a swap reports as freed is the resident memory the old engine really held. Loaded from the
    original file: the --weights-mb stand-in reads its weights through one Gather row, so mapped from a
    prepared graph they would never become resident and there would be nothing to give back."""
    registry.preparer = None  # added and loaded as before prepared graphs
    registry.add(model_dir("a big model", weights_mb=64), "big")
    settings = settings.model_copy(update={"prepare_on_load": False, "prepare_on_add": False})
    builder = CandidateBuilder(registry, settings, Metrics().for_model("sensevoice"))
    holder = _holder()
    holder.flip(builder.build("big", SwapReport(version="big", from_version=None, event="test")))
    old = holder.flip(build("a"))
    assert old is not None and old.version == "big"
    retirement = holder.retire(old)
    assert retirement.freed_bytes > 0.5 * 64 * 2**20
    holder.close_all()
