"""Word timestamps: the pure token -> word functions of server.speech.words, the CTC alignment of the
SenseVoice engine and the CIF-peak timing of the Paraformer engines.

The generated stand-ins gate on loudness only, and neither places its tokens where the speech is:
the SenseVoice stand-in emits its text on the frames right after the 4 query frames whatever the
audio, and the Paraformer stand-in spreads its peaks evenly from the first loud frame to the last,
pause included (both pinned below as quirks). So the "two bursts and a pause" checks run the real
engines on real features with the graph's answer redrawn over the loud frames, which tests what the
engines own: the frame rate, the 4 query frames, the -1.5 frame shift, the clamping and the words.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from server.engines.base import MIN_SAMPLES, HotwordsError, TimestampsUnsupportedError
from server.engines.paraformer import ContextualParaformerEngine, ParaformerEngine, SeacoParaformerEngine
from server.engines.sensevoice import Engine
from server.speech import richtext
from server.speech.words import (
    TimedToken,
    TokenRun,
    Word,
    cif_token_spans,
    ctc_run_seconds,
    ctc_timed_tokens,
    ctc_token_runs,
    finish_words,
    paraformer_words,
    path_runs,
    sentencepiece_words,
)
from server.testing import synth
from server.testing.onnx_build import LOUDNESS_GATE
from tests.kinds import KindFolder, kind_folder  # noqa: F401  (a fixture)

RATE = synth.SAMPLE_RATE
SV_TEXT = "the quick brown fox jumps"
PF_TEXT = "the quick brown fox"
PAUSE = (1.0, 2.0)  # where the pause of two_bursts() is, in seconds
PAUSE_SLACK_S = 0.12


def two_bursts() -> NDArray[np.float32]:
    """1 s of speech, 1 s of digital silence, 1 s of speech."""
    return np.concatenate([synth.speech_like(1.0, seed=1), synth.silence(1.0), synth.speech_like(1.0, seed=2)])


def assert_well_formed(found: Sequence[Word], *, low: float, high: float) -> None:
    """In order, without overlaps, each inside [low, high]."""
    previous = low
    for w in found:
        assert w.word
        assert previous <= w.start <= w.end <= high, (w, previous, high)
        previous = w.end


def pause_overlap(w: Word) -> float:
    return max(0.0, min(w.end, PAUSE[1]) - max(w.start, PAUSE[0]))


def loud_frames(feats: NDArray[np.float32]) -> NDArray[np.int64]:
    """The LFR frames of one clip that the stand-ins call speech (mean log-mel over the gate)."""
    return np.flatnonzero(feats[0].mean(axis=-1) > LOUDNESS_GATE)


def chunks_over(loud: NDArray[np.int64], n: int) -> list[tuple[int, int]]:
    """``n`` runs of frames [start, end) over the loud frames, each inside one loud stretch."""
    out = []
    for chunk in np.array_split(loud, n):
        gaps = np.flatnonzero(np.diff(chunk) != 1)
        stop = int(chunk[gaps[0]]) + 1 if gaps.size else int(chunk[-1]) + 1
        out.append((int(chunk[0]), stop))
    return out


# -- pure functions: CTC ------------------------------------------------------------------------


def test_path_runs_are_the_non_blank_runs() -> None:
    assert path_runs([0, 0, 5, 5, 5, 0, 7, 7, 0, 0, 7, 9]) == [
        TokenRun(5, 2, 5), TokenRun(7, 6, 8), TokenRun(7, 10, 11), TokenRun(9, 11, 12)]
    assert path_runs([]) == [] and path_runs([0, 0, 0]) == []


def hand_made_logits(path: list[int], vocab: int = 12) -> NDArray[np.float32]:
    """Log-probs whose argmax path is ``path``."""
    logits = np.full((len(path), vocab), -20.0, np.float32)
    logits[np.arange(len(path)), path] = 0.0
    return logits


def test_ctc_alignment_skips_the_query_frames_and_times_each_run() -> None:
    # 4 query frames (tags 1-4), then: blank, blank, A A A, blank, B B, blank x4, C, blank
    logits = hand_made_logits([1, 2, 3, 4, 0, 0, 5, 5, 5, 0, 6, 6, 0, 0, 0, 0, 7, 0])
    assert ctc_token_runs(logits) == [TokenRun(5, 2, 5), TokenRun(6, 6, 8), TokenRun(7, 12, 13)]
    pieces = {5: "\u2581hello", 6: "\u2581wor", 7: "ld"}
    tokens = ctc_timed_tokens(logits, pieces)
    # start = first frame x 60 ms - 30 ms, end = frame after the run x 60 ms - 30 ms
    assert [(t.token, round(t.start, 3), round(t.end, 3)) for t in tokens] == [
        ("\u2581hello", 0.09, 0.27), ("\u2581wor", 0.33, 0.45), ("ld", 0.69, 0.75)]
    words = sentencepiece_words(tokens)
    assert [w.word for w in words] == ["hello", "world"]
    assert (round(words[1].start, 3), round(words[1].end, 3)) == (0.33, 0.75)  # silence inside a word stays in it


def test_ctc_times_stay_inside_the_timed_frames() -> None:
    np.testing.assert_allclose(ctc_run_seconds(TokenRun(3, 0, 1), 10), (0.0, 0.03))  # never before 0
    start, end = ctc_run_seconds(TokenRun(3, 8, 10), 10)
    assert (round(start, 3), round(end, 3)) == (0.45, 0.57)  # the last frame ends at 10 x 60 - 30 ms
    assert ctc_token_runs(hand_made_logits([1, 2, 3])) == []  # shorter than the queries: no tokens


def test_hand_made_two_bursts_align_inside_the_speech() -> None:
    """A 3 s clip (speech, 1 s pause, speech): tokens emitted over the speech frames only keep
    every word out of the pause."""
    frames = 50  # 3 s of LFR frames
    path = [1, 2, 3, 4] + [0] * frames
    for token, (start, end) in zip([5, 6, 7, 8], [(1, 6), (8, 15), (34, 40), (42, 48)], strict=True):
        path[4 + start : 4 + end] = [token] * (end - start)
    pieces = ["<unk>", "<|en|>", "<|NEUTRAL|>", "<|Speech|>", "<|woitn|>", "\u2581one", "\u2581two", "\u2581three",
              "\u2581four"]
    words = finish_words(sentencepiece_words(ctc_timed_tokens(hand_made_logits(path), pieces)), duration=3.0)
    assert [w.word for w in words] == ["one", "two", "three", "four"]
    assert_well_formed(words, low=0.0, high=3.0)
    assert all(pause_overlap(w) <= PAUSE_SLACK_S for w in words)


# -- pure functions: words ----------------------------------------------------------------------


def tt(*items: tuple[str, float, float]) -> list[TimedToken]:
    return [TimedToken(*item) for item in items]


def test_sentencepiece_words() -> None:
    found = sentencepiece_words(tt(
        ("<|en|>", 0, 0), ("\u2581hel", 0.0, 0.1), ("lo", 0.1, 0.2), (",", 0.2, 0.25), ("\u2581", 0.3, 0.3),
        ("world", 0.3, 0.5), ("\u2581don", 0.6, 0.7), ("'", 0.7, 0.72), ("t", 0.72, 0.8)))
    assert found == [Word("hello,", 0.0, 0.25), Word("world", 0.3, 0.5), Word("don't", 0.6, 0.8)]


def test_sentencepiece_words_cjk_pieces_are_words() -> None:
    found = sentencepiece_words(tt(
        ("\u2581你好", 0.0, 0.2), ("世界", 0.2, 0.5), ("。", 0.5, 0.55), ("abc", 0.6, 0.7), ("def", 0.7, 0.8),
        ("<|zh|>", 0.8, 0.8), ("再", 0.9, 1.0)))
    assert [(w.word, w.start, w.end) for w in found] == [
        ("你好", 0.0, 0.2), ("世界。", 0.2, 0.55), ("abcdef", 0.6, 0.8), ("再", 0.9, 1.0)]


def test_paraformer_words_cjk_joins_and_acronyms() -> None:
    found = paraformer_words(tt(
        ("<s>", 0, 0), ("语", 0.0, 0.2), ("音", 0.2, 0.4), ("vo@@", 0.5, 0.6), ("x@@", 0.6, 0.7), ("swap", 0.7, 0.9),
        ("3", 0.9, 1.0), ("a", 1.0, 1.1), ("b", 1.1, 1.2), ("c", 1.2, 1.3), ("is", 1.3, 1.4), ("a@@", 1.5, 1.6),
        ("b", 1.6, 1.7), ("x", 1.8, 1.9), ("</s>", 2, 2)))
    assert [(w.word, w.start, w.end) for w in found] == [
        ("语", 0.0, 0.2), ("音", 0.2, 0.4), ("voxswap", 0.5, 0.9), ("3", 0.9, 1.0), ("ABC", 1.0, 1.3),
        ("is", 1.3, 1.4), ("ab", 1.5, 1.7), ("x", 1.8, 1.9)]


def test_paraformer_words_a_dangling_joiner_ends_at_cjk() -> None:
    found = paraformer_words(tt(("vo@@", 0.0, 0.1), ("你", 0.1, 0.2), ("ok", 0.3, 0.4)))
    assert [w.word for w in found] == ["vo", "你", "ok"]


def test_finish_words_clamps_orders_and_offsets() -> None:
    raw = [Word("a", -0.05, 0.4), Word("b", 0.3, 0.6), Word("c", 0.9, 1.7), Word("d", 1.8, 2.0)]
    assert finish_words(raw, duration=1.5) == [
        Word("a", 0.0, 0.4), Word("b", 0.4, 0.6), Word("c", 0.9, 1.5), Word("d", 1.5, 1.5)]
    shifted = finish_words(raw, duration=1.5, offset=12.25)
    assert shifted == [Word("a", 12.25, 12.65), Word("b", 12.65, 12.85), Word("c", 13.15, 13.75),
                       Word("d", 13.75, 13.75)]
    assert_well_formed(finish_words(raw, duration=1.23456, offset=0.1), low=0.1, high=0.1 + 1.23456)


# -- pure functions: CIF peaks ------------------------------------------------------------------


def peaks_at(frames: int, places: list[int]) -> NDArray[np.float32]:
    peaks = np.zeros(frames, np.float32)
    peaks[places] = 1.0
    return peaks


def test_cif_spans_follow_funasr() -> None:
    # fires at 10, 20, 40 -> 8.5, 18.5, 38.5 after the -1.5 shift; 20 ms a frame
    spans = cif_token_spans(peaks_at(60, [10, 20, 40]), 2)
    np.testing.assert_allclose(spans, [(0.17, 0.37), (0.37, 0.61)])  # the second is cut at 12 frames
    # not cut: the last token runs half way into trailing silence, or to the end when there is little
    np.testing.assert_allclose(cif_token_spans(peaks_at(60, [10, 20, 30]), 2)[-1], (0.37, (60 + 28.5) / 2 * 0.02))
    np.testing.assert_allclose(cif_token_spans(peaks_at(33, [10, 20, 30]), 2)[-1], (0.37, 0.66))
    np.testing.assert_allclose(cif_token_spans(peaks_at(60, [1, 5, 9]), 2)[0], (0.0, 0.07))  # never before 0
    assert cif_token_spans(np.zeros(30, np.float32), 0) == []


def test_cif_spans_redraw_the_peaks_from_the_weights_when_they_miscount() -> None:
    alphas = np.zeros(60, np.float32)
    alphas[10:40] = 0.1  # 3.0 in all: 3 fires for 2 tokens once scaled
    spans = cif_token_spans(peaks_at(60, [10, 20]), 2, alphas)
    assert len(spans) == 2 and spans[0][0] < spans[0][1] <= spans[1][0] < spans[1][1]
    with pytest.raises(ValueError, match="CIF peaks"):
        cif_token_spans(peaks_at(60, [10, 20]), 2)


# -- SenseVoice engine --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sensevoice(kind_folder: KindFolder) -> Engine:  # noqa: F811
    return Engine(kind_folder("sensevoice", text=SV_TEXT), model_file="model.onnx", threads=1)


@pytest.mark.parametrize("use_itn", [False, True])
def test_sensevoice_words_match_the_text(sensevoice: Engine, use_itn: bool) -> None:
    clip = two_bursts()
    raw, found = sensevoice.transcribe_with_words(clip, language="en", use_itn=use_itn)
    assert raw == sensevoice.transcribe(clip, language="en", use_itn=use_itn)  # tags included, unchanged
    text = richtext.parse(raw).text
    assert [w.word for w in found] == text.split()
    assert_well_formed(found, low=0.0, high=3.0)
    assert sensevoice.gives_timestamps


def test_sensevoice_batch_offsets_and_silence(sensevoice: Engine) -> None:
    clips = [two_bursts(), synth.silence(1.0), synth.speech_like(1.2, seed=4)]
    results = sensevoice.transcribe_batch_with_words(clips, offsets=[0.0, 3.0, 4.0])
    assert [raw for raw, _ in results] == sensevoice.transcribe_batch(clips)
    assert results[1][1] == []
    assert_well_formed(results[2][1], low=4.0, high=5.2)
    assert [w.word for w in results[2][1]] == SV_TEXT.split()
    with pytest.raises(ValueError, match="offsets"):
        sensevoice.transcribe_batch_with_words(clips, offsets=[0.0])
    with pytest.raises(HotwordsError):
        sensevoice.transcribe_with_words(clips[0], hotwords="voxswap")


def test_quirk_sensevoice_stand_in_emits_its_text_right_after_the_queries(sensevoice: Engine) -> None:
    """The stand-in's CTC path holds its tokens on the frames right after the 4 queries, one frame
    each, whatever the audio: behind 1 s of silence, every word still lands in that silence."""
    clip = np.concatenate([synth.silence(1.0), synth.speech_like(1.0)])
    _, found = sensevoice.transcribe_with_words(clip)
    assert len(found) == len(SV_TEXT.split())
    assert found[-1].end <= 0.06 * len(found)


def test_sensevoice_words_follow_speech_across_a_pause(sensevoice: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine on real features, with the graph's text redrawn over the loud frames (as a real
    model would emit it): no word spills into the 1 s pause by more than 120 ms."""
    model = sensevoice._model
    real_infer = model.infer

    def speech_following_infer(feats: Any, feats_len: Any, language: Any, textnorm: Any) -> tuple[Any, Any]:
        logits, lens = real_infer(feats, feats_len, language, textnorm)
        path = np.argmax(logits[0, : int(lens[0])], axis=-1)
        text_ids = [run.token_id for run in path_runs(path[4:])]
        redrawn = np.full(path.shape, 0, np.int64)
        redrawn[:4] = path[:4]
        for token, (start, end) in zip(text_ids, chunks_over(loud_frames(feats), len(text_ids)), strict=True):
            redrawn[4 + start : 4 + max(end - 1, start + 1)] = token  # a blank after each, when there is room
        out = np.full_like(logits, -20.0)
        out[0, np.arange(len(redrawn)), redrawn] = 0.0
        return out, lens

    monkeypatch.setattr(model, "infer", speech_following_infer)
    clip = two_bursts()
    raw, found = sensevoice.transcribe_with_words(clip)
    assert raw == sensevoice.transcribe(clip)
    assert [w.word for w in found] == SV_TEXT.split()
    assert_well_formed(found, low=0.0, high=3.0)
    assert all(pause_overlap(w) <= PAUSE_SLACK_S for w in found), found
    assert found[0].start <= 0.12 and found[-1].start >= PAUSE[1] - PAUSE_SLACK_S  # both bursts hold words


# -- Paraformer engines -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def paraformer(kind_folder: KindFolder) -> ParaformerEngine:  # noqa: F811
    return ParaformerEngine(kind_folder("paraformer", text=PF_TEXT, timestamps=True), model_file="model.onnx",
                            threads=1)


def test_paraformer_words_match_the_text(paraformer: ParaformerEngine) -> None:
    clip = np.concatenate([synth.silence(0.5), two_bursts(), synth.silence(0.5)])
    text, found = paraformer.transcribe_with_words(clip)
    assert text == paraformer.transcribe(clip) == PF_TEXT
    assert [w.word for w in found] == text.split()
    assert_well_formed(found, low=0.0, high=4.0)
    assert abs(found[0].start - 0.5) <= 0.12  # the first word starts where the speech does
    _, shifted = paraformer.transcribe_with_words(clip, offset=60.0)
    assert shifted == [Word(w.word, round(w.start + 60.0, 3), round(w.end + 60.0, 3)) for w in found]
    assert paraformer.transcribe_with_words(synth.silence(1.0)) == ("", [])
    assert paraformer.transcribe_with_words(synth.speech_like(0.01)) == ("", [])  # under MIN_SAMPLES
    assert len(synth.speech_like(0.01)) < MIN_SAMPLES


def test_quirk_paraformer_stand_in_spreads_its_peaks_over_the_pause(paraformer: ParaformerEngine) -> None:
    """The stand-in fires its peaks evenly from the first loud frame to the last: a word lands in
    the pause between two bursts."""
    _, found = paraformer.transcribe_with_words(two_bursts())
    assert any(pause_overlap(w) > PAUSE_SLACK_S for w in found)


def test_paraformer_words_follow_speech_across_a_pause(paraformer: ParaformerEngine,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine on real features with the peaks redrawn where each token's loud frames start (3
    upsampled frames per LFR frame, one more peak after the last): no word spills into the pause
    by more than 120 ms."""
    real_infer = paraformer._infer

    def speech_following_infer(feats: Any, feats_len: Any, hotwords: str) -> list[Any]:
        logits, token_num, _alphas, peaks = real_infer(feats, feats_len, hotwords)
        n = int(np.sum(peaks[0] >= 1.0 - 1e-4)) - 1
        runs = chunks_over(loud_frames(feats), n)
        redrawn = np.zeros_like(peaks)
        redrawn[0, [3 * start for start, _ in runs] + [3 * runs[-1][1] - 1]] = 1.0
        return [logits, token_num, redrawn, redrawn]

    monkeypatch.setattr(paraformer, "_infer", speech_following_infer)
    text, found = paraformer.transcribe_with_words(two_bursts())
    assert [w.word for w in found] == text.split() == PF_TEXT.split()
    assert_well_formed(found, low=0.0, high=3.0)
    assert all(pause_overlap(w) <= PAUSE_SLACK_S for w in found), found
    assert found[0].start <= 0.12 and found[-1].start >= PAUSE[1] - PAUSE_SLACK_S


def test_paraformer_without_timestamp_outputs_refuses(kind_folder: KindFolder) -> None:  # noqa: F811
    engine = ParaformerEngine(kind_folder("paraformer", text=PF_TEXT), model_file="model.onnx", threads=1)
    assert not engine.gives_timestamps
    with pytest.raises(TimestampsUnsupportedError, match="does not give timestamps") as caught:
        engine.transcribe_with_words(synth.speech_like(1.0))
    assert isinstance(caught.value, ValueError)  # the caller's request: a 400


HOTWORD_ENGINES: dict[str, Callable[..., ParaformerEngine]] = {
    "seaco-paraformer": SeacoParaformerEngine, "contextual-paraformer": ContextualParaformerEngine}


@pytest.mark.parametrize("kind", sorted(HOTWORD_ENGINES))
@pytest.mark.parametrize(("text", "hotwords", "expected"), [
    ("语音识别", "", ["语", "音", "识", "别"]),
    ("语音识别", "魔搭 voxswap", ["语", "音", "识", "别", "魔", "搭", "voxswap"]),
    ("call the team", "a b", ["call", "the", "team", "AB"]),
])
def test_hotword_kinds_time_the_hotwords_too(kind_folder: KindFolder, kind: str, text: str,  # noqa: F811
                                             hotwords: str, expected: list[str]) -> None:
    folder: Path = kind_folder(kind, text=text, timestamps=True)
    engine = HOTWORD_ENGINES[kind](folder, model_file="model.onnx", threads=1)
    assert engine.gives_timestamps
    clip = synth.islands([("silence", 0.5), ("speech", 2.0), ("silence", 0.5)])
    answer, found = engine.transcribe_with_words(clip, hotwords=hotwords)
    assert answer == engine.transcribe(clip, hotwords=hotwords)
    assert [w.word for w in found] == expected
    assert "".join(w.word for w in found) == answer.replace(" ", "")
    assert_well_formed(found, low=0.0, high=3.0)
