"""The smoke test a version must pass before it may serve: golden clips, or a built-in check.

A version with golden clips passes when every clip's transcript is within the CER threshold of
its expected text and within the latency budget. A real model folder brought without a clip
still gets a built-in check: inference runs on speech-like audio and on silence, the output parses
into SenseVoice tags, and both stay within the latency budget.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from server.engines.sensevoice import Engine
from server.errors import VoxswapError
from server.speech import audio, richtext
from server.storage.manifest import Manifest
from server.testing import synth


@dataclass
class ClipResult:
    clip: str
    expected: str | None
    got: str
    cer: float | None
    latency_s: float
    passed: bool
    reason: str = ""


@dataclass
class SmokeReport:
    passed: bool
    golden: bool  # False: no golden clip, only the built-in check ran
    clips: list[ClipResult] = field(default_factory=list)
    duration_s: float = 0.0

    @property
    def reason(self) -> str:
        failed = [c for c in self.clips if not c.passed]
        return "; ".join(f"{c.clip}: {c.reason}" for c in failed)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["reason"] = self.reason
        data["summary"] = "golden clips" if self.golden else "no golden clip (built-in check only)"
        return data


def run_smoke(
    engine: Engine, manifest: Manifest, version_dir: Path, *, cer_threshold: float, latency_budget_s: float
) -> SmokeReport:
    started = time.perf_counter()
    results: list[ClipResult] = []
    if manifest.smoke:
        for clip in manifest.smoke:
            try:
                decoded = audio.decode((version_dir / clip.audio).read_bytes(), max_seconds=3600)
            except (VoxswapError, OSError) as exc:  # a clip that cannot be read fails the check
                results.append(ClipResult(clip.audio, clip.text, "", None, 0.0, False,
                                          f"the clip could not be read: {exc}"))
                continue
            results.append(_check(engine, clip.audio, decoded.samples, clip.text, clip.language,
                                  clip.use_itn, cer_threshold, latency_budget_s))
    else:
        results.append(_check(engine, "builtin:speech", synth.speech_like(1.5, seed=7), None, "auto",
                              False, cer_threshold, latency_budget_s))
        results.append(_check(engine, "builtin:silence", synth.silence(1.0), None, "auto",
                              False, cer_threshold, latency_budget_s))
    return SmokeReport(passed=all(r.passed for r in results), golden=bool(manifest.smoke),
                       clips=results, duration_s=time.perf_counter() - started)


def _check(
    engine: Engine,
    name: str,
    samples: Any,
    expected: str | None,
    language: str,
    use_itn: bool,
    cer_threshold: float,
    latency_budget_s: float,
) -> ClipResult:
    t0 = time.perf_counter()
    try:
        raw = engine.transcribe(samples, language=language, use_itn=use_itn)
    except Exception as exc:  # any failure of a candidate model is a smoke failure, not a crash
        return ClipResult(name, expected, "", None, time.perf_counter() - t0, False,
                          f"inference failed: {type(exc).__name__}: {exc}")
    latency = time.perf_counter() - t0
    parsed = richtext.parse(raw)
    reasons = []
    cer = None
    if expected is not None:
        cer = richtext.char_error_rate(expected, parsed.text)
        if cer > cer_threshold:
            reasons.append(f"expected {expected!r}, got {parsed.text!r} (CER {cer:.2f} > {cer_threshold:g})")
    elif parsed.language is None:
        reasons.append(f"output has no SenseVoice language tag: {raw[:80]!r}")
    if latency > latency_budget_s:
        reasons.append(f"took {latency:.2f} s, budget {latency_budget_s:g} s")
    return ClipResult(name, expected, parsed.text, cer, latency, not reasons, "; ".join(reasons))
