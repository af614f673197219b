"""The smoke test a version must pass before it may serve: its golden clips, or a built-in check,
in the form of its kind's answer.

- Speech recognition: every golden clip's transcript within the CER threshold of its expected
  text. Without goldens, inference runs on speech-like audio and on silence: silence must give
  little text (at most two words) and, for a model without tags, speech some text. SenseVoice's
  output must also parse into its tags, which proves the model ran even where it answers synthetic
  speech with a no-speech tag and no text (a real SenseVoice may).
- ``ct-punc``: each golden input (``x.in.txt``) punctuated as its answer (``x.txt``): the same
  characters, and at most the CER threshold's share of the punctuation slots differing. Built in:
  a sentence in gives the same words out, punctuated; empty text gives empty text.
- ``fsmn-vad``: each golden recording gives its expected segments, every boundary within the clip's
  tolerance (``DEFAULT_TOLERANCE_MS`` unless it says). Built in: speech between two silences gives
  at least one segment inside the audio over the speech; silence gives none.

Every clip of every kind must also answer within the latency budget.
"""

from __future__ import annotations

import json
import time
import unicodedata
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from server.engines.base import AsrEngine, BaseEngine, PuncEngine, VadEngine
from server.errors import VoxswapError
from server.speech import audio, richtext
from server.storage.manifest import Manifest, SmokeClip
from server.testing import synth

DEFAULT_TOLERANCE_MS = 400  # how far a golden segment's boundary may be from the one found
SILENCE_MAX_WORDS = 2  # what a model may say over silence and still pass ("uh" is no failure)
BUILTIN_PUNC_TEXT = "hello world this is a punctuation check 今天天气很好我们去公园散步"
VAD_SPEECH = (1000, 2500)  # ms: the speech of the built-in clip, between 1 s of silence either side


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


@dataclass(frozen=True)
class Limits:
    cer_threshold: float
    latency_budget_s: float


def run_smoke(
    engine: BaseEngine, manifest: Manifest, version_dir: Path, *, cer_threshold: float, latency_budget_s: float
) -> SmokeReport:
    started = time.perf_counter()
    limits = Limits(cer_threshold, latency_budget_s)
    if isinstance(engine, AsrEngine):
        results = _asr(engine, manifest, version_dir, limits)
    elif isinstance(engine, PuncEngine):
        results = _punc(engine, manifest, version_dir, limits)
    elif isinstance(engine, VadEngine):
        results = _vad(engine, manifest, version_dir, limits)
    else:
        results = [ClipResult("builtin", None, "", None, 0.0, False, f"no smoke test for a {engine.kind} engine")]
    return SmokeReport(passed=all(r.passed for r in results), golden=bool(manifest.smoke),
                       clips=results, duration_s=time.perf_counter() - started)


def _timed(name: str, expected: str | None, run: Callable[[], Any]) -> tuple[Any, float, ClipResult | None]:
    """``run()``'s answer and latency, or a failed result: any failure of a candidate is a smoke
    failure, never a crash of the swap."""
    t0 = time.perf_counter()
    try:
        answer = run()
    except Exception as exc:
        return None, 0.0, ClipResult(name, expected, "", None, time.perf_counter() - t0, False,
                                     f"inference failed: {type(exc).__name__}: {exc}")
    return answer, time.perf_counter() - t0, None


def _latency(reasons: list[str], latency: float, limits: Limits) -> None:
    if latency > limits.latency_budget_s:
        reasons.append(f"took {latency:.2f} s, budget {limits.latency_budget_s:g} s")


def _decode(version_dir: Path, clip: SmokeClip, expected: str) -> tuple[Any, ClipResult | None]:
    try:
        return audio.decode((version_dir / clip.audio).read_bytes(), max_seconds=3600).samples, None
    except (VoxswapError, OSError) as exc:  # a clip that cannot be read fails the check
        return None, ClipResult(clip.audio, expected, "", None, 0.0, False, f"the clip could not be read: {exc}")


# -- speech recognition -------------------------------------------------------------------------


def _asr(engine: AsrEngine, manifest: Manifest, version_dir: Path, limits: Limits) -> list[ClipResult]:
    if not manifest.smoke:
        return [_asr_check(engine, "builtin:speech", synth.speech_like(1.5, seed=7), None, "auto", False, limits),
                _asr_check(engine, "builtin:silence", synth.silence(1.0), None, "auto", False, limits)]
    results = []
    for clip in manifest.smoke:
        samples, failed = _decode(version_dir, clip, clip.text)
        results.append(failed or _asr_check(engine, clip.audio, samples, clip.text, clip.language, clip.use_itn,
                                            limits))
    return results


def _asr_check(engine: AsrEngine, name: str, samples: Any, expected: str | None, language: str, use_itn: bool,
               limits: Limits) -> ClipResult:
    raw, latency, failed = _timed(name, expected,
                                  lambda: engine.transcribe(samples, language=language, use_itn=use_itn))
    if failed:
        return failed
    parsed = richtext.parse(raw) if engine.tagged else None
    text = parsed.text if parsed else " ".join(str(raw).split())
    reasons = []
    cer = None
    if expected is not None:
        cer = richtext.char_error_rate(expected, text)
        if cer > limits.cer_threshold:
            reasons.append(f"expected {expected!r}, got {text!r} (CER {cer:.2f} > {limits.cer_threshold:g})")
    else:
        if parsed is not None and parsed.language is None:
            reasons.append(f"output has no SenseVoice language tag: {raw[:80]!r}")
        if name == "builtin:silence" and _words(text) > SILENCE_MAX_WORDS:
            reasons.append(f"silence gave {text[:80]!r}: more than {SILENCE_MAX_WORDS} words")
        if name == "builtin:speech" and parsed is None and not text:
            reasons.append("speech-like audio gave no text")
    _latency(reasons, latency, limits)
    return ClipResult(name, expected, text, cer, latency, not reasons, "; ".join(reasons))


def _words(text: str) -> int:
    """Words, counting each CJK character as one (a Paraformer's Chinese has no spaces)."""
    count = 0
    for word in text.split():
        cjk = sum(1 for ch in word if unicodedata.east_asian_width(ch) == "W")
        count += cjk + (1 if cjk < len(word) else 0)
    return count


# -- punctuation --------------------------------------------------------------------------------


def _punc(engine: PuncEngine, manifest: Manifest, version_dir: Path, limits: Limits) -> list[ClipResult]:
    if not manifest.smoke:
        return [_punc_builtin(engine, limits)]
    results = []
    for clip in manifest.smoke:
        try:
            given = (version_dir / clip.audio).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            results.append(ClipResult(clip.audio, clip.text, "", None, 0.0, False,
                                      f"the input could not be read: {exc}"))
            continue
        got, latency, failed = _timed(clip.audio, clip.text, partial(engine.punctuate, given))
        if failed:
            results.append(failed)
            continue
        reasons = []
        rate = punctuation_error_rate(clip.text, got)
        if rate is None:
            reasons.append(f"expected {clip.text!r}, got {got!r}: the words differ")
        elif rate > limits.cer_threshold:
            reasons.append(f"expected {clip.text!r}, got {got!r} ({rate:.2f} of the punctuation differs, "
                           f"more than {limits.cer_threshold:g})")
        _latency(reasons, latency, limits)
        results.append(ClipResult(clip.audio, clip.text, got, rate, latency, not reasons, "; ".join(reasons)))
    return results


def _punc_builtin(engine: PuncEngine, limits: Limits) -> ClipResult:
    name = "builtin:punctuation"
    got, latency, failed = _timed(name, None, lambda: (engine.punctuate(BUILTIN_PUNC_TEXT),
                                                               engine.punctuate("")))
    if failed:
        return failed
    text, empty = got
    reasons = []
    if _marks(text)[0] != _marks(BUILTIN_PUNC_TEXT)[0]:
        reasons.append(f"the words of {BUILTIN_PUNC_TEXT!r} did not come back: got {text!r}")
    elif not _marks(text)[1]:
        reasons.append(f"no punctuation in {text!r}")
    if empty:
        reasons.append(f"empty text gave {empty!r}")
    _latency(reasons, latency, limits)
    return ClipResult(name, None, text, None, latency, not reasons, "; ".join(reasons))


def _marks(text: str) -> tuple[str, dict[int, str]]:
    """The characters of ``text`` without punctuation or spaces (lower case), and the marks after each."""
    chars: list[str] = []
    marks: dict[int, str] = {}
    for ch in text:
        if ch.isspace():
            continue
        if unicodedata.category(ch).startswith("P") and ch != "'":
            marks[len(chars) - 1] = marks.get(len(chars) - 1, "") + ch
        else:
            chars.append(ch.lower())
    return "".join(chars), marks


def punctuation_error_rate(expected: str, got: str) -> float | None:
    """The share of punctuated places where ``got`` differs from ``expected`` (0 when both have
    none); None when the words themselves differ, which no punctuation can excuse."""
    want_chars, want = _marks(expected)
    got_chars, found = _marks(got)
    if want_chars != got_chars:
        return None
    places = set(want) | set(found)
    return sum(want.get(i) != found.get(i) for i in places) / len(places) if places else 0.0


# -- voice activity detection -------------------------------------------------------------------


def _vad(engine: VadEngine, manifest: Manifest, version_dir: Path, limits: Limits) -> list[ClipResult]:
    if not manifest.smoke:
        speech = synth.islands([("silence", VAD_SPEECH[0] / 1000),
                                ("speech", (VAD_SPEECH[1] - VAD_SPEECH[0]) / 1000), ("silence", 1.0)], seed=7)
        return [_vad_builtin_speech(engine, speech, limits), _vad_builtin_silence(engine, limits)]
    results = []
    for clip in manifest.smoke:
        expected = json.dumps([list(s) for s in clip.segments or ()])
        samples, failed = _decode(version_dir, clip, expected)
        if failed:
            results.append(failed)
            continue
        found, latency, failed = _timed(clip.audio, expected, partial(engine.segments, samples))
        if failed:
            results.append(failed)
            continue
        tolerance = DEFAULT_TOLERANCE_MS if clip.tolerance_ms is None else clip.tolerance_ms
        reasons = []
        off = segments_off_by(list(clip.segments or ()), found)
        if off is None:
            reasons.append(f"expected {len(clip.segments or ())} segments {expected}, found {len(found)}: "
                           f"{_segments_json(found)}")
        elif off > tolerance:
            reasons.append(f"expected {expected}, found {_segments_json(found)}: a boundary is {off} ms off "
                           f"(tolerance {tolerance} ms)")
        _latency(reasons, latency, limits)
        results.append(ClipResult(clip.audio, expected, _segments_json(found), None, latency, not reasons,
                                  "; ".join(reasons)))
    return results


def segments_off_by(expected: list[tuple[int, int]], found: list[tuple[int, int]]) -> int | None:
    """The largest distance (ms) between a boundary expected and the one found, pairing segments in
    order; None when the counts differ."""
    if len(expected) != len(found):
        return None
    return max((abs(a - b) for want, got in zip(expected, found, strict=True) for a, b in zip(want, got, strict=True)),
               default=0)


def _segments_json(segments: list[tuple[int, int]]) -> str:
    return json.dumps([list(s) for s in segments])


def _vad_builtin_speech(engine: VadEngine, clip: Any, limits: Limits) -> ClipResult:
    name = "builtin:speech"
    found, latency, failed = _timed(name, None, lambda: engine.segments(clip))
    if failed:
        return failed
    duration_ms = len(clip) * 1000 // synth.SAMPLE_RATE
    reasons = []
    if not found:
        reasons.append("speech between two silences gave no segment")
    elif any(not 0 <= start < end <= duration_ms for start, end in found):
        reasons.append(f"a segment lies outside the {duration_ms} ms of audio: {_segments_json(found)}")
    elif not any(start < VAD_SPEECH[1] and end > VAD_SPEECH[0] for start, end in found):
        reasons.append(f"no segment covers the speech at {list(VAD_SPEECH)} ms: {_segments_json(found)}")
    _latency(reasons, latency, limits)
    return ClipResult(name, None, _segments_json(found), None, latency, not reasons, "; ".join(reasons))


def _vad_builtin_silence(engine: VadEngine, limits: Limits) -> ClipResult:
    name = "builtin:silence"
    found, latency, failed = _timed(name, None, lambda: engine.segments(synth.silence(2.0)))
    if failed:
        return failed
    reasons = [f"silence gave segments {_segments_json(found)}"] if found else []
    _latency(reasons, latency, limits)
    return ClipResult(name, None, _segments_json(found), None, latency, not reasons, "; ".join(reasons))
