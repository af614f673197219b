"""``voxswap transcribe``: a thin HTTP client of a running server, for one file or a thousand.

One file is transcribed at once (``POST /api/transcribe``) and printed, or written to ``--out``.
Several files, or a folder, become batch jobs (``POST /api/jobs``): they survive a server restart,
run without holding this terminal's connection open, and each result is written to
``--out/<stem>.<ext>`` as soon as it is done. Progress goes to stderr, results to files or stdout.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from server.speech.formats import cues, to_srt, to_vtt
from server.vocab import AUDIO_SUFFIXES
from server.vocab import FINISHED_JOB_STATUSES as FINISHED

FORMATS = ("txt", "srt", "vtt", "json")


class ClientError(Exception):
    """Something the user must fix or know (bad path, server unreachable, a refused request)."""


@dataclass
class Options:
    server: str = "http://127.0.0.1:7860"
    fmt: str = "txt"
    out: Path | None = None
    language: str = "auto"
    use_itn: bool = False
    model: str = ""  # a model, NAME@VERSION or pipeline name; "" for the server's default model
    poll_s: float = 0.5
    timeout_s: float = 600.0


@dataclass
class Item:
    """One input file on its way through the batch."""

    path: Path
    target: Path
    job_id: str | None = None
    status: str = "local"
    error: str | None = None


@dataclass
class Progress:
    """One line on stderr: rewritten in place on a terminal, printed on change otherwise."""

    stream: IO[str]
    total: int
    last: str = ""
    tty: bool = field(init=False)

    def __post_init__(self) -> None:
        self.tty = self.stream.isatty()

    def show(self, items: Sequence[Item]) -> None:
        done = sum(i.status in FINISHED or i.status == "refused" for i in items)
        running = sum(i.status == "running" for i in items)
        failed = sum(i.status in ("failed", "cancelled", "refused") for i in items)
        width = 24
        filled = round(width * done / self.total) if self.total else width
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} done, {running} running"
                + (f", {failed} failed" if failed else ""))
        if line == self.last:
            return
        self.last = line
        if self.tty:
            self.stream.write("\r" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def end(self) -> None:
        if self.tty and self.last:
            self.stream.write("\n")
            self.stream.flush()


def collect(paths: Iterable[Path]) -> list[Path]:
    """Files as given, and the audio files under each folder (sorted, recursively)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*")
                            if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES and not p.name.startswith("."))
        elif path.suffix.lower() == ".zip":
            raise ClientError(f"{path}: this client writes one result per file; unzip it and pass the folder")
        elif path.is_file():
            files.append(path)
        else:
            raise ClientError(f"{path}: no such file or folder")
    return files


def targets(files: Sequence[Path], out: Path, ext: str) -> list[Path]:
    """``out/<stem>.<ext>`` for each file; a name already taken gets ``-2``, ``-3``... in input order,
    so ``a.wav``, ``x/a.wav`` and ``a-2.wav`` never write to the same result."""
    taken: set[str] = set()
    result = []
    for path in files:
        name, n = f"{path.stem}.{ext}", 1
        while name in taken:
            n += 1
            name = f"{path.stem}-{n}.{ext}"
        taken.add(name)
        result.append(out / name)
    return result


def render(result: dict[str, Any], fmt: str) -> str:
    """A transcription JSON (as /api/transcribe returns it) in the asked format."""
    if fmt == "json":
        return json.dumps(result, indent=2, ensure_ascii=False) + "\n"
    if fmt == "srt":
        return to_srt(cues(result["segments"]))
    if fmt == "vtt":
        return to_vtt(cues(result["segments"]))
    return str(result["text"]) + "\n"


def _raise_for(response: httpx.Response, what: str) -> None:
    if response.is_success:
        return
    try:
        error = response.json()["error"]
        reason = f"{error['message']} ({error['code']})"
    except (ValueError, KeyError, TypeError):
        reason = response.text[:200] or response.reason_phrase
    raise ClientError(f"{what}: HTTP {response.status_code}: {reason}")


def _refuses_the_model(response: httpx.Response) -> bool:
    """A 404 or 400 about ``--model``: every file would be refused alike, so the batch stops."""
    if response.status_code not in (400, 404):
        return False
    try:
        return bool(response.json()["error"]["param"] == "model")
    except (ValueError, KeyError, TypeError):
        return False


def run(paths: Sequence[Path], options: Options, *, stdout: IO[str] = sys.stdout,
        stderr: IO[str] = sys.stderr) -> int:
    """The ``transcribe`` command; returns the exit status (0 all done, 1 some failed, 2 usage)."""
    if options.fmt not in FORMATS:
        raise ClientError(f"--format must be one of {', '.join(FORMATS)}")
    files = collect(paths)
    if not files:
        raise ClientError("no audio files found in " + ", ".join(str(p) for p in paths))
    single = len(files) == 1 and not any(p.is_dir() for p in paths)
    if not single and options.out is None:
        print(f"error: {len(files)} files: give --out DIR to write one result per file", file=stderr)
        return 2
    base = options.server.rstrip("/")
    try:
        with httpx.Client(base_url=base, timeout=options.timeout_s) as client:
            if single:
                return _one(client, files[0], options, stdout)
            assert options.out is not None
            return _batch(client, files, options.out, options, stderr)
    except httpx.TransportError as exc:
        raise ClientError(f"cannot reach the server at {base}: {exc}") from exc


def _form(options: Options) -> dict[str, str]:
    form = {"language": options.language, "use_itn": "true" if options.use_itn else "false"}
    return {**form, "model": options.model} if options.model else form


def _one(client: httpx.Client, path: Path, options: Options, stdout: IO[str]) -> int:
    with path.open("rb") as fh:
        response = client.post("/api/transcribe", files={"file": (path.name, fh)}, data=_form(options))
    _raise_for(response, str(path))
    text = render(response.json(), options.fmt)
    if options.out is None:
        stdout.write(text)
        stdout.flush()
    else:
        options.out.mkdir(parents=True, exist_ok=True)
        [target] = targets([path], options.out, options.fmt)
        target.write_text(text, encoding="utf-8")
    return 0


def _batch(client: httpx.Client, files: Sequence[Path], out: Path, options: Options, stderr: IO[str]) -> int:
    out.mkdir(parents=True, exist_ok=True)
    items = [Item(path, target) for path, target in zip(files, targets(files, out, options.fmt), strict=True)]
    progress = Progress(stderr, len(items))
    try:
        for item in items:
            _submit(client, item, options)
            progress.show(items)
        while True:
            _poll(client, items, options.fmt)
            progress.show(items)
            if all(i.status in (*FINISHED, "refused") for i in items):
                break
            time.sleep(options.poll_s)
    except KeyboardInterrupt:
        progress.end()
        waiting = [i.job_id for i in items if i.job_id and i.status not in FINISHED]
        print(f"interrupted; {len(waiting)} job(s) keep running on the server: {' '.join(waiting)}", file=stderr)
        return 130
    progress.end()
    failed = [i for i in items if i.status != "completed"]
    for item in failed:
        print(f"failed: {item.path}: {item.error or item.status}", file=stderr)
    print(f"{len(items) - len(failed)} of {len(items)} transcribed into {out}", file=stderr)
    return 1 if failed else 0


def _submit(client: httpx.Client, item: Item, options: Options) -> None:
    with item.path.open("rb") as fh:
        response = client.post("/api/jobs", files=[("files", (item.path.name, fh))], data=_form(options))
    if _refuses_the_model(response):
        _raise_for(response, f"--model {options.model!r}")
    try:
        _raise_for(response, "submit")
    except ClientError as exc:  # this file is refused (too big, empty); the others go on
        item.status, item.error = "refused", str(exc).removeprefix("submit: ")
        return
    [job] = response.json()["jobs"]
    item.job_id, item.status = job["id"], job["status"]


def _poll(client: httpx.Client, items: Sequence[Item], fmt: str) -> None:
    """Look at unfinished jobs in submission order, stopping at the first still waiting: jobs run
    oldest first, so the ones after it are waiting too (they are looked at on a later round)."""
    for item in items:
        if item.job_id is None or item.status in FINISHED:
            continue
        response = client.get(f"/api/jobs/{item.job_id}")
        _raise_for(response, str(item.path))
        job = response.json()
        if job["status"] == "completed":
            result = client.get(f"/api/jobs/{item.job_id}/result", params={"format": fmt})
            _raise_for(result, str(item.path))
            item.target.write_text(render(result.json(), fmt) if fmt == "json" else result.text, encoding="utf-8")
        item.status, item.error = job["status"], job.get("error")
        if item.status == "pending":
            return
