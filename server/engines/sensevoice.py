"""SenseVoice: funasr-onnx's ``SenseVoiceSmall``, fed waveforms.

An :class:`Engine` is one loaded SenseVoice ONNX session for one registry version. It takes
float32 waveforms (16 kHz mono), never paths: a path makes funasr-onnx pull in librosa's loader
(+180 MB, +1.7 s on first use) and touch the disk on the request path. It runs a batch of segments
in one session run (padding to the longest), which funasr-onnx's own ``__call__`` does not offer.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import ClassVar

import numpy as np

from server.engines.base import AsrEngine, EngineLoadError, Waveform, device_id
from server.vocab import ModelKind

__all__ = ["Engine", "EngineLoadError", "available_providers"]


class Engine(AsrEngine):
    """One onnxruntime session plus the SenseVoice front end and tokenizer of one version."""

    kind: ClassVar[ModelKind] = ModelKind.SENSEVOICE
    tagged: ClassVar[bool] = True

    def __init__(self, model_dir: Path, *, model_file: str, threads: int, device: str = "cpu"):
        from funasr_onnx import SenseVoiceSmall
        from funasr_onnx.utils.frontend import load_cmvn

        # funasr-onnx caches am.mvn by path string; versions live at unique immutable paths, but a
        # version removed and re-added under the same name must not reuse the old statistics.
        load_cmvn.cache_clear()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # CUDA fallback is reported below
                self._model = SenseVoiceSmall(
                    model_dir=str(model_dir),
                    quantize=model_file == "model_quant.onnx",
                    intra_op_num_threads=threads,
                    device_id=device_id(device),
                )
        except Exception as exc:  # funasr-onnx and onnxruntime raise many unrelated types
            raise EngineLoadError(f"{type(exc).__name__}: {exc}") from exc
        self._describe_session(self._model.ort_infer.session, model_file, device)

    def transcribe_batch(
        self, waveforms: list[Waveform], *, language: str = "auto", use_itn: bool = False, hotwords: str = ""
    ) -> list[str]:
        """Raw output for several waveforms in one session run (padding to the longest), tags
        included (``<|en|><|NEUTRAL|>...``). SenseVoice takes no hotwords: sending some raises."""
        self.refuse_hotwords(hotwords)
        model = self._model
        lid = model.lid_dict[language]
        tn = model.textnorm_dict["withitn" if use_itn else "woitn"]
        feats, feats_len = model.extract_feat([np.ascontiguousarray(w, np.float32) for w in waveforms])
        batch = feats.shape[0]
        ctc_logits, out_lens = model.infer(
            feats, feats_len, np.full(batch, lid, np.int32), np.full(batch, tn, np.int32)
        )
        texts = []
        for b in range(batch):
            best = np.argmax(ctc_logits[b, : int(out_lens[b]), :], axis=-1)
            collapsed = best[np.concatenate(([True], np.diff(best) != 0))]
            texts.append(model.tokenizer.decode(collapsed[collapsed != model.blank_id].tolist()))
        return texts


def available_providers() -> list[str]:
    import onnxruntime

    return list(onnxruntime.get_available_providers())
