"""The client events of OpenAI's Realtime transcription protocol that voxswap reads, validated.

A ``session.update`` changes only what it names (a field left out keeps its value; an explicit
``turn_detection: null`` switches to manual commits), as OpenAI's API does. What voxswap cannot do
is refused by name rather than ignored: another audio format, ``semantic_vad``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from server.errors import InvalidRequest
from server.service.stream_session import SessionConfig, TurnDetection
from server.vocab import LANGUAGES


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class AudioFormat(_Lenient):
    type: Literal["audio/pcm"] = "audio/pcm"
    rate: Literal[16000, 24000] = 24000


class InputTranscription(_Lenient):
    model: str | None = Field(None, max_length=200)
    language: str | None = Field(None, max_length=16)
    prompt: str | None = None  # accepted, not used: no model here takes a free-text prompt


class ServerVad(_Lenient):
    type: Literal["server_vad"]
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    prefix_padding_ms: int = Field(300, ge=0, le=5000)
    silence_duration_ms: int = Field(500, ge=100, le=10_000)


class AudioInput(_Lenient):
    format: AudioFormat | None = None
    transcription: InputTranscription | None = None
    turn_detection: ServerVad | None = None


class Audio(_Lenient):
    input: AudioInput | None = None


class TranscriptionSession(_Lenient):
    type: Literal["transcription"] = "transcription"
    audio: Audio | None = None


def updated_config(current: SessionConfig, session: object) -> SessionConfig:
    """``current`` with what a ``session.update``'s ``session`` object changes; an InvalidRequest
    naming the field otherwise."""
    try:
        parsed = TranscriptionSession.model_validate(session)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise InvalidRequest(f"session.{where}: {first['msg']}", param=f"session.{where}") from exc
    audio = parsed.audio.input if parsed.audio is not None else None
    if audio is None:
        return current
    model, language, rate = current.model, current.language, current.rate
    if audio.format is not None:
        rate = audio.format.rate
    if audio.transcription is not None:
        model = audio.transcription.model or model
        if audio.transcription.language is not None:
            language = audio.transcription.language.lower()
            if language not in LANGUAGES:
                raise InvalidRequest(f"language must be one of {', '.join(LANGUAGES)}",
                                     param="session.audio.input.transcription.language")
    detection = current.turn_detection
    if "turn_detection" in audio.model_fields_set:
        vad = audio.turn_detection
        detection = None if vad is None else TurnDetection(vad.threshold, vad.prefix_padding_ms,
                                                           vad.silence_duration_ms)
    return SessionConfig(model=model, language=language, rate=rate, turn_detection=detection)
