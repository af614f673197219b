"""CT-Transformer punctuation: funasr-onnx's ``CT_Transformer``, text in, punctuated text out.

funasr-onnx crashes on empty text (an IndexError deep in its post-processing), so empty or blank
text is answered here without asking it. Loading a folder with a ``jieba_usr_dict`` leaves that
file open (a ResourceWarning when it is collected): silenced around the load only.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import ClassVar

from server.engines.base import EngineLoadError, PuncEngine, device_id
from server.vocab import ModelKind


class CtPuncEngine(PuncEngine):
    kind: ClassVar[ModelKind] = ModelKind.CT_PUNC

    def __init__(self, model_dir: Path, *, model_file: str, threads: int, device: str = "cpu"):
        from funasr_onnx import CT_Transformer

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a CUDA fallback shows in providers
                warnings.simplefilter("ignore", ResourceWarning)  # jieba.load_userdict leaves its file open
                self._model = CT_Transformer(model_dir=str(model_dir), quantize=model_file == "model_quant.onnx",
                                             intra_op_num_threads=threads, device_id=device_id(device))
        except Exception as exc:  # funasr-onnx and onnxruntime raise many unrelated types
            raise EngineLoadError(f"{type(exc).__name__}: {exc}") from exc
        self._describe_session(self._model.ort_infer.session, model_file, device)

    def punctuate(self, text: str) -> str:
        """``text`` with punctuation; funasr-onnx's rules apply (the answer ends in a full stop or a
        question mark; Latin words are joined by spaces, CJK characters are not)."""
        text = " ".join(text.split())
        if not text:
            return ""
        return str(self._model(text)[0])
