"""Turn detection on a live stream: where speech starts and where it stops, chunk by chunk.

A detector is fed 16 kHz samples as they arrive and answers the boundaries those samples reveal,
in absolute sample positions of the stream. Two implement it: :class:`EnergyDetector` here (frame
levels against a threshold; no model), and the online FSMN-VAD of a pipeline's voice activity
stage (``server.service.stream_vad``). Both take the session's own silence duration, so two
sessions on one model can end turns differently.

The energy detector's ``threshold`` follows OpenAI's ``server_vad``: 0 to 1, higher needs louder
speech. It maps linearly onto a frame level from -60 dBFS (0) to -20 dBFS (1): the default 0.5 is
-40 dBFS, well above a quiet room's microphone noise and well below conversational speech.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
from numpy.typing import NDArray

from server.speech.segmenter import FRAME_S, SAMPLE_RATE, frame_db

FRAME = int(FRAME_S * SAMPLE_RATE)
MIN_SPEECH_FRAMES = 3  # 60 ms above the threshold: a click or a breath is not the start of a turn


@dataclass(frozen=True)
class Boundary:
    kind: Literal["start", "stop"]
    sample: int  # absolute position in the stream, 16 kHz


class TurnDetector(Protocol):
    def feed(self, samples: NDArray[np.float32]) -> list[Boundary]:
        """The boundaries that ``samples`` (the next part of the stream) reveal, in order."""
        ...

    def reset(self) -> None:
        """Forget any speech in progress (the buffer was cleared or committed by the client)."""
        ...


def threshold_db(threshold: float) -> float:
    return -60.0 + 40.0 * min(max(threshold, 0.0), 1.0)


class EnergyDetector:
    """Speech is a run of frames louder than the threshold; a turn stops after ``silence_ms`` of
    frames under it. Frames are 20 ms; a partial frame waits for the next chunk."""

    def __init__(self, *, threshold: float = 0.5, silence_ms: int = 500):
        self.level_db = threshold_db(threshold)
        self.silence_frames = max(1, round(silence_ms / 1000 / FRAME_S))
        self._carry = np.zeros(0, np.float32)
        self._position = 0  # samples of the stream consumed into whole frames
        self._speaking = False
        self._loud_run = 0  # consecutive loud frames (before a start)
        self._quiet_run = 0  # consecutive quiet frames (during speech)
        self._last_loud_end = 0

    def feed(self, samples: NDArray[np.float32]) -> list[Boundary]:
        data = np.concatenate([self._carry, samples]) if len(self._carry) else samples
        whole = len(data) // FRAME * FRAME
        self._carry = data[whole:].copy()
        found: list[Boundary] = []
        for index, level in enumerate(frame_db(data[:whole])):
            start = self._position + index * FRAME
            if level > self.level_db:
                self._quiet_run = 0
                self._last_loud_end = start + FRAME
                self._loud_run += 1
                if not self._speaking and self._loud_run >= MIN_SPEECH_FRAMES:
                    self._speaking = True
                    found.append(Boundary("start", start - (MIN_SPEECH_FRAMES - 1) * FRAME))
            else:
                self._loud_run = 0
                if self._speaking:
                    self._quiet_run += 1
                    if self._quiet_run >= self.silence_frames:
                        self._speaking = False
                        found.append(Boundary("stop", self._last_loud_end))
        self._position += whole
        return found

    def reset(self) -> None:
        self._speaking = False
        self._loud_run = self._quiet_run = 0


def quietest_cut(samples: NDArray[np.float32], *, earliest: int) -> int:
    """Where to cut ``samples`` so the first part can be decoded on its own: the start of its
    quietest 20 ms frame at or after ``earliest`` (a pause between words, when it has one)."""
    first = -(-earliest // FRAME)
    levels = frame_db(samples[first * FRAME :])
    if len(levels) == 0:
        return len(samples)
    return (first + int(np.argmin(levels))) * FRAME
