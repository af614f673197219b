"""Speech-like audio made with numpy, so smoke clips and tests need no TTS engine or network.

The generated test models gate on loudness, not on phonetics, so a voiced, syllabic signal at a
conversational level is all a clip needs to be "speech"; silence must stay digital silence.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import soundfile as sf
from numpy.typing import NDArray

SAMPLE_RATE = 16_000


def speech_like(seconds: float, *, seed: int = 0, level: float = 0.25) -> NDArray[np.float32]:
    """A voiced, syllable-rhythm signal (harmonics of a wandering f0 under a syllable envelope)."""
    rng = np.random.default_rng(seed)
    n = round(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    f0 = 140.0 + 25.0 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, np.pi))
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    syllable_hz = rng.uniform(3.5, 4.5)
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * syllable_hz * t) ** 2
    signal = voiced * envelope + 0.02 * rng.standard_normal(n)
    peak = float(np.max(np.abs(signal))) or 1.0
    result: NDArray[np.float32] = (level * signal / peak).astype(np.float32)
    return result


def silence(seconds: float) -> NDArray[np.float32]:
    return np.zeros(round(seconds * SAMPLE_RATE), dtype=np.float32)


def islands(pattern: Sequence[tuple[str, float]], *, seed: int = 0) -> NDArray[np.float32]:
    """Concatenate ("speech", s) and ("silence", s) parts, e.g. for long-audio segmentation tests."""
    parts = [
        speech_like(secs, seed=seed + i) if kind == "speech" else silence(secs)
        for i, (kind, secs) in enumerate(pattern)
    ]
    return np.concatenate(parts) if parts else silence(0)


def wav_bytes(samples: NDArray[np.float32], sample_rate: int = SAMPLE_RATE, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, sample_rate, format="WAV", subtype=subtype)
    return buf.getvalue()


def silence_flac(seconds: int, rate: int) -> bytes:
    """Digital silence as 16-bit FLAC at ``rate``, written a second at a time: a tiny file that
    decodes to a long recording (how a hostile upload looks), built without holding it whole."""
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", samplerate=rate, channels=1, format="FLAC", subtype="PCM_16") as fh:
        block = np.zeros(rate, np.int16)
        for _ in range(seconds):
            fh.write(block)
    return buf.getvalue()
