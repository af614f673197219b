"""Build a candidate beside the live model: verify its files, load its engine (of the kind its
manifest records), smoke-test it (in that kind's form).

The answer is a :class:`LoadedModel` ready to serve, or a :class:`SwapFailed` whose ``outcome``
(verify_failed, load_failed, smoke_failed) and message say why it was refused. A refusal closes
whatever it built, so the live engine and the memory it may use are untouched.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable

from server.engines.base import EngineLoadError
from server.engines.factory import load_engine
from server.errors import NotFound, SwapFailed, VerificationFailed
from server.lifecycle.holder import LoadedModel, resident_bytes
from server.lifecycle.report import SwapReport
from server.lifecycle.smoke import run_smoke
from server.metrics import ModelMetrics
from server.settings import Settings
from server.storage.registry import Registry
from server.vocab import HistoryEvent


class CandidateBuilder:
    def __init__(self, registry: Registry, settings: Settings, metrics: ModelMetrics):
        self.registry = registry
        self.settings = settings
        self.metrics = metrics
        self.lean: Callable[[str], bool] = lambda version: False  # build it with one intra-op thread
        # beyond its own smoke test: why a candidate fails the pipelines that use its model, or None
        self.gate: Callable[[LoadedModel], str | None] = lambda candidate: None

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

        fault = self._fault(version, role)
        t = time.perf_counter()
        rss_before = resident_bytes()
        try:
            if fault:
                raise EngineLoadError(f"fault injected: {fault}")
            engine = load_engine(manifest.kind, path, manifest.model_file(self.settings.prefer_quantized),
                                 threads=1 if self.lean(version) else self.settings.intra_op_threads,
                                 device=self.settings.device)
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
