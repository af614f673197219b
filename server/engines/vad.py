"""FSMN-VAD voice activity detection: funasr-onnx's ``Fsmn_vad``, a waveform in, speech segments out.

funasr-onnx 0.4.3 converts a one-element array to an int in its loop, which NumPy 1.25+ warns about
with a DeprecationWarning. Python ignores it outside ``__main__`` by default; the test configuration
ignores it by name (pyproject.toml). It is not silenced around the call: ``warnings.catch_warnings``
swaps process-wide state, and a model loading in another thread meanwhile would restore the filters
under the call. An inference error makes funasr-onnx return "" instead of segments: said here as an
error. Less than one 25 ms frame holds no speech and is not asked.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from server.engines.base import MIN_SAMPLES, EngineInferenceError, VadEngine, Waveform, load_funasr
from server.vocab import ModelKind


class FsmnVadEngine(VadEngine):
    kind: ClassVar[ModelKind] = ModelKind.FSMN_VAD

    def __init__(self, model_dir: Path, *, model_file: str, threads: int, device: str = "cpu"):
        self._model = load_funasr("Fsmn_vad", model_dir, model_file=model_file, threads=threads, device=device)
        self._describe_session(self._model.ort_infer.session, model_file, device)

    def segments(self, waveform: Waveform) -> list[tuple[int, int]]:
        """The speech in ``waveform`` as (start_ms, end_ms) pairs, in order."""
        if len(waveform) < MIN_SAMPLES:
            return []
        samples = np.ascontiguousarray(waveform, np.float32)
        result = self._model(samples)
        if not isinstance(result, list) or len(result) != 1:
            raise EngineInferenceError(f"Fsmn_vad returned {result!r} for one waveform: its inference failed "
                                       "(funasr-onnx logs and drops it)")
        return [(int(start), int(end)) for start, end in result[0]]
