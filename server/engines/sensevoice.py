"""SenseVoice: funasr-onnx's ``SenseVoiceSmall``, fed waveforms.

An :class:`Engine` is one loaded SenseVoice ONNX session for one registry version. It takes
float32 waveforms (16 kHz mono), never paths: a path makes funasr-onnx pull in librosa's loader
(+180 MB, +1.7 s on first use) and touch the disk on the request path. It runs a batch of segments
in one session run (padding to the longest), which funasr-onnx's own ``__call__`` does not offer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from server.engines.base import SAMPLE_RATE, AsrEngine, EngineLoadError, Waveform, load_funasr, offsets_for
from server.engines.session import SessionConfig
from server.speech import words
from server.speech.words import Word
from server.vocab import ModelKind

__all__ = ["Engine", "EngineLoadError", "available_providers"]


class Engine(AsrEngine):
    """One onnxruntime session plus the SenseVoice front end and tokenizer of one version."""

    kind: ClassVar[ModelKind] = ModelKind.SENSEVOICE
    tagged: ClassVar[bool] = True

    def __init__(self, model_dir: Path, *, model_file: str, threads: int, device: str = "cpu",
                 config: SessionConfig | None = None):
        self._model, sessions = load_funasr("SenseVoiceSmall", model_dir, model_file=model_file, threads=threads,
                                            device=device, config=config)
        self._describe_sessions(sessions, model_file, device)

    @property
    def gives_timestamps(self) -> bool:
        return True  # every SenseVoice graph: the times come from its CTC path

    def transcribe_batch(
        self, waveforms: list[Waveform], *, language: str = "auto", use_itn: bool = False, hotwords: str = ""
    ) -> list[str]:
        """Raw output for several waveforms in one session run (padding to the longest), tags
        included (``<|en|><|NEUTRAL|>...``). SenseVoice takes no hotwords: sending some raises."""
        self.refuse_hotwords(hotwords)
        return [self._decode(logits) for logits in self._ctc_logits(waveforms, language, use_itn)]

    def transcribe_batch_with_words(
        self, waveforms: list[Waveform], *, language: str = "auto", use_itn: bool = False, hotwords: str = "",
        offsets: Sequence[float] | None = None,
    ) -> list[tuple[str, list[Word]]]:
        """The raw text of :meth:`transcribe_batch` (tags included) and its words, timed from the
        CTC path the text comes from: the 4 query frames carry no time, each later frame 60 ms
        (see :mod:`server.speech.words`). One session run for the batch, as there."""
        self.refuse_hotwords(hotwords)
        starts = offsets_for(waveforms, offsets)
        pieces = _Pieces(self._model.tokenizer.sp)
        results = []
        for waveform, logits, offset in zip(waveforms, self._ctc_logits(waveforms, language, use_itn), starts,
                                            strict=True):
            tokens = words.ctc_timed_tokens(logits, pieces, blank_id=self._model.blank_id)
            duration = len(waveform) / SAMPLE_RATE
            results.append((self._decode(logits), words.finish_words(words.sentencepiece_words(tokens),
                                                                     duration=duration, offset=offset)))
        return results

    def _ctc_logits(self, waveforms: list[Waveform], language: str, use_itn: bool) -> list[NDArray[np.float32]]:
        """Each waveform's CTC log-probs [frames, vocab], its valid frames only (4 query frames first)."""
        model = self._model
        lid = model.lid_dict[language]
        tn = model.textnorm_dict["withitn" if use_itn else "woitn"]
        feats, feats_len = model.extract_feat([np.ascontiguousarray(w, np.float32) for w in waveforms])
        batch = feats.shape[0]
        ctc_logits, out_lens = model.infer(
            feats, feats_len, np.full(batch, lid, np.int32), np.full(batch, tn, np.int32)
        )
        return [ctc_logits[b, : int(out_lens[b]), :] for b in range(batch)]

    def _decode(self, logits: NDArray[np.float32]) -> str:
        """Greedy CTC: the argmax path collapsed, blanks dropped, decoded (tags included)."""
        model = self._model
        best = np.argmax(logits, axis=-1)
        collapsed = best[np.concatenate(([True], np.diff(best) != 0))]
        return str(model.tokenizer.decode(collapsed[collapsed != model.blank_id].tolist()))


class _Pieces:
    """Token id -> SentencePiece piece, looked up as the alignment asks."""

    def __init__(self, sp: Any):
        self._sp = sp

    def __getitem__(self, token_id: int) -> str:
        return str(self._sp.IdToPiece(int(token_id)))


def available_providers() -> list[str]:
    import onnxruntime

    return list(onnxruntime.get_available_providers())
