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
- the front end fails on less than one 25 ms frame: such a waveform holds no words and gets "".
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from server.engines.base import (
    MIN_SAMPLES,
    AsrEngine,
    EngineInferenceError,
    EngineLoadError,
    Waveform,
    device_id,
    normalise_hotwords,
)
from server.vocab import ModelKind


class ParaformerEngine(AsrEngine):
    """A plain Paraformer (no hotwords). Subclasses pick the funasr-onnx class and take hotwords."""

    kind: ClassVar[ModelKind] = ModelKind.PARAFORMER

    def __init__(self, model_dir: Path, *, model_file: str, threads: int, device: str = "cpu"):
        from funasr_onnx.utils.frontend import load_cmvn

        load_cmvn.cache_clear()  # funasr-onnx caches am.mvn by path; see the SenseVoice engine
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a CUDA fallback shows in providers
                self._model = self._load(model_dir, quantize=model_file == "model_quant.onnx", threads=threads,
                                         device=device_id(device))
        except Exception as exc:  # funasr-onnx and onnxruntime raise many unrelated types
            raise EngineLoadError(f"{type(exc).__name__}: {exc}") from exc
        self._describe_session(self._session(), model_file, device)

    def _load(self, model_dir: Path, *, quantize: bool, threads: int, device: str) -> Any:
        from funasr_onnx import Paraformer

        return Paraformer(model_dir=str(model_dir), quantize=quantize, intra_op_num_threads=threads,
                          device_id=device)

    def _session(self) -> Any:
        return self._model.ort_infer.session

    def _run(self, waveform: Waveform, hotwords: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._model(waveform)
        return result

    def transcribe_batch(
        self, waveforms: list[Waveform], *, language: str = "auto", use_itn: bool = False, hotwords: str = ""
    ) -> list[str]:
        """Plain text per waveform (no tags: a Paraformer has none; ``language`` and ``use_itn`` do not
        apply to it). ``hotwords``: space-separated words to bias towards, for the kinds that take them."""
        if self.takes_hotwords:
            hotwords = normalise_hotwords(hotwords)
        else:
            self.refuse_hotwords(hotwords)
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


class SeacoParaformerEngine(ParaformerEngine):
    kind: ClassVar[ModelKind] = ModelKind.SEACO_PARAFORMER

    def _load(self, model_dir: Path, *, quantize: bool, threads: int, device: str) -> Any:
        from funasr_onnx import SeacoParaformer

        return SeacoParaformer(model_dir=str(model_dir), quantize=quantize, intra_op_num_threads=threads,
                               device_id=device)

    def _session(self) -> Any:
        return self._model.ort_infer_bb.session

    def _run(self, waveform: Waveform, hotwords: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._model(waveform, hotwords=hotwords)
        return result


class ContextualParaformerEngine(SeacoParaformerEngine):
    kind: ClassVar[ModelKind] = ModelKind.CONTEXTUAL_PARAFORMER

    def _load(self, model_dir: Path, *, quantize: bool, threads: int, device: str) -> Any:
        from funasr_onnx import ContextualParaformer

        return ContextualParaformer(model_dir=str(model_dir), quantize=quantize, intra_op_num_threads=threads,
                                    device_id=device)


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
