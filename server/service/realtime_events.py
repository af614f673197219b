"""The server events of OpenAI's Realtime transcription protocol, as the official client parses them.

Each function builds one event's body; :class:`~server.service.stream_session.StreamSession` gives
it an ``event_id`` when it is sent. voxswap adds fields OpenAI's events do not have (``model``,
``model_version``, ``model_versions`` on ``.completed``): the client keeps unknown fields.
"""

from __future__ import annotations

import uuid
from typing import Any

Event = dict[str, Any]
TRANSCRIPTION = "conversation.item.input_audio_transcription"


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


def error(message: str, *, code: str, type_: str = "invalid_request_error", param: str | None = None,
          event_id: str | None = None) -> Event:
    """An ``error`` event: the client's mistake (or the server's state); the session goes on."""
    return {"type": "error", "error": {"type": type_, "code": code, "message": message, "param": param,
                                       "event_id": event_id}}


def speech_started(item_id: str, audio_start_ms: int) -> Event:
    return {"type": "input_audio_buffer.speech_started", "audio_start_ms": audio_start_ms, "item_id": item_id}


def speech_stopped(item_id: str, audio_end_ms: int) -> Event:
    return {"type": "input_audio_buffer.speech_stopped", "audio_end_ms": audio_end_ms, "item_id": item_id}


def committed(item_id: str, previous_item_id: str | None) -> Event:
    return {"type": "input_audio_buffer.committed", "item_id": item_id, "previous_item_id": previous_item_id}


def cleared() -> Event:
    return {"type": "input_audio_buffer.cleared"}


def delta(item_id: str, text: str) -> Event:
    return {"type": f"{TRANSCRIPTION}.delta", "item_id": item_id, "content_index": 0, "delta": text}


def completed(item_id: str, transcript: str, *, seconds: float, model: str, model_version: str,
              language: str | None, model_versions: dict[str, str] | None = None) -> Event:
    event: Event = {"type": f"{TRANSCRIPTION}.completed", "item_id": item_id, "content_index": 0,
                    "transcript": transcript, "usage": {"type": "duration", "seconds": round(seconds, 3)},
                    "model": model, "model_version": model_version, "language": language}
    if model_versions:
        event["model_versions"] = model_versions
    return event


def failed(item_id: str, message: str, *, code: str) -> Event:
    return {"type": f"{TRANSCRIPTION}.failed", "item_id": item_id, "content_index": 0,
            "error": {"type": "transcription_error", "code": code, "message": message, "param": None}}
