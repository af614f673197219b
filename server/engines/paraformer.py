"""Paraformer, SeACo-Paraformer and contextual Paraformer: funasr-onnx's ``Paraformer``,
``SeacoParaformer`` and ``ContextualParaformer``, fed one waveform per call.

What funasr-onnx 0.4.3 makes this engine live with (tests/test_modelgen_kinds.py pins each):

- ``__call__`` takes one array, or a list of *paths* only, so a batch is run one waveform at a time
  (which also keeps the last token's timestamp from running into another clip's padding);
- an inference error is logged and swallowed, and that waveform's result is simply missing: the
  count of results is checked, so a failure is an error here rather than a shifted transcript;
- ``preds`` is a ``(text, words)`` tuple without timestamps and a space-joined token string with
  them: the text is always rebuilt from the tokens, so a version with timestamps answers the same
  text as one without;
- SeACo and contextual models need ``hotwords=""`` for none (``None`` raises), and raise on a
  hotword of more than 10 characters: hotwords are normalised and checked before the call;
- the front end fails on less than one 25 ms frame: such a waveform holds no words and gets "";
- with the timestamp outputs (``us_alphas``, ``us_cif_peak``: four outputs in all) ``__call__``
  answers word times only after its own post-processing, and asserts when the peaks do not number
  tokens + 1: :meth:`ParaformerEngine.transcribe_batch_with_words` runs the graph itself and times
  the tokens as FunASR does (:func:`server.speech.words.cif_token_spans`, with its fallback).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from numpy.typing import NDArray

from server.engines.base import (
    MIN_SAMPLES,
    SAMPLE_RATE,
    AsrEngine,
    EngineInferenceError,
    TimestampsUnsupportedError,
    Waveform,
    load_funasr,
    normalise_hotwords,
    offsets_for,
)
from server.engines.session import SessionConfig
from server.speech import words
from server.speech.words import Word
from server.vocab import ModelKind

TIMESTAMP_OUTPUTS = 4  # logits, token_num, us_alphas, us_cif_peak: funasr-onnx matches by count


class ParaformerEngine(AsrEngine):
    """A plain Paraformer (no hotwords). Subclasses pick the funasr-onnx class and take hotwords."""

    kind: ClassVar[ModelKind] = ModelKind.PARAFORMER
    funasr_class: ClassVar[str] = "Paraformer"  # the funasr-onnx class of the family

    def __init__(self, model_dir: Path, *, model_file: str, threads: int, device: str = "cpu",
                 config: SessionConfig | None = None):
        self._model, sessions = load_funasr(self.funasr_class, model_dir, model_file=model_file, threads=threads,
                                            device=device, config=config)
        self._describe_sessions(sessions, model_file, device)  # the backbone first, then any hotword embedder
        self._timestamps = len(sessions[0].get_output_names()) == TIMESTAMP_OUTPUTS

    @property
    def gives_timestamps(self) -> bool:
        """Whether the graph has the BiCif timestamp outputs (``us_alphas``, ``us_cif_peak``)."""
        return self._timestamps

    def _run(self, waveform: Waveform, hotwords: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._model(waveform)
        return result

    def _infer(self, feats: NDArray[np.float32], feats_len: NDArray[np.int32], hotwords: str) -> list[Any]:
        """The graph's outputs for one clip's features, as ``__call__`` runs it."""
        outputs: list[Any] = self._model.infer(feats, feats_len)
        return outputs

    def _hotwords(self, hotwords: str) -> str:
        if self.takes_hotwords:
            return normalise_hotwords(hotwords)
        self.refuse_hotwords(hotwords)
        return hotwords

    def transcribe_batch(
        self, waveforms: list[Waveform], *, language: str = "auto", use_itn: bool = False, hotwords: str = ""
    ) -> list[str]:
        """Plain text per waveform (no tags: a Paraformer has none; ``language`` and ``use_itn`` do not
        apply to it). ``hotwords``: space-separated words to bias towards, for the kinds that take them."""
        hotwords = self._hotwords(hotwords)
        texts = []
        for waveform in waveforms:
            if len(waveform) < MIN_SAMPLES:
                texts.append("")
                continue
            result = self._run(np.ascontiguousarray(waveform, np.float32), hotwords)
            if len(result) != 1:
                raise EngineInferenceError(f"{type(self._model).__name__} returned {len(result)} results for one "
                                           "waveform: its inference failed (funasr-onnx logs and drops it)")
            texts.append(_text(result[0]))
        return texts

    def transcribe_batch_with_words(
        self, waveforms: list[Waveform], *, language: str = "auto", use_itn: bool = False, hotwords: str = "",
        offsets: Sequence[float] | None = None,
    ) -> list[tuple[str, list[Word]]]:
        """The text :meth:`transcribe_batch` answers and its words, timed from the graph's CIF
        peaks. Raises :class:`TimestampsUnsupportedError` for a graph without timestamp outputs."""
        if not self._timestamps:
            raise TimestampsUnsupportedError(
                f"this {self.kind} model does not give timestamps: its graph has no us_alphas / us_cif_peak "
                "outputs (export the timestamp variant)")
        hotwords = self._hotwords(hotwords)
        results: list[tuple[str, list[Word]]] = []
        for waveform, offset in zip(waveforms, offsets_for(waveforms, offsets), strict=True):
            if len(waveform) < MIN_SAMPLES:
                results.append(("", []))
                continue
            text, tokens = self._timed_tokens(np.ascontiguousarray(waveform, np.float32), hotwords)
            found = words.finish_words(words.paraformer_words(tokens), duration=len(waveform) / SAMPLE_RATE,
                                       offset=offset)
            results.append((text, found))
        return results

    def _timed_tokens(self, waveform: Waveform, hotwords: str) -> tuple[str, list[words.TimedToken]]:
        """One clip through the graph: its text (as :func:`_text` makes it) and its timed tokens."""
        from funasr_onnx.utils.utils import ONNXRuntimeError

        model = self._model
        feats, feats_len = model.extract_feat([waveform])
        try:
            am_scores, token_nums, us_alphas, us_peaks = self._infer(feats, feats_len, hotwords)[:TIMESTAMP_OUTPUTS]
        except ONNXRuntimeError as exc:
            raise EngineInferenceError(f"{type(model).__name__} failed on a waveform: {exc.__cause__ or exc}") from exc
        tokens = [str(t) for t in model.decode_one(am_scores[0], int(token_nums[0]))]
        try:
            spans = words.cif_token_spans(us_peaks[0], len(tokens), us_alphas[0])
        except ValueError as exc:
            raise EngineInferenceError(f"{type(model).__name__} timestamps: {exc}") from exc
        timed = [words.TimedToken(tok, start, end) for tok, (start, end) in zip(tokens, spans, strict=True)]
        return _text({"raw_tokens": tokens}), timed


class SeacoParaformerEngine(ParaformerEngine):
    kind: ClassVar[ModelKind] = ModelKind.SEACO_PARAFORMER
    funasr_class: ClassVar[str] = "SeacoParaformer"

    def _run(self, waveform: Waveform, hotwords: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._model(waveform, hotwords=hotwords)
        return result

    def _infer(self, feats: NDArray[np.float32], feats_len: NDArray[np.int32], hotwords: str) -> list[Any]:
        """The backbone's outputs, biased by the hotwords' embeddings exactly as funasr-onnx 0.4.3's
        ``ContextualParaformer.__call__`` computes them (one clip)."""
        model = self._model
        ids, lengths = model.proc_hotword(hotwords)
        [embedded] = model.eb_infer(ids, lengths)
        bias = embedded.transpose(1, 0, 2)[np.arange(len(ids)), lengths.tolist()]  # [H+1, D]: each word's last state
        outputs: list[Any] = model.bb_infer(feats, feats_len, bias[np.newaxis])
        return outputs


class ContextualParaformerEngine(SeacoParaformerEngine):
    kind: ClassVar[ModelKind] = ModelKind.CONTEXTUAL_PARAFORMER
    funasr_class: ClassVar[str] = "ContextualParaformer"


def _text(item: dict[str, Any]) -> str:
    """The transcript of one result, whichever shape funasr-onnx gave it."""
    from funasr_onnx.utils.postprocess_utils import sentence_postprocess

    tokens = item.get("raw_tokens")
    if tokens is not None:  # with timestamps: preds is the tokens joined by spaces ("你 好")
        return str(sentence_postprocess(list(tokens))[0]) if tokens else ""
    preds = item["preds"]
    return str(preds[0] if isinstance(preds, tuple) else preds)


ENGINES: dict[ModelKind, type[ParaformerEngine]] = {
    ModelKind.PARAFORMER: ParaformerEngine,
    ModelKind.SEACO_PARAFORMER: SeacoParaformerEngine,
    ModelKind.CONTEXTUAL_PARAFORMER: ContextualParaformerEngine,
}
