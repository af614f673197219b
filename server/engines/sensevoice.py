"""The model handle: the only module that imports ``funasr_onnx`` or ``onnxruntime``.

An :class:`Engine` is one loaded SenseVoice ONNX session for one registry version. It takes
float32 waveforms (16 kHz mono), never paths: a path makes funasr-onnx pull in librosa's loader
(+180 MB, +1.7 s on first use) and touch the disk on the request path.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from numpy.typing import NDArray


class EngineLoadError(Exception):
    """The version's files could not be turned into a working session."""


class Engine:
    """One onnxruntime session plus the SenseVoice front end and tokenizer of one version."""

    def __init__(self, model_dir: Path, *, model_file: str, threads: int, device: str = "cpu"):
        import onnxruntime
        from funasr_onnx import SenseVoiceSmall
        from funasr_onnx.utils.frontend import load_cmvn

        # funasr-onnx caches am.mvn by path string; versions live at unique immutable paths, but a
        # version removed and re-added under the same name must not reuse the old statistics.
        load_cmvn.cache_clear()
        device_id = "-1" if device == "cpu" else (device.split(":", 1)[1] if ":" in device else "0")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # CUDA fallback is reported below
                self._model = SenseVoiceSmall(
                    model_dir=str(model_dir),
                    quantize=model_file == "model_quant.onnx",
                    intra_op_num_threads=threads,
                    device_id=device_id,
                )
        except Exception as exc:  # funasr-onnx and onnxruntime raise many unrelated types
            raise EngineLoadError(f"{type(exc).__name__}: {exc}") from exc
        providers = self._model.ort_infer.session.get_providers()
        self.model_file = model_file
        self.providers = providers
        self.device = device if device != "cpu" and "CUDAExecutionProvider" in providers else "cpu"
        self.onnxruntime_version = onnxruntime.__version__
        meta = self._model.ort_infer.session.get_modelmeta().custom_metadata_map
        self.metadata: dict[str, str] = dict(meta)

    def transcribe(self, waveform: NDArray[np.float32], *, language: str = "auto", use_itn: bool = False) -> str:
        """Raw SenseVoice output for one waveform, tags included (``<|en|><|NEUTRAL|>...``)."""
        return self.transcribe_batch([waveform], language=language, use_itn=use_itn)[0]

    def transcribe_batch(
        self, waveforms: list[NDArray[np.float32]], *, language: str = "auto", use_itn: bool = False
    ) -> list[str]:
        """Raw output for several waveforms in one session run (padding to the longest)."""
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

    def close(self) -> None:
        """Drop the session so its memory can be given back; the engine is unusable afterwards."""
        self.__dict__.pop("_model", None)

    @property
    def closed(self) -> bool:
        return "_model" not in self.__dict__


def available_providers() -> list[str]:
    import onnxruntime

    return list(onnxruntime.get_available_providers())
