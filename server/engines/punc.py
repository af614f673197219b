"""CT-Transformer punctuation: funasr-onnx's ``CT_Transformer``, text in, punctuated text out.

funasr-onnx crashes on empty text (an IndexError deep in its post-processing), so empty or blank
text is answered here without asking it. Loading a folder with a ``jieba_usr_dict`` leaves that
file open (a ResourceWarning when it is collected): silenced around the load only.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from server.engines.base import PuncEngine, load_funasr
from server.engines.session import SessionConfig
from server.vocab import ModelKind


class CtPuncEngine(PuncEngine):
    kind: ClassVar[ModelKind] = ModelKind.CT_PUNC

    def __init__(self, model_dir: Path, *, model_file: str, threads: int, device: str = "cpu",
                 config: SessionConfig | None = None):
        # ResourceWarning: jieba.load_userdict leaves its file open
        self._model, sessions = load_funasr("CT_Transformer", model_dir, model_file=model_file, threads=threads,
                                            device=device, config=config, quiet=(RuntimeWarning, ResourceWarning))
        self._describe_sessions(sessions, model_file, device)

    def punctuate(self, text: str) -> str:
        """``text`` with punctuation; funasr-onnx's rules apply (the answer ends in a full stop or a
        question mark; Latin words are joined by spaces, CJK characters are not)."""
        text = " ".join(text.split())
        if not text:
            return ""
        return str(self._model(text)[0])
