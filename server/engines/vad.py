"""FSMN-VAD voice activity detection: funasr-onnx's ``Fsmn_vad``, a waveform in, speech segments out.

funasr-onnx 0.4.3 converts a one-element array to an int in its loop, which NumPy 1.25+ warns about
with a DeprecationWarning. Python ignores it outside ``__main__`` by default; the test configuration
ignores it by name (pyproject.toml). It is not silenced around the call: ``warnings.catch_warnings``
swaps process-wide state, and a model loading in another thread meanwhile would restore the filters
under the call. An inference error makes funasr-onnx return "" instead of segments: said here as an
error. Less than one 25 ms frame holds no speech and is not asked.

Streams (:meth:`FsmnVadEngine.open_stream`) run the same ONNX session online. funasr-onnx's
``Fsmn_vad_online`` keeps its end-silence on the instance, so every session would share one; here
the engine owns only the stateless session and each :class:`VadStream` owns its front end, FSMN
caches and scorer, and passes its own end-silence on every call (the scorer takes it per call).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import yaml
from funasr_onnx.utils.e2e_vad import E2EVadModel
from funasr_onnx.utils.frontend import WavFrontendOnline

from server.engines.base import MIN_SAMPLES, EngineInferenceError, VadEngine, Waveform, load_funasr
from server.engines.session import SessionConfig
from server.vocab import ModelKind


class FsmnVadEngine(VadEngine):
    kind: ClassVar[ModelKind] = ModelKind.FSMN_VAD

    def __init__(self, model_dir: Path, *, model_file: str, threads: int, device: str = "cpu",
                 config: SessionConfig | None = None):
        self._model, sessions = load_funasr("Fsmn_vad", model_dir, model_file=model_file, threads=threads,
                                            device=device, config=config)
        self._describe_sessions(sessions, model_file, device)
        self._config: dict[str, Any] = yaml.safe_load((model_dir / "config.yaml").read_text())
        self._cmvn = str(model_dir / "am.mvn")

    def open_stream(self, *, silence_ms: int) -> VadStream:
        """One live stream's detector on this model: speech ends after ``silence_ms`` of silence."""
        return VadStream(self, silence_ms)

    def _infer_online(self, inputs: list[Any]) -> list[Any]:
        result: list[Any] = self._model.ort_infer(inputs)
        return result

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


class VadStream:
    """The per-stream state of online FSMN-VAD (front end, FSMN caches, scorer) over a shared engine.

    :meth:`feed` answers what funasr-onnx's online scorer answers: ``[start_ms, end_ms]`` pairs in
    stream time, ``-1`` for an end not reached yet (``[start, -1]``) or a start reported earlier
    (``[-1, end]``).
    """

    def __init__(self, engine: FsmnVadEngine, silence_ms: int):
        config = engine._config
        self._engine = engine
        self._silence_ms = silence_ms
        self._frontend = WavFrontendOnline(cmvn_file=engine._cmvn, **config["frontend_conf"])
        self._scorer = E2EVadModel(config["model_conf"])
        encoder = config["encoder_conf"]
        self._caches = [np.zeros((1, encoder["proj_dim"], encoder["lorder"] - 1, 1), np.float32)
                        for _ in range(encoder["fsmn_layers"])]

    def feed(self, samples: Waveform, *, final: bool = False) -> list[tuple[int, int]]:
        waveforms = np.ascontiguousarray(samples, np.float32)[None, :]
        feats, _ = self._frontend.extract_fbank(waveforms, np.array([waveforms.shape[1]], np.int32), final)
        if feats.size == 0:
            return []
        scores, *self._caches = self._engine._infer_online([feats.astype(np.float32), *self._caches])
        segments = self._scorer(scores, self._frontend.get_waveforms(), is_final=final,
                                max_end_sil=self._silence_ms, online=True)
        return [(int(start), int(end)) for start, end in (segments[0] if segments else [])]
