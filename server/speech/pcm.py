"""Raw PCM as realtime clients stream it: base64 of little-endian 16-bit mono, resampled to 16 kHz.

OpenAI's Realtime API sends 24 kHz; voxswap also takes 16 kHz (the rate the models run at, so no
resampling). Chunks arrive a few tens of milliseconds at a time, and resampling each on its own
would put a filter edge at every chunk boundary; :class:`StreamResampler` carries the filter's
context from one chunk to the next, so a stream resampled in pieces equals the whole resampled at
once (up to the last few samples, which wait for the next chunk or :meth:`flush`).
"""

from __future__ import annotations

import base64
import binascii
from math import gcd

import numpy as np
from numpy.typing import NDArray

SAMPLE_RATE = 16_000
INPUT_RATES = (16_000, 24_000)
_HALF_TAPS = 10  # resample_poly's default filter reaches 10 input samples (per up/down step) either side


class PcmError(ValueError):
    """Bytes that are not what the session's format says (odd length, not base64)."""


def decode_base64_pcm16(text: str) -> NDArray[np.int16]:
    """An ``input_audio_buffer.append``'s audio as samples; a clear error for anything else."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise PcmError(f"audio is not valid base64: {exc}") from exc
    if len(raw) % 2:
        raise PcmError(f"audio is {len(raw)} bytes: 16-bit PCM comes in whole 2-byte samples")
    return np.frombuffer(raw, dtype="<i2")


class StreamResampler:
    """16-bit PCM at ``rate`` in, float32 at 16 kHz out, chunk by chunk, without seams.

    It keeps the input samples the filter still needs (the context left of the next output, and the
    samples right of the last output it could not compute yet), so output is delayed by a few
    milliseconds and nothing is computed twice.
    """

    def __init__(self, rate: int):
        if rate not in INPUT_RATES:
            raise PcmError(f"PCM rate {rate} is not supported; use one of {', '.join(map(str, INPUT_RATES))}")
        common = gcd(rate, SAMPLE_RATE)
        self.rate = rate
        self._up, self._down = SAMPLE_RATE // common, rate // common
        self._pad = _HALF_TAPS * max(self._up, self._down) // self._up * self._down  # whole input steps
        self._pending = np.zeros(0, np.float32)  # input not yet turned into output (plus context)
        self._context = 0  # how many of the pending samples are left context, already resampled
        self.samples_in = 0

    def feed(self, pcm: NDArray[np.int16]) -> NDArray[np.float32]:
        """The 16 kHz samples that ``pcm`` completes (a chunk may complete none)."""
        self.samples_in += len(pcm)
        chunk = pcm.astype(np.float32) / 32768.0
        if self._up == self._down:
            return chunk
        self._pending = np.concatenate([self._pending, chunk])
        return self._take()

    def flush(self) -> NDArray[np.float32]:
        """What is left, as if the stream ended in silence (a commit, the end of a session)."""
        if self._up == self._down:
            return np.zeros(0, np.float32)
        self._pending = np.concatenate([self._pending, np.zeros(self._pad + self._down, np.float32)])
        out = self._take()
        self._pending, self._context = np.zeros(0, np.float32), 0
        return out

    def _take(self) -> NDArray[np.float32]:
        usable = len(self._pending) - self._pad  # the filter's right context must have arrived
        usable -= (usable - self._context) % self._down  # whole output steps only
        if usable <= self._context:
            return np.zeros(0, np.float32)
        from scipy.signal import resample_poly  # 24 kHz sessions only: scipy.signal costs ~1 s to import

        out = resample_poly(self._pending[: usable + self._pad], self._up, self._down).astype(np.float32)
        first = self._context * self._up // self._down
        last = usable * self._up // self._down
        keep = max(0, usable - self._pad)  # the next call's left context starts here
        keep -= keep % self._down
        self._pending = self._pending[keep:]
        self._context = usable - keep
        kept: NDArray[np.float32] = out[first:last]
        return kept
