"""Uploads to 16 kHz mono float32, in memory, with a clear reason for every refusal.

libsndfile (soundfile) takes WAV, FLAC and Ogg quickly and exactly; everything else (mp3, m4a/aac,
webm, opus in other containers) goes through FFmpeg via PyAV. No temp files, no librosa.

Memory follows what the model will see, never the source: both paths decode block by block (frame
by frame), resample each block at once through FFmpeg's streaming resampler and write the 16 kHz
result into one buffer, counting output seconds against the limit. A FLAC of ten minutes of silence
at 384 kHz (under a megabyte) costs its 16 kHz result, 38 MB, not the 920 MB of its source rate that
decoding it whole took (1.9 GB with the resampler's copies).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from server.errors import AudioTooLong, AudioTooShort, EmptyAudio, UnsupportedAudio

if TYPE_CHECKING:
    import av  # imported where it is used: a server that never decodes never pays for FFmpeg

SAMPLE_RATE = 16_000
MIN_SECONDS = 0.1  # the front end needs one 25 ms frame; OpenAI's API refuses under 0.1 s too
UNKNOWN_LENGTH = 2**62  # libsndfile reports SF_COUNT_MAX frames when a header does not say
# Real recordings use 8-192 kHz; a header may claim anything, and resampling from an absurd rate
# would cost seconds of CPU for a file of a few kilobytes.
MIN_RATE, MAX_RATE = 1_000, 768_000
BLOCK_SAMPLES = 1 << 16  # source samples (all channels together) read at once: 256 kB of float32

# The containers FFmpeg may read an upload as (its demuxer names; one name of a multi-name demuxer
# such as "mov,mp4,m4a,..." admits it). Probing unrestricted would also admit demuxers that open
# other files, e.g. "concat" reading a playlist of paths on the server's own disk.
AV_FORMATS = "wav,w64,flac,ogg,mp3,mov,matroska,aac,aiff,caf,au,amr"

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
    """Blocking, CPU-bound: call it where its concurrency is bounded (the inference pool)."""
    if not data:
        raise EmptyAudio("the uploaded file is empty (0 bytes)", param="file")
    decoded = _decode_soundfile(data, max_seconds) or _decode_av(data, max_seconds)
    if decoded.samples.size == 0:
        raise EmptyAudio("the audio decodes to zero samples", param="file")
    duration = decoded.duration_s
    if duration < MIN_SECONDS:
        raise AudioTooShort(
            f"the audio is {duration * 1000:.0f} ms long; at least {MIN_SECONDS:g} s is needed",
            param="file",
        )
    if duration > max_seconds:
        raise _too_long(duration, max_seconds)
    return decoded


def _too_long(seconds: float | None, max_seconds: float) -> AudioTooLong:
    """``seconds`` is None when decoding stopped at the limit, before the real length was known."""
    if seconds is None:
        return AudioTooLong(f"the audio is longer than the {max_seconds:g} s this server accepts", param="file")
    return AudioTooLong(f"the audio is {seconds:.1f} s long; this server accepts at most {max_seconds:g} s",
                        param="file")


class _Output:
    """The 16 kHz result, resampled and written as the source is decoded, counted against the limit.

    Decoding stops a second past the limit (so a file just over it is refused with its real length).
    The buffer is sized from the header when it says how long the audio is, else for the limit: a
    fresh allocation costs memory only where it is written, and realloc cuts it to size at the end
    without a copy, whereas blocks joined at the end would hold the result twice at its peak.
    Not-a-number becomes silence and everything is clipped to [-1, 1], block by block.
    """

    def __init__(self, max_seconds: float, *, expected_s: float | None, passthrough: bool):
        import av

        self._max_seconds = max_seconds
        self._limit = int(max_seconds * SAMPLE_RATE) + SAMPLE_RATE
        capacity = self._limit if expected_s is None else int((expected_s + 1) * SAMPLE_RATE)
        self._buffer = np.empty(max(1, min(self._limit, capacity)), np.float32)
        self._size = 0
        self._resampler = None if passthrough else av.AudioResampler(format="flt", layout="mono",
                                                                     rate=SAMPLE_RATE)

    def mono(self, block: NDArray[np.float32], rate: int) -> None:
        """One block of mono float32 samples at ``rate`` (the soundfile path)."""
        if self._resampler is None:
            self._write(block)
            return
        import av

        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(block).reshape(1, -1), format="flt",
                                           layout="mono")
        frame.sample_rate = rate
        self.frame(frame)

    def frame(self, frame: av.AudioFrame | None) -> None:
        """One decoded frame in any format and layout; None flushes the resampler's last samples."""
        assert self._resampler is not None
        for out in self._resampler.resample(frame):
            self._write(out.to_ndarray().reshape(-1))

    def finish(self) -> NDArray[np.float32]:
        if self._resampler is not None:
            self.frame(None)
        self._buffer.resize(self._size, refcheck=False)  # nobody else holds it: realloc in place
        return self._buffer

    def _write(self, block: NDArray[Any]) -> None:  # float32: the resampler's format, or soundfile's
        end = self._size + len(block)
        if end > self._limit:
            raise _too_long(None, self._max_seconds)
        if end > len(self._buffer):  # the header said less than there is
            self._buffer.resize(min(self._limit, max(end, 2 * len(self._buffer))), refcheck=False)
        out = self._buffer[self._size : end]
        out[:] = block
        np.nan_to_num(out, copy=False, nan=0.0, posinf=1.0, neginf=-1.0)
        np.clip(out, -1.0, 1.0, out=out)
        self._size = end


def _decode_soundfile(data: bytes, max_seconds: float) -> DecodedAudio | None:
    """Read block by block, mono as it goes, resampled as it goes, and stop past the limit."""
    import soundfile as sf

    try:
        with sf.SoundFile(io.BytesIO(data)) as fh:
            rate, channels, codec = fh.samplerate, fh.channels, f"{fh.format}/{fh.subtype}".lower()
            _check_rate(rate)
            known = fh.frames < UNKNOWN_LENGTH
            if known and fh.frames > max_seconds * rate + rate:
                raise _too_long(fh.frames / rate, max_seconds)
            output = _Output(max_seconds, expected_s=fh.frames / rate if known else None,
                             passthrough=rate == SAMPLE_RATE)
            blocksize = max(256, BLOCK_SAMPLES // max(1, channels))
            for block in fh.blocks(blocksize=blocksize, dtype="float32", always_2d=True):
                output.mono(block[:, 0] if channels == 1 else block.mean(axis=1, dtype=np.float32), rate)
            samples = output.finish()
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError):
        return None
    return DecodedAudio(samples, rate, channels, codec)


def _decode_av(data: bytes, max_seconds: float) -> DecodedAudio:
    import av

    try:
        with av.open(io.BytesIO(data), mode="r", options={"format_whitelist": AV_FORMATS}) as container:
            stream = container.streams.audio[0] if container.streams.audio else None
            if stream is None:
                raise UnsupportedAudio("the file has no audio stream", param="file")
            rate, channels = stream.rate or 0, stream.channels or 0
            if rate:
                _check_rate(rate)
            codec = f"{container.format.name}/{stream.codec_context.name}"
            expected = container.duration / av.time_base if container.duration else None
            output = _Output(max_seconds, expected_s=expected, passthrough=False)
            for frame in container.decode(audio=0):
                output.frame(frame)
            samples = output.finish()
    except (UnsupportedAudio, AudioTooLong):
        raise
    except (av.FFmpegError, ValueError, IndexError, EOFError) as exc:
        raise UnsupportedAudio(
            "the file is not audio this server can decode (wav, flac, ogg/opus, mp3, m4a/aac, "
            f"webm): {_short(exc)}",
            param="file",
        ) from exc
    return DecodedAudio(samples, rate, channels, codec)


def _check_rate(rate: int) -> None:
    if not MIN_RATE <= rate <= MAX_RATE:
        raise UnsupportedAudio(
            f"the audio's sample rate is {rate} Hz; this server accepts {MIN_RATE} to {MAX_RATE} Hz",
            param="file",
        )


def _short(exc: BaseException) -> str:
    """FFmpeg's reason without errno numbers or file names (which would be ours, not the client's)."""
    text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    return str(text).splitlines()[0][:120]
