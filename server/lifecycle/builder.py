"""Build a candidate beside the live model: verify its files, load its engine (of the kind its
manifest records), smoke-test it (in that kind's form).

The answer is a :class:`LoadedModel` ready to serve, or a :class:`SwapFailed` whose ``outcome``
(verify_failed, load_failed, smoke_failed) and message say why it was refused. A refusal closes
whatever it built, so the live engine and the memory it may use are untouched.

The engine loads the version's prepared graphs for this host (:mod:`server.storage.prepared`):
mapped weights, no graph optimisation, about half the peak memory of loading the original. One
that is missing, made for another host or damaged is made again first (``prepare_on_load``: one
full load's memory and time, once per version and host); one that still cannot be used, or fails
to load, leaves the engine on the original files, which verify checked. Either way the load goes
on, the reason is logged, and the engine reports which file each session loaded.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from server.engines.base import BaseEngine, EngineLoadError
from server.engines.factory import load_engine
from server.engines.session import GraphSource, SessionConfig, SessionError, host_target, prepare_graph
from server.errors import NotFound, SwapFailed, VerificationFailed
from server.lifecycle.holder import LoadedModel, resident_bytes
from server.lifecycle.report import SwapReport
from server.lifecycle.smoke import run_smoke
from server.metrics import ModelMetrics
from server.settings import Settings
from server.storage import prepared
from server.storage.manifest import Manifest
from server.storage.registry import Registry
from server.vocab import HistoryEvent

log = logging.getLogger("voxswap.lifecycle")


@functools.cache
def graph_maker(device: str, prefer_quantized: bool) -> prepared.GraphMaker:
    """How this host prepares graphs: the engines make them, the registry records them."""

    def make(source: Path, out: Path) -> list[str]:
        try:
            return prepare_graph(source, out, device=device)
        except SessionError as exc:
            raise prepared.PrepareFailed(str(exc)) from exc

    return prepared.GraphMaker(target=host_target(device), make=make, prefer_quantized=prefer_quantized)


class CandidateBuilder:
    def __init__(self, registry: Registry, settings: Settings, metrics: ModelMetrics):
        self.registry = registry
        self.settings = settings
        self.metrics = metrics
        self.lean: Callable[[str], bool] = lambda version: False  # build it with one intra-op thread
        # beyond its own smoke test: why a candidate fails the pipelines that use its model, or None
        self.gate: Callable[[LoadedModel], str | None] = lambda candidate: None
        if settings.prepare_on_add and registry.preparer is None:  # uploads to this model prepare too
            registry.preparer = graph_maker(settings.device, settings.prefer_quantized)

    def build(self, version: str, report: SwapReport, *, role: str = "coordinator") -> LoadedModel:
        """Verify, load and smoke-test ``version``; each phase's time goes into ``report``."""
        t = time.perf_counter()
        try:
            manifest = self.registry.verify(version)
            path = self.registry.version_dir(version)
        except (VerificationFailed, NotFound) as exc:
            raise SwapFailed(exc.message, outcome="verify_failed") from exc
        except ValueError as exc:  # a manifest that is not valid JSON
            raise SwapFailed(f"version {version!r} has an unreadable manifest: {exc}",
                             outcome="verify_failed") from exc
        report.timings["verify_s"] = self._phase("verify", t)

        t = time.perf_counter()
        model_file = manifest.model_file(self.settings.prefer_quantized)
        config = self._session_config(version, path, manifest, model_file)
        report.timings["prepare_s"] = self._phase("prepare", t)  # checking the prepared graphs, making any

        fault = self._fault(version, role)
        t = time.perf_counter()
        rss_before = resident_bytes()
        try:
            if fault:
                raise EngineLoadError(f"fault injected: {fault}")
            engine = self._load(version, path, manifest.kind, model_file, config,
                                threads=1 if self.lean(version) else self.settings.intra_op_threads)
        except EngineLoadError as exc:
            # onnxruntime names the file it failed on; clients get the version, not our disk layout
            reason = str(exc).replace(str(path), f"<{version}>")
            raise SwapFailed(f"version {version!r} failed to load: {reason}", outcome="load_failed") from exc
        load_s = self._phase("load", t)
        self.metrics.load_time(load_s)
        report.timings["load_s"] = load_s
        memory = max(0, resident_bytes() - rss_before)
        report.memory["model_bytes"] = memory

        t = time.perf_counter()
        smoke = run_smoke(engine, manifest, path, cer_threshold=self.settings.smoke_cer_threshold,
                          latency_budget_s=self.settings.smoke_latency_budget_s)
        report.timings["smoke_s"] = self._phase("smoke", t)
        report.smoke = smoke.to_json()
        if not smoke.passed:
            engine.close()
            raise SwapFailed(f"version {version!r} failed its smoke test: {smoke.reason}",
                             outcome="smoke_failed")
        candidate = LoadedModel(version=version, path=path, manifest=manifest, engine=engine,
                                loaded_at=time.time(), load_s=load_s, memory_bytes=memory, smoke=smoke)
        t = time.perf_counter()
        problem = self.gate(candidate)
        report.timings["pipeline_smoke_s"] = time.perf_counter() - t
        if problem is not None:
            engine.close()
            raise SwapFailed(f"version {version!r} failed a pipeline's smoke test: {problem}", outcome="smoke_failed")
        return candidate

    def _session_config(self, version: str, path: Path, manifest: Manifest, model_file: str) -> SessionConfig:
        """Which graph each session loads: this host's prepared one (made again first where
        ``prepare_on_load`` allows), else the original, with the reason logged."""
        maker = graph_maker(self.settings.device, self.settings.prefer_quantized)
        choices = prepared.choose(path, manifest, model_file, maker, prepare_missing=self.settings.prepare_on_load,
                                  work=self.registry.work_folder)
        for choice in choices:
            if choice.graph is None or choice.prepared_now:
                log.warning("graph prepared at load" if choice.graph else "loading the original graph",
                            extra={"event": "graph_prepared" if choice.graph else "prepared_graph_unused",
                                   "model": self.registry.model, "version": version, "source": choice.source,
                                   "reason": choice.reason})
        return SessionConfig({c.source: GraphSource(c.graph, c.reason) for c in choices},
                             spin_wait=self.settings.session_spin_wait)

    def _load(self, version: str, path: Path, kind: str, model_file: str, config: SessionConfig, *,
              threads: int) -> BaseEngine:
        """The engine on ``config``'s graphs; on the originals if a prepared graph fails to load."""
        try:
            return load_engine(kind, path, model_file, threads=threads, device=self.settings.device, config=config)
        except EngineLoadError as exc:
            if not any(source.prepared for source in config.graphs.values()):
                raise
            reason = f"its prepared graph failed to load: {exc}"
            log.warning("loading the original graph", extra={"event": "prepared_graph_unused", "version": version,
                                                             "model": self.registry.model, "reason": reason})
        originals = {name: GraphSource(None, reason) for name in config.graphs}
        return load_engine(kind, path, model_file, threads=threads, device=self.settings.device,
                           config=SessionConfig(originals, spin_wait=config.spin_wait))

    def trial(self, version: str, *, event: str) -> SwapReport:
        """Build ``version`` and close it again: the CLI's promote checks a version this way before
        moving the pointer, and a refusal goes into the history as a server's would."""
        report = SwapReport(version=version, from_version=None, event=event, model=self.registry.model)
        try:
            self.build(version, report).engine.close()
        except SwapFailed as exc:
            self.registry.record(HistoryEvent.SWAP_FAILED, version=version, actor="cli", outcome=exc.outcome,
                                 reason=exc.message, request=event)
            raise
        report.timings["total_s"] = time.perf_counter() - report.started
        return report

    def _phase(self, phase: str, started: float) -> float:
        elapsed = time.perf_counter() - started
        self.metrics.phase(phase, elapsed)
        return elapsed

    def _fault(self, version: str, role: str) -> str | None:
        """Test-only: ``faults/load.json`` ({"version", "role"}) makes ONE worker fail its load.

        Honoured only with ``fault_injection`` on. The first matching worker claims the file by
        renaming it, so exactly one process fails, whichever it is.
        """
        if not self.settings.fault_injection:
            return None
        path = self.registry.root / "faults" / "load.json"
        try:
            fault = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return None
        if fault.get("version") not in (None, version) or fault.get("role") not in (None, role):
            return None
        try:
            os.rename(path, path.with_name(f"load.claimed.{os.getpid()}.json"))
        except FileNotFoundError:
            return None  # another worker claimed it first
        return f"injected load failure in worker {os.getpid()}"
