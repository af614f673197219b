"""Every named model this process serves, each with its own :class:`ModelLifecycle`.

A model is found in the registry folder (:class:`ModelCatalog`) and gets a lifecycle the first
time this process sees it: at start, or when a background tick notices a model created since (a
CLI ``registry add --model NEW`` beside a running server). Lifecycles never share a lock, a pointer
or a rollout, so two models swap at the same time and one model's failure stays its own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from server.errors import NotFound
from server.lifecycle.holder import LoadedModel
from server.lifecycle.policy import ModelLifecycle
from server.lifecycle.report import SwapReport
from server.metrics import Metrics
from server.settings import Settings
from server.storage.catalog import ModelCatalog


class ModelSet:
    """The lifecycles of one process, by model name; the default model's is always there."""

    def __init__(self, catalog: ModelCatalog, settings: Settings, metrics: Metrics):
        self.catalog = catalog
        self.settings = settings
        self.metrics = metrics
        self._guard = threading.Lock()
        self._lifecycles: dict[str, ModelLifecycle] = {}
        self._draining = False
        self.after_swap: Callable[[SwapReport], None] = lambda report: None  # told of every model's swaps
        # the pipelines' gate (set by the service layer): (model, candidate) -> why it fails, or None
        self.pipeline_gate: Callable[[str, LoadedModel], str | None] = lambda model, candidate: None
        self._add(catalog.default)

    @property
    def default(self) -> ModelLifecycle:
        return self._lifecycles[self.catalog.default]

    def names(self) -> list[str]:
        return list(self._lifecycles)

    def __iter__(self) -> Iterator[ModelLifecycle]:
        return iter(list(self._lifecycles.values()))

    def __contains__(self, name: object) -> bool:
        return name in self._lifecycles

    def get(self, name: str) -> ModelLifecycle:
        """The model's lifecycle; one created on disk since the last discovery is picked up now."""
        found = self._lifecycles.get(name)
        if found is None:
            self.discover()
            found = self._lifecycles.get(name)
        if found is None:
            raise NotFound(f"no model {name[:80]!r}; GET /admin/models (or /v1/models) lists them", param="model")
        return found

    def discover(self) -> list[ModelLifecycle]:
        """Lifecycles for models created on disk since the last look; returns the new ones."""
        added = []
        with self._guard:
            for name in self.catalog.names():
                if name not in self._lifecycles:
                    added.append(self._add(name))
        return added

    def _add(self, name: str) -> ModelLifecycle:
        lifecycle = ModelLifecycle(self.catalog.registry(name), self.settings, self.metrics.for_model(name))
        lifecycle.draining = self._draining
        lifecycle.after_swap = lambda report: self.after_swap(report)
        lifecycle.builder.gate = lambda candidate: self.pipeline_gate(name, candidate)
        self._lifecycles = {**self._lifecycles, name: lifecycle}  # readers iterate without the guard
        return lifecycle

    @property
    def draining(self) -> bool:
        """The process is shutting down: every model's rollouts and connections know it."""
        return self._draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self._draining = value
        for lifecycle in self:
            lifecycle.draining = value

    def memory_bytes(self) -> int:
        """What the live versions of every model added when they loaded."""
        return sum(live.memory_bytes for lifecycle in self if (live := lifecycle.live) is not None)

    def shutdown(self) -> None:
        for lifecycle in self:
            lifecycle.shutdown()
