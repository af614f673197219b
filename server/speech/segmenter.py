"""Long audio cut into model-sized pieces at pauses, so no word is split between two segments.

SenseVoice attends over the whole input; past ~30 s its memory and time grow faster than the audio
and its output gets worse. Audio longer than the window is cut where it is quietest: each cut lies
inside the longest pause (frame RMS below a threshold derived from the file's own levels) that
the window offers, and only falls back to a hard cut at the window when there is no pause at all.
Each piece is then trimmed to its voiced part (plus a little context) for timing and inference.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np
from numpy.typing import NDArray

SAMPLE_RATE = 16_000
FRAME_S = 0.02  # RMS frames: short enough to find the gap between words
MIN_PAUSE_S = 0.15  # a quiet stretch shorter than this is a stop consonant, not a pause
MIN_SEGMENT_S = 1.0  # no cut leaves a piece shorter than this (it would be too short to decode)
CONTEXT_S = 0.25  # audio kept either side of the voiced part of a piece
FLOOR_DB = -100.0  # digital silence is clamped here so percentiles stay finite


@dataclass(frozen=True)
class Span:
    """Samples ``[start, end)`` of the decoded 16 kHz audio."""

    start: int
    end: int

    @property
    def start_s(self) -> float:
        return self.start / SAMPLE_RATE

    @property
    def end_s(self) -> float:
        return self.end / SAMPLE_RATE

    def __len__(self) -> int:
        return self.end - self.start


def frame_db(samples: NDArray[np.float32], frame: int = int(FRAME_S * SAMPLE_RATE)) -> NDArray[np.float32]:
    """RMS level of each whole frame in dBFS (a partial last frame is ignored)."""
    count = len(samples) // frame
    if count == 0:
        return np.zeros(0, np.float32)
    frames = samples[: count * frame].astype(np.float32, copy=False).reshape(count, frame)
    # einsum sums the squares frame by frame without a full-length squared copy of the file
    rms: NDArray[np.float32] = np.sqrt(np.einsum("ij,ij->i", frames, frames) / frame)
    db: NDArray[np.float32] = np.maximum(20.0 * np.log10(np.maximum(rms, 1e-12)), FLOOR_DB)
    return db.astype(np.float32)


def quiet_threshold(db: NDArray[np.float32]) -> float:
    """Below this a frame is a pause: near the file's noise floor, and well under its speech."""
    floor = float(np.percentile(db, 5))
    active = db[db > floor + 10.0]  # speech level from the frames above the floor, however few
    loud = float(np.percentile(active if active.size else db, 95))
    # between the noise floor (+10 dB) and 40 dB under speech, but never within 15 dB of speech,
    # so continuous speech (whose quietest frames sit close to its loudest) has no "pauses"
    return min(max(floor + 10.0, loud - 40.0), loud - 15.0)


def split(samples: NDArray[np.float32], *, window_s: float) -> list[Span]:
    """Cut ``samples`` into voiced spans of at most ``window_s`` seconds each, in order.

    Audio no longer than the window is one span covering all of it, untrimmed.
    """
    total = len(samples)
    window = int(window_s * SAMPLE_RATE)
    if total <= window:
        return [Span(0, total)]
    frame = int(FRAME_S * SAMPLE_RATE)
    db = frame_db(samples, frame)
    quiet = db < quiet_threshold(db)
    cuts = [0]
    while total - cuts[-1] > window:
        cuts.append(_next_cut(quiet, db, cuts[-1], total, window, frame))
    cuts.append(total)
    return [_trim(Span(a, b), quiet, frame) for a, b in pairwise(cuts)]


def _next_cut(quiet: NDArray[np.bool_], db: NDArray[np.float32], start: int, total: int, window: int,
              frame: int) -> int:
    """Middle of the longest (then quietest) pause in the window; a hard cut if it has none."""
    min_segment = int(MIN_SEGMENT_S * SAMPLE_RATE)
    latest = min(start + window, total - min_segment)
    first = -(-(start + min_segment) // frame)  # first whole frame after the minimum piece
    last = latest // frame  # frames [first, last) lie inside the allowed cut range
    best: tuple[int, float, int] | None = None
    best_cut = latest
    run_start: int | None = None
    for i in range(first, last + 1):
        if i < last and i < len(quiet) and quiet[i]:
            if run_start is None:
                run_start = i
            continue
        if run_start is not None:
            length = i - run_start
            if length * FRAME_S >= MIN_PAUSE_S:
                key = (length, -float(np.mean(db[run_start:i])), run_start)
                if best is None or key > best:
                    best, best_cut = key, (run_start + i) * frame // 2
            run_start = None
    return max(start + min_segment, min(best_cut, latest))


def _trim(span: Span, quiet: NDArray[np.bool_], frame: int) -> Span:
    """The voiced part of a piece plus some context; an all-quiet piece is kept whole."""
    lo, hi = span.start // frame, min(len(quiet), -(-span.end // frame))
    voiced = np.flatnonzero(~quiet[lo:hi])
    if voiced.size == 0:
        return span
    context = int(CONTEXT_S * SAMPLE_RATE)
    start = max(span.start, (lo + int(voiced[0])) * frame - context)
    end = min(span.end, (lo + int(voiced[-1]) + 1) * frame + context)
    return Span(start, end)


def from_segments(segments_ms: list[tuple[int, int]], samples: NDArray[np.float32], *, window_s: float) -> list[Span]:
    """A voice activity detector's segments as spans for the model: neighbours merged while they
    fit the window (fewer, longer pieces give the model context), a segment longer than the window
    cut at its own pauses. Bounds are clipped to the audio; no segment, no span."""
    total, window = len(samples), int(window_s * SAMPLE_RATE)
    pieces = [Span(max(0, a * SAMPLE_RATE // 1000), min(total, b * SAMPLE_RATE // 1000)) for a, b in segments_ms]
    merged: list[Span] = []
    for piece in (p for p in pieces if p.end > p.start):
        if merged and piece.end - merged[-1].start <= window:
            merged[-1] = Span(merged[-1].start, max(merged[-1].end, piece.end))
        else:
            merged.append(piece)
    spans: list[Span] = []
    for span in merged:
        if span.end - span.start <= window:
            spans.append(span)
        else:
            spans += [Span(span.start + part.start, span.start + part.end)
                      for part in split(samples[span.start:span.end], window_s=window_s)]
    return spans


def batches(spans: list[Span], size: int) -> list[list[Span]]:
    """Consecutive groups of at most ``size`` spans, for one session run each."""
    return [spans[i : i + size] for i in range(0, len(spans), size)]
