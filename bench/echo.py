"""The floor under any ASR server in Python: a bare FastAPI endpoint that receives the same multipart
upload as ``/api/transcribe`` and decodes the WAV (with voxswap's own decoder, on a worker thread),
then answers a small JSON. No model, no middleware, no registry.

``python -m bench.echo --port PORT`` serves it with uvicorn's defaults, as ``voxswap serve`` would.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Annotated

from fastapi import FastAPI, File, UploadFile

from server.speech import audio

app = FastAPI()


@app.post("/echo")
async def echo(file: Annotated[UploadFile, File()]) -> dict[str, int]:
    data = await file.read()
    decoded = await asyncio.to_thread(audio.decode, data, max_seconds=600)
    return {"samples": len(decoded.samples)}


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
