"""Word timings: token-level times turned into words, for both token styles the engines emit.

Two sources of token times, both ported from FunASR's own reference code (not from funasr-onnx):

- **CTC** (SenseVoice, ``funasr/models/sense_voice/model.py`` with ``output_timestamp``): the first
  :data:`SENSEVOICE_PREFIX_FRAMES` output frames answer the language, event, emotion and text-norm
  queries and carry no time; every later frame covers 60 ms (LFR: 6 input frames of 10 ms). A
  token's start is the first frame of its run in the best path and its end the frame after the run
  (both moved back half a frame, 30 ms, as FunASR does); blank frames between runs are silence.
  FunASR re-aligns the decoded tokens with a Viterbi forced alignment; for the greedy tokens that is
  the greedy path itself (that path is a valid alignment of those tokens and the best path overall),
  so :func:`ctc_token_runs` reads the runs straight off the argmax path.
- **CIF peaks** (Paraformer graphs with timestamps, ``funasr/utils/timestamp_tools.py``,
  ``ts_prediction_lfr6_standard``): ``us_cif_peak`` fires (>= 1 - 1e-4) where each token starts,
  once more after the last one, on frames upsampled 3 times (20 ms each), shifted by -1.5 frames.
  A token lasts until the next peak, at most 12 frames (240 ms; the rest is silence); the last one,
  unless cut so, runs half way into any trailing silence. When the peaks do not number tokens + 1,
  they are redrawn from ``us_alphas`` scaled to that sum (FunASR's fallback; funasr-onnx 0.4.3
  asserts instead, and keeps the older limit of 30 frames).

Then words: SentencePiece pieces (``▁`` starts a word) by :func:`sentencepiece_words`, Paraformer's
character / ``xx@@`` tokens by :func:`paraformer_words`; :func:`finish_words` clamps them into the
audio, removes overlaps and adds a segment's offset. Times are seconds, floats.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np
from numpy.typing import ArrayLike, NDArray

SENSEVOICE_PREFIX_FRAMES = 4  # language, event, emotion, text-norm queries: no time
CTC_FRAME_S = 0.06  # one SenseVoice output frame: LFR n=6 input frames of 10 ms
CTC_SHIFT_S = 0.03  # FunASR moves CTC times back half a frame
CIF_FRAME_S = 0.02  # one upsampled Paraformer timestamp frame: 60 ms / 3
CIF_SHIFT_FRAMES = -1.5  # FunASR's force_time_shift
CIF_MAX_TOKEN_FRAMES = 12  # FunASR's MAX_TOKEN_DURATION (funasr-onnx 0.4.3 still has 30)
CIF_EDGE_FRAMES = 5  # FunASR's START_END_THRESHOLD
CIF_FIRE = 1.0 - 1e-4
WORD_MARK = "\u2581"  # SentencePiece's "▁": the piece starts a word
JOINER = "@@"  # Paraformer: this piece continues into the next one
TAG_RE = re.compile(r"^<\|[^|<>]*\|>$")  # a SenseVoice tag piece (<|en|>, <|HAPPY|>, ...)
PARAFORMER_SPECIALS = frozenset({"<s>", "</s>", "<unk>", "<blank>"})


@dataclass(frozen=True, slots=True)
class Word:
    word: str
    start: float  # seconds from the start of the audio (plus the caller's offset)
    end: float


class TimedToken(NamedTuple):
    """One token of the model's output with its time span in seconds."""

    token: str
    start: float
    end: float


class PieceLookup(Protocol):
    """Token id -> piece: a list of pieces, a dict, or a tokenizer's lookup."""

    def __getitem__(self, token_id: int, /) -> str: ...


class TokenRun(NamedTuple):
    """A run of one token id in a CTC path: frames ``start`` (inclusive) to ``end`` (exclusive),
    counted from the first frame after the prefix queries."""

    token_id: int
    start: int
    end: int


# -- CTC (SenseVoice) ---------------------------------------------------------------------------


def ctc_token_runs(logits: ArrayLike, *, prefix_frames: int = SENSEVOICE_PREFIX_FRAMES,
                   blank_id: int = 0) -> list[TokenRun]:
    """The non-blank runs of the best (argmax) path of ``logits`` [frames, vocab], after the first
    ``prefix_frames`` frames. Equal neighbouring frames are one token; a blank separates tokens."""
    scores = np.asarray(logits)
    if scores.ndim != 2:
        raise ValueError(f"logits must be [frames, vocab], not of shape {scores.shape}")
    path = np.argmax(scores[prefix_frames:], axis=-1) if scores.shape[0] > prefix_frames else np.zeros(0, np.int64)
    return path_runs(path, blank_id=blank_id)


def path_runs(path: ArrayLike, *, blank_id: int = 0) -> list[TokenRun]:
    """The non-blank runs of a CTC path of token ids (frame 0 is the first timed frame)."""
    ids = np.asarray(path, dtype=np.int64).reshape(-1)
    if ids.size == 0:
        return []
    starts = np.flatnonzero(np.concatenate(([True], ids[1:] != ids[:-1])))
    ends = np.append(starts[1:], ids.size)
    return [TokenRun(int(ids[s]), int(s), int(e)) for s, e in zip(starts, ends, strict=True) if ids[s] != blank_id]


def ctc_run_seconds(run: TokenRun, timed_frames: int, *, frame_s: float = CTC_FRAME_S,
                    shift_s: float = CTC_SHIFT_S) -> tuple[float, float]:
    """A run's (start, end) in seconds as FunASR gives them: frame times moved back ``shift_s``,
    never before 0 nor after the last timed frame (``timed_frames`` frames after the prefix)."""
    last = max(timed_frames * frame_s - shift_s, 0.0)
    start = min(max(run.start * frame_s - shift_s, 0.0), last)
    end = min(max(run.end * frame_s - shift_s, start), last)
    return start, end


def ctc_timed_tokens(logits: ArrayLike, pieces: PieceLookup, *,
                     prefix_frames: int = SENSEVOICE_PREFIX_FRAMES, blank_id: int = 0) -> list[TimedToken]:
    """The tokens of the best path of one clip's ``logits`` [frames, vocab] (its valid frames only),
    with their times. ``pieces`` maps a token id to its piece (a list indexed by id, or a dict)."""
    scores = np.asarray(logits)
    timed_frames = max(scores.shape[0] - prefix_frames, 0)
    return [TimedToken(pieces[run.token_id], *ctc_run_seconds(run, timed_frames))
            for run in ctc_token_runs(scores, prefix_frames=prefix_frames, blank_id=blank_id)]


# -- CIF peaks (Paraformer) ---------------------------------------------------------------------


def cif_token_spans(us_peaks: ArrayLike, n_tokens: int, us_alphas: ArrayLike | None = None, *,
                    frame_s: float = CIF_FRAME_S, shift_frames: float = CIF_SHIFT_FRAMES,
                    max_token_frames: int = CIF_MAX_TOKEN_FRAMES,
                    edge_frames: int = CIF_EDGE_FRAMES) -> list[tuple[float, float]]:
    """(start, end) in seconds for each of ``n_tokens`` tokens (``</s>`` excluded) from one clip's
    upsampled CIF peaks (and weights, for the fallback when the peaks do not number tokens + 1)."""
    if n_tokens <= 0:
        return []
    peaks = np.asarray(us_peaks, dtype=np.float64).reshape(-1)
    fires = np.flatnonzero(peaks >= CIF_FIRE)
    if fires.size != n_tokens + 1 and us_alphas is not None:
        fires = _refire(np.asarray(us_alphas, dtype=np.float64).reshape(-1), n_tokens + 1)
    if fires.size < n_tokens + 1:
        raise ValueError(f"{fires.size} CIF peaks for {n_tokens} tokens: expected {n_tokens + 1}")
    place = fires[: n_tokens + 1].astype(np.float64) + shift_frames
    num_frames = peaks.size
    spans: list[list[float]] = []
    cut = False  # whether the last token was cut at max_token_frames (the rest is silence)
    for i in range(n_tokens):
        begin, nxt = float(place[i]), float(place[i + 1])
        cut = 0 <= max_token_frames < nxt - begin
        spans.append([begin, begin + max_token_frames if cut else nxt])
    if not cut:  # the last token ends half way into trailing silence, or at the last frame
        tail = float(place[-1])
        spans[-1][1] = (num_frames + tail) / 2 if num_frames - tail > edge_frames else float(num_frames)
    return [(max(b, 0.0) * frame_s, max(e, 0.0) * frame_s) for b, e in spans]


def _refire(alphas: NDArray[np.float64], fires: int) -> NDArray[np.int64]:
    """Integrate-and-fire over ``alphas`` scaled to sum to ``fires``: the frames where it fires."""
    total = float(alphas.sum())
    if total <= 0:
        return np.zeros(0, np.int64)
    scaled = alphas * (fires / total)
    places = []
    integrate = 0.0
    for t, alpha in enumerate(scaled):
        integrate += float(alpha)
        if integrate >= CIF_FIRE:
            places.append(t)
            integrate -= CIF_FIRE
    return np.asarray(places, dtype=np.int64)


# -- tokens to words ----------------------------------------------------------------------------


def is_cjk(ch: str) -> bool:
    """A character written without spaces between words: Han ideographs and Japanese kana."""
    o = ord(ch)
    return (0x4E00 <= o <= 0x9FFF or 0x3400 <= o <= 0x4DBF or 0xF900 <= o <= 0xFAFF or 0x3040 <= o <= 0x30FF
            or 0x20000 <= o <= 0x2FA1F)


def _has_word_chars(text: str) -> bool:
    return any(ch.isalnum() for ch in text)


class _Words:
    """Words being built: each is [text, start, end, pieces]."""

    def __init__(self) -> None:
        self.items: list[tuple[str, float, float, int]] = []

    def new(self, text: str, start: float, end: float) -> None:
        self.items.append((text, start, end, 1))

    def extend(self, text: str, end: float) -> None:
        word, start, _, pieces = self.items[-1]
        self.items[-1] = (word + text, start, end, pieces + 1)

    def result(self) -> list[Word]:
        return [Word(text, start, end) for text, start, end, _ in self.items if text]


def sentencepiece_words(tokens: Iterable[TimedToken]) -> list[Word]:
    """Words from SentencePiece pieces (SenseVoice). A piece starting with ``▁`` starts a word
    (a lone ``▁`` makes the next piece start one); a piece of punctuation only joins the word before
    it; a piece with CJK characters is a word of its own, as is a piece after one (no spaces there);
    any other piece continues the word. Tag pieces (``<|en|>``) are not words and end the one before."""
    words = _Words()
    open_word = False  # the last word may be continued
    after_cjk = False
    pending_start = False  # a lone ▁ was seen
    for tok in tokens:
        piece = tok.token
        if TAG_RE.match(piece):
            open_word = after_cjk = pending_start = False
            continue
        starts = piece.startswith(WORD_MARK) or pending_start
        text = piece.replace(WORD_MARK, "")
        if not text:
            pending_start = True
            continue
        pending_start = False
        if starts or not open_word:
            words.new(text, tok.start, tok.end)
        elif not _has_word_chars(text):
            words.extend(text, tok.end)  # punctuation sticks to the word before it
        elif after_cjk or any(is_cjk(ch) for ch in text):
            words.new(text, tok.start, tok.end)
        else:
            words.extend(text, tok.end)
        open_word = True
        after_cjk = is_cjk(text[-1]) or (after_cjk and not _has_word_chars(text))
    return words.result()


def paraformer_words(tokens: Iterable[TimedToken]) -> list[Word]:
    """Words from Paraformer tokens, as funasr-onnx's ``sentence_postprocess`` forms them: a CJK
    character (or digit) is a word; ``xx@@`` joins the next piece; any other token ends its word;
    ``<s>``, ``</s>`` and ``<unk>`` are dropped; two or more one-letter words in a row are one
    upper-case acronym ("a b c" -> "ABC"), as funasr-onnx writes them in the text."""
    words = _Words()
    joining = False  # the last token ended in @@
    for tok in tokens:
        piece = tok.token.strip()
        if not piece or piece in PARAFORMER_SPECIALS:
            continue
        cont = piece.endswith(JOINER)
        text = piece[: -len(JOINER)] if cont else piece
        if any(is_cjk(ch) for ch in text) or text.isdigit():
            words.new(text, tok.start, tok.end)  # a word of its own; it ends any open pieces
            joining = False
        elif joining:
            words.extend(text, tok.end)
            joining = cont
        else:
            words.new(text, tok.start, tok.end)
            joining = cont
    return _acronyms(words.items)


def _acronyms(items: list[tuple[str, float, float, int]]) -> list[Word]:
    """Runs of two or more single-letter, single-token Latin words merged into one upper-case word."""
    out: list[Word] = []
    run: list[tuple[str, float, float, int]] = []

    def close() -> None:
        if len(run) >= 2:
            out.append(Word("".join(t for t, *_ in run).upper(), run[0][1], run[-1][2]))
        else:
            out.extend(Word(t, s, e) for t, s, e, _ in run)
        run.clear()

    for item in items:
        text, start, end, pieces = item
        if len(text) == 1 and text.isascii() and text.isalpha() and pieces == 1:
            run.append(item)
            continue
        close()
        if text:
            out.append(Word(text, start, end))
    close()
    return out


def finish_words(words: Iterable[Word], *, duration: float, offset: float = 0.0) -> list[Word]:
    """Words in order, inside ``[0, duration]``, none starting before the one before it ends, then
    shifted by ``offset`` (the start of the segment they came from), to the millisecond."""
    low, high = offset, offset + max(duration, 0.0)
    out: list[Word] = []
    floor = low
    for w in words:  # rounding and clamping keep the order: both never decrease
        start = min(max(round(w.start + offset, 3), floor), high)
        end = min(max(round(w.end + offset, 3), start), high)
        out.append(Word(w.word, start, end))
        floor = end
    return out
