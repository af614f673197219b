"""``/v1/realtime?intent=transcription``: OpenAI's Realtime transcription protocol over a WebSocket.

The route is the protocol's transport: it admits the handshake (a 503 when the process is full or
shutting down, before accept), turns client messages into calls on the session in their order,
sends what the session emits through one sender task (so events never interleave), and ends the
connection: idle timeout (1000), client gone, a drain (1012, once the open turn is transcribed),
a pinned version retired (1001). A bad message is an ``error`` event, never the end of a session.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect

from server.errors import InvalidRequest, VoxswapError
from server.http.deps import canary_key
from server.http.middleware import deny_websocket
from server.http.realtime_schemas import updated_config
from server.service import realtime_events as events
from server.service.context import AppContext
from server.service.stream_session import StreamEnded, StreamSession
from server.service.streams import SERVICE_RESTART
from server.speech.pcm import PcmError, decode_base64_pcm16

router = APIRouter()
log = logging.getLogger("voxswap.realtime")
NORMAL, GOING_AWAY, SERVER_ERROR = 1000, 1001, 1011
TICK_S = 0.25  # how often the connection looks at its clocks (idle, drain deadline, a retired pin)


@router.websocket("/v1/realtime")
async def realtime(websocket: WebSocket, intent: str | None = None, model: str | None = None) -> None:
    ctx: AppContext = websocket.app.state.ctx
    request_id = str(websocket.scope.get("state", {}).get("request_id", ""))
    try:
        if intent != "transcription":
            raise InvalidRequest("this server speaks the Realtime API for transcription only: connect with "
                                 "?intent=transcription", param="intent")
        ctx.streams.admit()
    except VoxswapError as exc:
        await deny_websocket(websocket.send, websocket.scope, exc, request_id)
        return
    await websocket.accept()
    outbox: asyncio.Queue[events.Event | tuple[int, str]] = asyncio.Queue()
    session = ctx.streams.open(outbox.put_nowait)
    session.client_key = canary_key(websocket)
    sender = asyncio.create_task(_send_all(websocket, outbox), name="voxswap-realtime-sender")
    log.info("realtime session opened", extra={"event": "realtime_open", "session": session.id})
    code, reason = NORMAL, "session ended"
    try:
        session.start()
        if model:
            await _handle(session, {"type": "session.update", "session": {
                "type": "transcription", "audio": {"input": {"transcription": {"model": model}}}}})
        code, reason = await _serve(ctx, websocket, session)
    except StreamEnded as exc:
        session.abort_turn(exc.code, exc.message)
        await asyncio.wait_for(session.decoder.idle.wait(), ctx.settings.inference_timeout_s)
        outbox.put_nowait(events.error(exc.message, code=exc.code, type_="server_error"))
        code, reason = exc.close_code, exc.message
    except Exception:
        log.exception("realtime session failed", extra={"event": "realtime_error", "session": session.id})
        outbox.put_nowait(events.error("the server failed; reconnect", code="server_error", type_="server_error"))
        code, reason = SERVER_ERROR, "server error"
    finally:
        outbox.put_nowait((code, reason[:120]))
        await asyncio.shield(sender)
        await ctx.streams.release(session)
        log.info("realtime session closed", extra={"event": "realtime_close", "session": session.id,
                                                   "close_code": code, "reason": reason})


async def _serve(ctx: AppContext, websocket: WebSocket, session: StreamSession) -> tuple[int, str]:
    """Read client events until the connection ends; returns the close code and reason to send."""
    settings = ctx.settings
    last_message = time.monotonic()
    deadline: float | None = None  # the drain's: the open turn is committed when it passes
    receiving: asyncio.Task[Any] | None = None
    drain = asyncio.create_task(ctx.streams.wait_drain())
    try:
        while True:
            if session.draining and deadline is None:
                deadline = time.monotonic() + settings.drain_timeout_s
            if deadline is not None:
                if session.in_turn and time.monotonic() >= deadline:
                    session.end_open_turn()
                if not session.in_turn:
                    await asyncio.wait_for(session.decoder.idle.wait(), settings.inference_timeout_s)
                    return SERVICE_RESTART, "server shutting down: reconnect to continue"
            receiving = receiving or asyncio.create_task(websocket.receive())
            waiting = {receiving} if session.draining else {receiving, drain}  # a finished task would spin the loop
            done, _ = await asyncio.wait(waiting, timeout=TICK_S, return_when=asyncio.FIRST_COMPLETED)
            if receiving in done:
                message, receiving = receiving.result(), None
                if message["type"] == "websocket.disconnect":
                    return NORMAL, "client closed"
                last_message = time.monotonic()
                await _receive(ctx, session, message)
            if drain in done and not session.draining:
                session.begin_drain()
            if time.monotonic() - last_message > settings.realtime_idle_timeout_s:
                return NORMAL, f"idle for {settings.realtime_idle_timeout_s:g} s"
            session.check_pin()
    except WebSocketDisconnect:
        return NORMAL, "client closed"
    finally:
        drain.cancel()
        if receiving is not None:
            receiving.cancel()


async def _receive(ctx: AppContext, session: StreamSession, message: dict[str, Any]) -> None:
    """One client message: any mistake in it is an ``error`` event, and the session goes on."""
    raw = message.get("text")
    if raw is None:
        raw = message.get("bytes") or b""
    client_event: str | None = None
    try:
        if len(raw) > ctx.settings.realtime_max_message_bytes:
            raise InvalidRequest(f"the message is {len(raw)} bytes; the most this server takes is "
                                 f"{ctx.settings.realtime_max_message_bytes} (send audio in smaller appends)")
        try:
            event = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidRequest(f"the message is not JSON: {exc}") from exc
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            raise InvalidRequest("a client event is a JSON object with a string 'type'", param="type")
        client_event = event.get("event_id") if isinstance(event.get("event_id"), str) else None
        await _handle(session, event)
    except StreamEnded:
        raise
    except VoxswapError as exc:
        session.send_error(exc, client_event)


async def _handle(session: StreamSession, event: dict[str, Any]) -> None:
    kind = event["type"]
    if kind == "input_audio_buffer.append":
        audio = event.get("audio")
        if not isinstance(audio, str):
            raise InvalidRequest("input_audio_buffer.append needs 'audio': base64 of 16-bit PCM", param="audio")
        try:
            pcm = decode_base64_pcm16(audio)
        except PcmError as exc:
            raise InvalidRequest(str(exc), param="audio") from exc
        await session.append(pcm)
    elif kind in ("session.update", "transcription_session.update"):
        session.configure(updated_config(session.config, event.get("session")))
        session.send_updated()
    elif kind == "input_audio_buffer.commit":
        session.commit()
    elif kind == "input_audio_buffer.clear":
        session.clear()
    else:
        raise InvalidRequest(f"unsupported event type {str(kind)[:80]!r} (a transcription session takes "
                             "session.update and input_audio_buffer.append, .commit and .clear)", param="type")


async def _send_all(websocket: WebSocket, outbox: asyncio.Queue[events.Event | tuple[int, str]]) -> None:
    """The one writer of the socket: events in the order emitted, then the close."""
    while True:
        item = await outbox.get()
        try:
            if isinstance(item, tuple):
                await websocket.close(code=item[0], reason=item[1])
                return
            await websocket.send_text(json.dumps(item))
        except (WebSocketDisconnect, RuntimeError, OSError):
            return  # the client is gone: nothing more can reach it
