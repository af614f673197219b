"""Realtime streams: how many live streams one server holds with finalisation p95 under 1 s.

``python -m bench.streams [--quick] [--compute-ms 40] [--weights-mb 240]`` runs it alone; ``python -m
bench.run`` runs it as the part ``streams``.

One ``voxswap serve`` (uvicorn, one inference thread, cores onnxruntime threads) on the benchmark's model.
Levels of N concurrent streams, each a WebSocket to ``/v1/realtime?intent=transcription`` (server_vad,
500 ms of silence) sending 24 kHz PCM16 in 100 ms appends at real-time pace: utterances of speech-like
audio (3-6 s) between 1.0-1.5 s pauses, each stream starting at a random offset. Every client runs in one
asyncio loop in this process, on the same machine as the server, with the appends encoded beforehand.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx
import numpy as np
import psutil
from scipy.signal import resample_poly
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

from bench import standalone
from bench.common import Bench, Goal, Section, Table, ms, pct, threads_for
from server.settings import Settings
from server.testing import synth
from testkit.harness import wait_until
from testkit.processes import start_server

RATE, CHUNK_S = 24_000, 0.1
CHUNK = round(RATE * CHUNK_S)
SILENCE_MS, PADDING_MS = 500, 300  # server_vad's silence and default padding (audio_start_ms is that early)
FULL_LEVELS, FULL_SECONDS = (1, 2, 4, 8, 12, 16, 20, 24, 32), 35.0
QUICK_LEVELS, QUICK_SECONDS = (1, 2), 8.0
GOAL_S = 1.0
STOP_P95_S = 2.0  # a level this far past the goal ends the ramp: more streams only queue longer
TAIL_TIMEOUT_S = 60.0  # after its audio, how long a stream waits for its last turn's end
DEFAULT_SESSIONS: int = Settings.model_fields["realtime_max_sessions"].default
POOL = 1 + Settings.model_fields["max_queue"].default  # the server runs one inference worker (Bench.server_env)
SESSION_UPDATE = json.dumps({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
    "format": {"type": "audio/pcm", "rate": RATE}, "transcription": {"model": "default"},
    "turn_detection": {"type": "server_vad", "silence_duration_ms": SILENCE_MS}}}}})
TRANSCRIPTION = "conversation.item.input_audio_transcription"


@dataclass
class Utterance:
    start_ms: int
    first: int  # the append holding its first speech sample
    last: int  # the append holding its last
    item: str | None = None
    first_delta: float | None = None  # loop clock
    stopped: float | None = None
    done: float | None = None
    failed: str | None = None  # the .failed event's code


@dataclass
class Stream:
    messages: list[str]  # the append events, 100 ms of audio each
    utterances: list[Utterance]
    offset_s: float
    sent: list[float] = field(default_factory=list)  # loop clock of each append's send
    lag: list[float] = field(default_factory=list)  # how late each append went out
    errors: list[str] = field(default_factory=list)  # error events and connection failures
    unmatched: int = 0  # turns the server found that no utterance explains


def plan(seconds: float, seed: int) -> Stream:
    """One stream's audio: leading silence, then utterances and pauses, ending in silence."""
    rng = np.random.default_rng(seed)
    parts = [synth.silence(float(rng.uniform(0.3, 1.0)))]
    bounds: list[tuple[int, int]] = []
    at = len(parts[0])
    while at < seconds * synth.SAMPLE_RATE:
        speech = synth.speech_like(float(rng.uniform(3.0, 6.0)), seed=seed * 100 + len(bounds))
        bounds.append((at, at + len(speech)))
        parts += [speech, synth.silence(float(rng.uniform(1.0, 1.5)))]
        at += len(parts[-2]) + len(parts[-1])
    samples = resample_poly(np.concatenate(parts), 3, 2)  # 16 kHz -> 24 kHz
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    pcm = np.concatenate([pcm, np.zeros(-len(pcm) % CHUNK, "<i2")])
    messages = [json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(chunk.tobytes()).decode()})
                for chunk in np.split(pcm, len(pcm) // CHUNK)]
    utterances = [Utterance(a * 1000 // synth.SAMPLE_RATE, a * 3 // 2 // CHUNK, (b * 3 // 2 - 1) // CHUNK)
                  for a, b in bounds]
    return Stream(messages, utterances, float(rng.uniform(0.0, 2.0)))


async def drive(url: str, stream: Stream, start: float) -> None:
    """Connect at ``start`` + the stream's offset, send at real-time pace, wait for every turn's end."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, start + stream.offset_s - loop.time()))
    try:
        async with connect(url, max_size=None, open_timeout=30, close_timeout=5) as ws:
            await ws.send(SESSION_UPDATE)
            receiver = asyncio.create_task(receive(ws, stream))
            began = loop.time()
            for index, message in enumerate(stream.messages):
                due = began + index * CHUNK_S
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                await ws.send(message)
                stream.sent.append(loop.time())
                stream.lag.append(stream.sent[-1] - due)
            await asyncio.wait_for(receiver, TAIL_TIMEOUT_S)
    except (OSError, WebSocketException, TimeoutError) as exc:
        stream.errors.append(f"{type(exc).__name__}: {exc}"[:160])


async def receive(ws: ClientConnection, stream: Stream) -> None:
    """Match the server's turns to the utterances in order; returns once every utterance has ended."""
    loop = asyncio.get_running_loop()
    waiting = iter(stream.utterances)
    by_item: dict[str, Utterance] = {}
    left = len(stream.utterances)
    async for raw in ws:
        now, event = loop.time(), json.loads(raw)
        kind, turn = event["type"], by_item.get(event.get("item_id", ""))
        if kind == "input_audio_buffer.speech_started":
            turn = next(waiting, None)
            if turn is None:
                stream.unmatched += 1  # a turn no utterance explains (one split in two)
            elif abs(event["audio_start_ms"] + PADDING_MS - turn.start_ms) > PADDING_MS:
                left -= 1  # found elsewhere than it began (merged or split): its timings would mean nothing
            else:
                turn.item, by_item[event["item_id"]] = event["item_id"], turn
        elif turn is None:
            if kind == "error":
                stream.errors.append(str(event["error"].get("code")))
        elif kind == f"{TRANSCRIPTION}.delta" and turn.first_delta is None:
            turn.first_delta = now
        elif kind == "input_audio_buffer.speech_stopped":
            turn.stopped = now
        elif kind in (f"{TRANSCRIPTION}.completed", f"{TRANSCRIPTION}.failed"):
            turn.done, left = now, left - 1
            turn.failed = event["error"]["code"] if kind.endswith("failed") else None
        if left == 0:
            return


@dataclass
class Level:
    streams: int
    finalise: list[float] = field(default_factory=list)  # append with the last speech + silence -> .completed
    after_stop: list[float] = field(default_factory=list)  # speech_stopped -> .completed
    first_delta: list[float] = field(default_factory=list)  # append with the first speech -> first delta
    completed: int = 0
    failed: dict[str, int] = field(default_factory=dict)  # code -> turns
    lost: int = 0  # turns never ended, never matched, or never started (a refused connection)
    errors: list[str] = field(default_factory=list)
    lag_p99: float = 0.0
    server_cores: float = 0.0  # CPU seconds per second
    client_cores: float = 0.0
    busy: float = 0.0  # the whole machine, 0-1

    @property
    def others(self) -> float:
        """Cores that other work on the machine took over the level."""
        return max(0.0, self.busy * (psutil.cpu_count() or 1) - self.server_cores - self.client_cores)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.lost and pct(self.finalise, 95) < GOAL_S


def run_level(url: str, server_pid: int, streams: int, seconds: float, seed: int) -> Level:
    plans = [plan(seconds, seed * 1000 + i) for i in range(streams)]
    server, client = psutil.Process(server_pid), psutil.Process()
    before = (sum(server.cpu_times()[:2]), sum(client.cpu_times()[:2]), psutil.cpu_times())

    async def all_streams() -> float:
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.2
        await asyncio.gather(*(drive(url, p, start) for p in plans))
        return loop.time() - start

    wall = asyncio.run(all_streams())
    after = (sum(server.cpu_times()[:2]), sum(client.cpu_times()[:2]), psutil.cpu_times())
    level = Level(streams, server_cores=(after[0] - before[0]) / wall, client_cores=(after[1] - before[1]) / wall)
    idle = [after[2].idle - before[2].idle, sum(after[2]) - sum(before[2])]
    level.busy = 1 - idle[0] / idle[1] if idle[1] else float("nan")
    for p in plans:
        level.errors += p.errors
        level.lost += p.unmatched
        level.lag_p99 = max(level.lag_p99, pct(p.lag, 99) if p.lag else 0.0)
        for u in p.utterances:
            if u.done is None or u.item is None or u.last >= len(p.sent):
                level.lost += 1
            elif u.failed is not None:
                level.failed[u.failed] = level.failed.get(u.failed, 0) + 1
            else:
                level.completed += 1
                level.finalise.append(u.done - (p.sent[u.last] + SILENCE_MS / 1000))
                if u.stopped is not None:
                    level.after_stop.append(u.done - u.stopped)
                if u.first_delta is not None:
                    level.first_delta.append(u.first_delta - p.sent[u.first])
    return level


def _sessions(url: str) -> float:
    lines = httpx.get(f"{url}/metrics", timeout=10).text.splitlines()
    return sum(float(x.split()[-1]) for x in lines if x.startswith("voxswap_realtime_sessions"))


def run(bench: Bench) -> Section:
    levels, seconds = (QUICK_LEVELS, QUICK_SECONDS) if bench.profile.quick else (FULL_LEVELS, FULL_SECONDS)
    env = {**bench.server_env(threads := threads_for(1)), "VOXSWAP_REALTIME_MAX_SESSIONS": str(max(levels) + 8)}
    bench.registry.promote("a", actor="bench")
    server = start_server(bench.registry.root, bench.workdir / "server-streams", env=env)
    results: list[Level] = []
    try:
        url = server.url.replace("http://", "ws://") + "/v1/realtime?intent=transcription"
        run_level(url, server.proc.pid, 1, 4.0, seed=0)  # warm-up: first-use costs belong to no level
        for index, streams in enumerate(levels, start=1):
            wait_until(lambda: _sessions(server.url) == 0, timeout_s=30, message="the last level's sessions closed")
            print(f"[bench] streams: {streams} ...", file=sys.stderr, flush=True)
            results.append(level := run_level(url, server.proc.pid, streams, seconds, seed=index))
            if level.failed or level.lost or pct(level.finalise, 95) > STOP_P95_S:
                break
    finally:
        server.stop()
    return _section(results, seconds, threads)


def _section(results: Sequence[Level], seconds: float, threads: int) -> Section:
    best = 0
    for level in results:
        if not level.ok:
            break
        best = level.streams
    section = Section(
        "streams", "8. Realtime streams",
        f"Concurrent streams to `/v1/realtime?intent=transcription` on one `voxswap serve` (uvicorn, one inference "
        f"thread, {threads} onnxruntime threads, `VOXSWAP_REALTIME_SEGMENT_S` at its default "
        f"{Settings.model_fields['realtime_segment_s'].default:g}). Each stream sends 24 kHz PCM16 in 100 ms "
        f"appends at real-time pace for about {seconds:g} s: utterances of 3-6 s of speech-like audio between "
        f"1.0-1.5 s pauses, server_vad with {SILENCE_MS} ms of silence, streams starting at random offsets within "
        "2 s. *Finalisation* runs from sending the append that holds an utterance's last speech sample, plus the "
        f"{SILENCE_MS} ms of silence the server must hear, to its `.completed`; *first delta* from sending the "
        "append that holds its first speech sample to the turn's first delta. All clients run in one asyncio "
        "loop (the `websockets` library, appends encoded beforehand) on the same machine as the server, whose "
        f"CPU they share. The ramp stops at the first level with failed turns or finalisation p95 over "
        f"{STOP_P95_S:g} s.",
    )
    rows = [[str(lv.streams), str(lv.completed), str(sum(lv.failed.values()) + lv.lost),
             ms(pct(lv.finalise, 50), 0), ms(pct(lv.finalise, 95), 0), ms(pct(lv.after_stop, 95), 0),
             ms(pct(lv.first_delta, 50), 0), ms(pct(lv.first_delta, 95), 0), f"{lv.server_cores:.2f}",
             f"{lv.client_cores:.2f}", f"{lv.others:.2f}", ms(lv.lag_p99, 0)] for lv in results]
    section.tables.append(Table(["streams", "turns ok", "turns failed", "final p50 ms", "final p95 ms",
                                 "stopped->done p95 ms", "first delta p50 ms", "first delta p95 ms",
                                 "server cores", "client cores", "other cores", "send lag p99 ms"], rows))
    at_best = next((lv for lv in results if lv.streams == best), None)
    measured = f"{best} streams (first delta p95 {ms(pct(at_best.first_delta, 95), 0)} ms)" if at_best else "none"
    section.goals.append(Goal(f"realtime streams, finalisation p95 < {GOAL_S:g} s", f">= {DEFAULT_SESSIONS} streams "
                              "(default max sessions)", measured, best >= DEFAULT_SESSIONS))
    section.notes += [
        "*turns failed*: `.failed` events, turns never ended, and turns the server split or merged (matched "
        "to the sent utterances by `audio_start_ms`). *stopped->done*: from `speech_stopped` to `.completed`, "
        "as the client sees them. *server cores*, *client cores*, *other cores*: CPU seconds per second of the "
        "server process, of the benchmark's clients and of everything else on the machine over the level. "
        "*send lag*: how late an append left against its real-time schedule (the clients keeping pace).",
        "The first delta cannot come before the turn's first piece is cut, once "
        f"{Settings.model_fields['realtime_segment_s'].default:g} s of it (with the prefix padding) has arrived; "
        "a shorter segment trades CPU for an earlier first delta.",
    ]
    errors = sorted({e for lv in results for e in lv.errors} | {f"{k} (.failed)" for lv in results for k in lv.failed})
    if errors:
        section.notes.append("Errors seen: " + "; ".join(f"`{e}`" for e in errors[:8]) + ".")
    if (busiest := max(results, key=lambda lv: lv.others, default=None)) and busiest.others > 0.25:
        section.notes.append(f"Other work on this shared machine took up to {busiest.others:.2f} cores in a level "
                             f"({busiest.streams} streams): the counts are what the server held beside it, a lower "
                             "bound for a machine of its own.")
    if any("overloaded" in lv.failed for lv in results):
        section.notes.append(f"`overloaded`: a turn's piece found the inference pool full ({POOL} places: "
                             "`VOXSWAP_INFERENCE_WORKERS` + `VOXSWAP_MAX_QUEUE`; each session queues one piece at "
                             "a time) and the whole turn failed. With more sessions than places, a backlog ends in "
                             "failed turns, not only slower ones.")
    section.data = {"best": best, "goal_s": GOAL_S, "seconds": seconds, "levels": {str(lv.streams): {
        "completed": lv.completed, "failed": lv.failed, "lost": lv.lost, "errors": lv.errors[:20],
        "final_p50": pct(lv.finalise, 50), "final_p95": pct(lv.finalise, 95), "final_max": max(lv.finalise, default=0),
        "after_stop_p50": pct(lv.after_stop, 50), "after_stop_p95": pct(lv.after_stop, 95),
        "first_delta_p50": pct(lv.first_delta, 50), "first_delta_p95": pct(lv.first_delta, 95),
        "server_cores": lv.server_cores, "client_cores": lv.client_cores, "other_cores": lv.others, "busy": lv.busy,
        "lag_p99": lv.lag_p99,
    } for lv in results}}
    return section


def main(argv: Sequence[str] | None = None) -> int:
    return standalone.main("streams", __doc__ or "", run, argv)


if __name__ == "__main__":
    sys.exit(main())
