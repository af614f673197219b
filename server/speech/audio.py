"""Uploads to 16 kHz mono float32, in memory, with a clear reason for every refusal.

libsndfile (soundfile) takes WAV, FLAC and Ogg quickly and exactly; everything else (mp3, m4a/aac,
webm, opus in other containers) goes through FFmpeg via PyAV. No temp files, no librosa.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from server.errors import AudioTooLong, AudioTooShort, EmptyAudio, UnsupportedAudio

SAMPLE_RATE = 16_000
MIN_SECONDS = 0.1  # the front end needs one 25 ms frame; OpenAI's API refuses under 0.1 s too
UNKNOWN_LENGTH = 2**62  # libsndfile reports SF_COUNT_MAX frames when a header does not say
# Real recordings use 8-192 kHz; a header may claim anything, and resampling from an absurd rate
# would cost seconds of CPU and gigabytes of filter for a file of a few kilobytes.
MIN_RATE, MAX_RATE = 1_000, 768_000
MAX_RESAMPLE_FACTOR = 1_000  # largest up/down factor of the polyphase filter


@dataclass(frozen=True)
class DecodedAudio:
    samples: NDArray[np.float32]  # float32, mono, 16 kHz, in [-1, 1]
    source_rate: int
    source_channels: int
    codec: str

    @property
    def duration_s(self) -> float:
        return len(self.samples) / SAMPLE_RATE


def decode(data: bytes, *, max_seconds: float) -> DecodedAudio:
    if not data:
        raise EmptyAudio("the uploaded file is empty (0 bytes)", param="file")
    decoded = _decode_soundfile(data, max_seconds) or _decode_av(data, max_seconds)
    samples = decoded.samples
    if samples.size == 0:
        raise EmptyAudio("the audio decodes to zero samples", param="file")
    if not np.all(np.isfinite(samples)):
        samples = np.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=-1.0)
    duration = samples.size / SAMPLE_RATE
    if duration < MIN_SECONDS:
        raise AudioTooShort(
            f"the audio is {duration * 1000:.0f} ms long; at least {MIN_SECONDS:g} s is needed",
            param="file",
        )
    if duration > max_seconds:
        raise _too_long(duration, max_seconds)
    return DecodedAudio(np.clip(samples, -1.0, 1.0).astype(np.float32, copy=False),
                        decoded.source_rate, decoded.source_channels, decoded.codec)


def _too_long(seconds: float | None, max_seconds: float) -> AudioTooLong:
    """``seconds`` is None when decoding stopped at the limit, before the real length was known."""
    if seconds is None:
        return AudioTooLong(f"the audio is longer than the {max_seconds:g} s this server accepts", param="file")
    return AudioTooLong(f"the audio is {seconds:.1f} s long; this server accepts at most {max_seconds:g} s",
                        param="file")


def _decode_soundfile(data: bytes, max_seconds: float) -> DecodedAudio | None:
    """Read block by block, mono as it goes, and stop past the limit: a few MB of FLAC can hold
    hours of silence, and reading it whole would take gigabytes before the length check."""
    import soundfile as sf

    try:
        with sf.SoundFile(io.BytesIO(data)) as fh:
            rate, channels, codec = fh.samplerate, fh.channels, f"{fh.format}/{fh.subtype}".lower()
            _check_rate(rate)
            if UNKNOWN_LENGTH > fh.frames > max_seconds * rate + rate:
                raise _too_long(fh.frames / rate, max_seconds)
            limit, mono = int(max_seconds * rate) + 1, []
            for block in fh.blocks(blocksize=rate * 10, dtype="float32", always_2d=True):
                mono.append(block.mean(axis=1, dtype=np.float32))
                limit -= len(block)
                if limit < 0:
                    raise _too_long(None, max_seconds)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
        return None
    samples = np.concatenate(mono) if mono else np.zeros(0, np.float32)
    return DecodedAudio(_resample(samples, rate), rate, channels, codec)


def _decode_av(data: bytes, max_seconds: float) -> DecodedAudio:
    import av

    chunks: list[NDArray[np.float32]] = []
    limit = int(max_seconds * SAMPLE_RATE) + SAMPLE_RATE  # decoding stops a second past the limit
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = container.streams.audio[0] if container.streams.audio else None
            if stream is None:
                raise UnsupportedAudio("the file has no audio stream", param="file")
            rate, channels = stream.rate or 0, stream.channels or 0
            if rate:
                _check_rate(rate)
            codec = f"{container.format.name}/{stream.codec_context.name}"
            resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
            for frame in container.decode(audio=0):
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1).astype(np.float32, copy=False))
                    limit -= out.samples
                if limit < 0:
                    raise _too_long(None, max_seconds)
            for out in resampler.resample(None):
                chunks.append(out.to_ndarray().reshape(-1).astype(np.float32, copy=False))
    except (UnsupportedAudio, AudioTooLong):
        raise
    except (av.FFmpegError, ValueError, IndexError, EOFError) as exc:
        raise UnsupportedAudio(
            "the file is not audio this server can decode (wav, flac, ogg/opus, mp3, m4a/aac, "
            f"webm): {_short(exc)}",
            param="file",
        ) from exc
    samples = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
    return DecodedAudio(samples.astype(np.float32, copy=False), rate, channels, codec)


def _check_rate(rate: int) -> None:
    if not MIN_RATE <= rate <= MAX_RATE:
        raise UnsupportedAudio(
            f"the audio's sample rate is {rate} Hz; this server accepts {MIN_RATE} to {MAX_RATE} Hz",
            param="file",
        )


def _resample(samples: NDArray[np.float32], rate: int) -> NDArray[np.float32]:
    """Polyphase resampling; exact for every common rate (8, 11.025, 22.05, 44.1, 48, 96 kHz...).

    An odd rate such as 44101 Hz reduces to 16000/44101, a filter of almost a million taps; the
    nearest ratio with factors up to 1000 is off by under a millionth, which no recogniser notices.
    """
    if rate == SAMPLE_RATE or samples.size == 0:
        return samples.astype(np.float32, copy=False)
    from fractions import Fraction

    from scipy.signal import resample_poly

    ratio = Fraction(SAMPLE_RATE, rate).limit_denominator(MAX_RESAMPLE_FACTOR)
    resampled: NDArray[np.float32] = resample_poly(samples, ratio.numerator, ratio.denominator).astype(np.float32)
    return resampled


def _short(exc: BaseException) -> str:
    """FFmpeg's reason without errno numbers or file names (which would be ours, not the client's)."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return str(text).splitlines()[0][:120]
