"""The golden clips of a version, per kind: what ``smoke/`` holds, and what an add is given.

A version's smoke test is only as good as its goldens, so each kind keeps them in the form its
answer takes, and a golden that could never pass (audio that does not decode, segments that are no
segments) is refused at add, not found at promote time:

- speech recognition: ``smoke/x.wav`` + ``smoke/x.txt`` (the transcript)
- ``ct-punc``: ``smoke/x.in.txt`` (the text to punctuate) + ``smoke/x.txt`` (the punctuated answer)
- ``fsmn-vad``: ``smoke/x.wav`` + ``smoke/x.segments.json``: ``[[start_ms, end_ms], ...]``, or
  ``{"segments": [...], "tolerance_ms": N}`` to allow each boundary other than the gate's default
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from server.errors import RegistryError
from server.storage.manifest import PUNC_INPUT_SUFFIX, SEGMENTS_SUFFIX, SmokeClip, check_clip
from server.vocab import AUDIO_SUFFIXES, ModelKind

MAX_GOLDEN_TEXT = 100_000  # characters: a golden is a smoke test, not a corpus


def parse_segments(text: str, *, where: str = "segments") -> tuple[tuple[tuple[int, int], ...], int | None]:
    """``[[start_ms, end_ms], ...]`` or ``{"segments": [...], "tolerance_ms": N}``: the segments and
    the tolerance (None when not given); anything else raises a RegistryError naming ``where``."""
    try:
        data: Any = json.loads(text)
    except ValueError as exc:
        raise RegistryError(f"{where} is not JSON: {exc}", param="smoke_segments") from None
    tolerance = None
    if isinstance(data, dict):
        tolerance = data.get("tolerance_ms")
        if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, int) or tolerance < 0):
            raise RegistryError(f"{where}: tolerance_ms must be a whole number of ms, 0 or more",
                                param="smoke_segments")
        data = data.get("segments")
    if not isinstance(data, list):
        raise RegistryError(f"{where} must be a list of [start_ms, end_ms] pairs", param="smoke_segments")
    segments = []
    for pair in data:
        if (not isinstance(pair, list) or len(pair) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair)
                or not 0 <= pair[0] < pair[1]):
            raise RegistryError(f"{where}: {pair!r} is not a [start_ms, end_ms] pair with 0 <= start < end",
                                param="smoke_segments")
        segments.append((pair[0], pair[1]))
    return tuple(segments), tolerance


def _read_text(path: Path, what: str) -> str:
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise RegistryError(f"smoke {what} {path.name} cannot be read as UTF-8 text: {exc}",
                            param="smoke_text") from None
    if len(text) > MAX_GOLDEN_TEXT:
        raise RegistryError(f"smoke {what} {path.name} is longer than {MAX_GOLDEN_TEXT} characters",
                            param="smoke_text")
    return text


def write_given(smoke_dir: Path, index: int, source: Path, expected: str, kind: ModelKind) -> None:
    """A golden given at add time, written into ``smoke/`` in its kind's form: ``source`` is the
    recording (the text file to punctuate, for ct-punc); ``expected`` the transcript, the punctuated
    text, or (fsmn-vad) the segments as JSON."""
    smoke_dir.mkdir(exist_ok=True)
    stem = smoke_dir / f"given-{index}"
    if kind == ModelKind.CT_PUNC:
        shutil.copyfile(source, stem.with_name(stem.name + PUNC_INPUT_SUFFIX))
        stem.with_suffix(".txt").write_text(expected.strip() + "\n", encoding="utf-8")
        return
    audio = stem.with_suffix(Path(source).suffix or ".wav")
    shutil.copyfile(source, audio)
    if kind == ModelKind.FSMN_VAD:
        parse_segments(expected, where=f"the segments given for {Path(source).name}")
        stem.with_name(stem.name + SEGMENTS_SUFFIX).write_text(expected.strip() + "\n", encoding="utf-8")
    else:
        audio.with_suffix(".txt").write_text(expected.strip() + "\n", encoding="utf-8")


def scan(smoke_dir: Path, kind: ModelKind) -> list[SmokeClip]:
    """The goldens of a version folder's ``smoke/`` in ``kind``'s form, checked, in name order."""
    if not smoke_dir.is_dir():
        return []
    clips = []
    for path in sorted(smoke_dir.iterdir()):
        name = path.name
        if kind == ModelKind.CT_PUNC:
            answer = path.parent / (name[: -len(PUNC_INPUT_SUFFIX)] + ".txt")
            if name.endswith(PUNC_INPUT_SUFFIX) and answer.is_file():
                if not _read_text(path, "input"):
                    raise RegistryError(f"smoke input {name} is empty: give the text to punctuate",
                                        param="smoke_text_in")
                clips.append(SmokeClip(audio=f"smoke/{name}", text=_read_text(answer, "text")))
            continue
        if path.suffix.lower() not in AUDIO_SUFFIXES:
            continue
        if kind == ModelKind.FSMN_VAD:
            expected = path.with_name(path.stem + SEGMENTS_SUFFIX)
            if expected.is_file():
                check_clip(path)
                segments, tolerance = parse_segments(_read_text(expected, "segments"), where=expected.name)
                clips.append(SmokeClip(audio=f"smoke/{name}", text="", segments=segments, tolerance_ms=tolerance))
        elif path.with_suffix(".txt").is_file():
            check_clip(path)
            clips.append(SmokeClip(audio=f"smoke/{name}", text=_read_text(path.with_suffix(".txt"), "text")))
    return clips
