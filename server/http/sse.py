"""``stream=true`` on ``/v1/audio/transcriptions``: the transcript as server-sent events, segment by
segment, as OpenAI's ``gpt-4o-transcribe`` streams it (the official client's ``stream=True``).

Each finished segment is a ``transcript.text.delta`` the moment the model finishes it (a long file
is cut at pauses, see ``server.speech.segmenter``), and ``transcript.text.done`` closes the stream
with the whole text and the version that computed it; the deltas add up to that text. What can be
refused is refused before the stream starts, with an ordinary HTTP error: unknown model, capacity,
a bad parameter, and audio that does not decode (the upload is decoded, on the inference pool,
before the answer starts). A failure after that (a timeout) is a final ``error`` event, which the
official client raises as an ``APIError``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

from server.errors import VoxswapError, envelope
from server.logs import request_id_var
from server.service.context import AppContext
from server.service.routing import Target
from server.speech.richtext import join_texts


def event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def transcription_events(ctx: AppContext, data: bytes, target: Target, *, language: str, hotwords: str,
                               client_key: str) -> StreamingResponse:
    ctx.service.check_request(target.stages.asr if target.stages is not None else target.model, hotwords=hotwords)
    samples = await ctx.pool.run(ctx.service.decode, data)  # bad audio is a 4xx, not an event after a 200
    queue: asyncio.Queue[str | None] = asyncio.Queue()
    texts: list[str] = []

    def on_texts(batch: list[str]) -> None:
        for text in filter(None, batch):
            before = join_texts(texts)
            texts.append(text)
            queue.put_nowait(event({"type": "transcript.text.delta", "delta": join_texts(texts)[len(before):]}))

    task = asyncio.create_task(ctx.service.transcribe_events(
        samples, on_texts, language=language, version=target.version, model=target.model, client_key=client_key,
        hotwords=hotwords, stages=target.stages))
    task.add_done_callback(lambda _: queue.put_nowait(None))
    request_id = request_id_var.get()

    async def body() -> AsyncIterator[str]:
        while (item := await queue.get()) is not None:
            yield item
        try:
            result = task.result()
        except VoxswapError as exc:
            yield event({"type": "error", **envelope(exc.message, type_=exc.type, code=exc.code, param=exc.param,
                                                     request_id=request_id)})
            return
        yield event({"type": "transcript.text.done", "text": join_texts(texts), "model": result.model,
                     "model_version": result.model_version, "language": result.language,
                     "usage": {"type": "duration", "seconds": round(result.duration_s, 3)},
                     **({"pipeline": result.pipeline, "model_versions": result.model_versions}
                        if result.pipeline else {})})

    headers = {"X-Model": target.model.name, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    if target.version is not None:
        headers["X-Model-Version"] = target.version
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)
