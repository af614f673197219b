"""The model registry on disk: immutable versions, an atomic current/previous pointer, an audit log.

Layout (all under one root folder)::

    versions/<name>/            immutable once added; files are made read-only
        manifest.json           name, created_at, source, every file's size and sha256, smoke clips
    state.json                  {"current", "previous", "generation", ...}, replaced atomically
    history.jsonl               append-only: every add, promote, rollback, refusal and removal
                                (the events are server.vocab.HistoryEvent)
    .lock                       filelock guarding state.json and history.jsonl
    .staging/                   where ``add`` builds a version before one rename publishes it

The registry is the source of truth shared by the CLI, every server process and every worker: a
process learns about a promotion by noticing that ``state.json`` changed, never by being told.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import tarfile
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from filelock import FileLock

from server.errors import (
    Conflict,
    NotFound,
    RegistryError,
    UnexpectedCurrent,
    VerificationFailed,
    VoxswapError,
)
from server.vocab import AUDIO_SUFFIXES, HistoryEvent

NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MODEL_FILES = ("model_quant.onnx", "model.onnx")
SIDE_FILES = ("config.yaml", "am.mvn", "chn_jpn_yue_eng_ko_spectok.bpe.model")
MANIFEST = "manifest.json"
ANY_CURRENT: Any = object()  # "no expectation" for compare-and-swap: any current version will do


@dataclass(frozen=True)
class SmokeClip:
    """An audio file inside the version folder and the transcript it must produce."""

    audio: str
    text: str
    language: str = "auto"
    use_itn: bool = False


@dataclass(frozen=True)
class Manifest:
    name: str
    created_at: float
    source: str
    files: list[dict[str, Any]]
    smoke: list[SmokeClip]
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(int(f["size"]) for f in self.files)

    def model_file(self, prefer_quantized: bool = True) -> str:
        present = {f["path"] for f in self.files}
        order = MODEL_FILES if prefer_quantized else tuple(reversed(MODEL_FILES))
        return next(name for name in order if name in present)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["total_bytes"] = self.total_bytes
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        return cls(
            name=data["name"],
            created_at=float(data["created_at"]),
            source=data.get("source", ""),
            files=list(data["files"]),
            smoke=[SmokeClip(**clip) for clip in data.get("smoke", [])],
            metadata=dict(data.get("metadata", {})),
        )


@dataclass(frozen=True)
class RegistryState:
    current: str | None = None
    previous: str | None = None
    generation: int = 0
    updated_at: float = 0.0
    reason: str = ""
    held: bool = False  # an operator unloaded the model: every process stays unloaded until load

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def validate_name(name: str) -> str:
    """Version names become folder names: refuse anything that could escape ``versions/``."""
    if not NAME_RE.fullmatch(name) or set(name) == {"."}:
        raise RegistryError(
            f"invalid version name {name!r}: use 1-64 of A-Z a-z 0-9 . _ - (not only dots)",
            param="version",
        )
    return name


def check_model_folder(src: Path) -> None:
    """The files funasr-onnx needs; checked before anything is copied."""
    if not src.is_dir():
        raise RegistryError(f"{src} is not a folder")
    missing = [name for name in SIDE_FILES if not (src / name).is_file()]
    if not any((src / name).is_file() for name in MODEL_FILES):
        missing.append(" or ".join(MODEL_FILES))
    if missing:
        raise RegistryError(f"{src} is not a SenseVoice ONNX folder: missing {', '.join(missing)}")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
    with tmp.open("w") as fh:
        json.dump(data, fh, indent=2, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Registry:
    """Versions on disk. Safe to use from many processes at once: writes go through one file lock."""

    def __init__(self, root: Path, *, lock_timeout_s: float = 30.0):
        self.root = Path(root).absolute()
        self.versions_dir = self.root / "versions"
        self.state_path = self.root / "state.json"
        self.history_path = self.root / "history.jsonl"
        self.staging_dir = self.root / ".staging"
        self._lock = FileLock(str(self.root / ".lock"), timeout=lock_timeout_s)
        self._verified: dict[tuple[str, str], tuple[int, ...]] = {}

    @property
    def lock(self) -> FileLock:
        """The lock every writer of registry-wide files takes (re-entrant within a process)."""
        return self._lock

    # -- layout ---------------------------------------------------------------------------------

    def ensure(self) -> Registry:
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        self.staging_dir.mkdir(exist_ok=True)
        return self

    def is_empty(self) -> bool:
        return not self.versions_dir.is_dir() or not any(self.versions_dir.iterdir())

    def version_dir(self, name: str) -> Path:
        """The real, immutable path of a version (never a moving symlink: funasr-onnx caches by path)."""
        path = self.versions_dir / validate_name(name)
        if not (path / MANIFEST).is_file():
            raise NotFound(f"no version {name!r} in the registry", param="version")
        return path.resolve()

    # -- reading --------------------------------------------------------------------------------

    def state(self) -> RegistryState:
        try:
            data = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return RegistryState()
        return RegistryState(**{k: data.get(k) for k in RegistryState.__dataclass_fields__ if k in data})

    def state_signature(self) -> tuple[int, int, int] | None:
        """A cheap fingerprint of state.json: one stat, no read. Changes on every atomic replace."""
        try:
            st = self.state_path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def manifest(self, name: str) -> Manifest:
        path = self.version_dir(name) / MANIFEST
        return Manifest.from_json(json.loads(path.read_text()))

    def versions(self) -> list[Manifest]:
        if not self.versions_dir.is_dir():
            return []
        found = []
        for child in sorted(self.versions_dir.iterdir()):
            if (child / MANIFEST).is_file():
                found.append(Manifest.from_json(json.loads((child / MANIFEST).read_text())))
        return sorted(found, key=lambda m: m.created_at)

    def history(self, limit: int | None = None) -> list[dict[str, Any]]:
        try:
            lines = self.history_path.read_text().splitlines()
        except FileNotFoundError:
            return []
        events = [json.loads(line) for line in lines if line.strip()]
        return events[-limit:] if limit else events

    def verify(self, name: str) -> Manifest:
        """Every file's size and sha256 against the manifest; raise on the first mismatch.

        A file this process already hashed is not hashed again while its inode, size, mtime and
        ctime are unchanged: any write, chmod or touch moves ctime, and re-hashing a 900 MB model on
        every swap or rollback would take a core away from serving for about a second.
        """
        manifest = self.manifest(name)
        root = self.version_dir(name)
        for entry in manifest.files:
            path = root / entry["path"]
            try:
                st = path.stat()
            except FileNotFoundError:
                raise VerificationFailed(f"version {name!r}: {entry['path']} is missing") from None
            if not stat.S_ISREG(st.st_mode):
                raise VerificationFailed(f"version {name!r}: {entry['path']} is not a regular file")
            if st.st_size != entry["size"]:
                raise VerificationFailed(f"version {name!r}: {entry['path']} has the wrong size")
            key = (str(path), entry["sha256"])
            signature = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
            if self._verified.get(key) == signature:
                continue
            if sha256_file(path) != entry["sha256"]:
                raise VerificationFailed(f"version {name!r}: {entry['path']} fails its sha256 check")
            self._verified[key] = signature
        return manifest

    # -- writing --------------------------------------------------------------------------------

    def add(
        self,
        src: Path,
        name: str,
        *,
        smoke: Iterable[tuple[Path, str]] = (),
        source: str | None = None,
        metadata: dict[str, Any] | None = None,
        actor: str = "cli",
    ) -> Manifest:
        """Copy a model folder in as an immutable version. A crash leaves no half version behind."""
        validate_name(name)
        src = Path(src)
        check_model_folder(src)
        self.ensure()
        if (self.versions_dir / name).exists():
            raise Conflict(f"version {name!r} already exists; versions are immutable, pick a new name")
        staging = self.staging_dir / f"{name}.{uuid.uuid4().hex}"
        try:
            shutil.copytree(src, staging, ignore=shutil.ignore_patterns(MANIFEST, ".*"))
            clips = self._collect_smoke(staging, list(smoke))
            files = [
                {"path": rel, "size": (staging / rel).stat().st_size, "sha256": sha256_file(staging / rel)}
                for rel in sorted(_relative_files(staging))
            ]
            manifest = Manifest(
                name=name,
                created_at=time.time(),
                source=source if source is not None else str(src.absolute()),
                files=files,
                smoke=clips,
                metadata=metadata or {},
            )
            write_json_atomic(staging / MANIFEST, manifest.to_json())
            _make_read_only(staging)
            os.rename(staging, self.versions_dir / name)
            _fsync_dir(self.versions_dir)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if (self.versions_dir / name).exists():
                raise Conflict(f"version {name!r} already exists") from exc
            raise RegistryError(f"could not add version {name!r}: {exc.strerror or exc}") from exc
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self.record(HistoryEvent.ADD, version=name, actor=actor, outcome="success", bytes=manifest.total_bytes,
                    smoke_clips=len(clips))
        return manifest

    def add_archive(self, archive: Path, name: str, *, actor: str = "api") -> Manifest:
        """Add a version uploaded as a tar.gz of its folder; a manifest inside must match on arrival.

        Only regular files and folders are unpacked, and every path the sent manifest names must
        stay inside the upload: an archive must not make the server read or link its own files.
        """
        validate_name(name)
        self.ensure()
        unpack = self.staging_dir / f"upload.{uuid.uuid4().hex}"
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = tar.getmembers()
                odd = [m.name for m in members if not (m.isfile() or m.isdir())]
                if odd:
                    raise RegistryError(f"upload may hold only files and folders, not links or devices: {odd[0]}")
                unpack.mkdir(parents=True)
                tar.extractall(unpack, members=members, filter="data")
            roots = list(unpack.iterdir())
            folder = roots[0] if len(roots) == 1 and roots[0].is_dir() else unpack
            expected = folder / MANIFEST
            sent: Manifest | None = None
            if expected.is_file():
                sent = Manifest.from_json(json.loads(expected.read_text()))
                for entry in sent.files:
                    path = _inside(folder, entry["path"])
                    if not path.is_file() or sha256_file(path) != entry["sha256"]:
                        raise VerificationFailed(f"upload: {entry['path']} does not match its checksum")
            smoke = []
            for clip in sent.smoke if sent else []:
                path = _inside(folder, clip.audio)
                if not (clip.audio.startswith("smoke/") and _is_folder_clip(path)):  # add finds those itself
                    smoke.append((path, clip.text))
            return self.add(folder, name, smoke=smoke, source=sent.source if sent else "upload",
                            metadata=sent.metadata if sent else {}, actor=actor)
        except (tarfile.TarError, ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
            raise RegistryError(f"upload is not a readable tar.gz of a version folder: {exc}") from exc
        finally:
            shutil.rmtree(unpack, ignore_errors=True)

    def _collect_smoke(self, staging: Path, extra: list[tuple[Path, str]]) -> list[SmokeClip]:
        """Smoke clips from the folder's ``smoke/`` (``x.wav`` + ``x.txt``) and from the caller."""
        smoke_dir = staging / "smoke"
        for i, (audio, text) in enumerate(extra):
            smoke_dir.mkdir(exist_ok=True)
            target = smoke_dir / f"given-{i}{Path(audio).suffix or '.wav'}"
            shutil.copyfile(audio, target)
            target.with_suffix(".txt").write_text(text.strip() + "\n")
        clips = []
        if smoke_dir.is_dir():
            for clip in sorted(smoke_dir.iterdir()):
                if _is_folder_clip(clip):
                    _check_clip(clip)
                    clips.append(SmokeClip(audio=f"smoke/{clip.name}",
                                           text=clip.with_suffix(".txt").read_text().strip()))
        return clips

    def promote(
        self,
        name: str,
        *,
        expected_current: str | None = ANY_CURRENT,
        actor: str = "cli",
        event: HistoryEvent = HistoryEvent.PROMOTE,
        details: dict[str, Any] | None = None,
    ) -> RegistryState:
        """Make ``name`` current (the old current becomes previous), compare-and-swap style."""
        with self._lock:
            self.manifest(name)  # under the lock: a concurrent remove cannot leave current dangling
            state = self.state()
            if expected_current is not ANY_CURRENT and state.current != expected_current:
                raise UnexpectedCurrent(
                    f"current version is {state.current!r}, not {expected_current!r}; nothing changed"
                )
            previous = state.current if state.current != name else state.previous
            new = RegistryState(current=name, previous=previous, generation=state.generation + 1,
                                updated_at=time.time(), reason=event)
            write_json_atomic(self.state_path, new.to_json())
            self._append_history(event, version=name, from_version=state.current, actor=actor,
                                 outcome="success", generation=new.generation, **(details or {}))
        return new

    def set_held(self, held: bool, *, actor: str = "api") -> RegistryState:
        """Unload (held) or load back the model in every process that follows this registry."""
        with self._lock:
            state = self.state()
            if state.held == held:
                return state
            new = replace(state, held=held, generation=state.generation + 1, updated_at=time.time(),
                          reason="unload" if held else "load")
            write_json_atomic(self.state_path, new.to_json())
            self._append_history(HistoryEvent.UNLOAD if held else HistoryEvent.LOAD, version=state.current,
                                 actor=actor, outcome="success", generation=new.generation)
        return new

    def rollback_target(self) -> str:
        state = self.state()
        if not state.previous:
            raise Conflict("there is no previous version to roll back to")
        return state.previous

    def revert(self, refused: str, *, to: str | None, reason: str, actor: str = "server") -> RegistryState:
        """Take a version a server refused back out of ``current``, so a restart never loads it."""
        with self._lock:
            state = self.state()
            if state.current != refused:
                return state
            new = RegistryState(current=to, previous=state.previous if state.previous != to else None,
                                generation=state.generation + 1, updated_at=time.time(), reason="refused",
                                held=state.held)
            write_json_atomic(self.state_path, new.to_json())
            self._append_history(HistoryEvent.REFUSED, version=refused, to_version=to, actor=actor,
                                 outcome="reverted", reason=reason, generation=new.generation)
        return new

    def remove(self, name: str, *, actor: str = "cli") -> None:
        path = self.version_dir(name)
        with self._lock:
            state = self.state()
            if name in (state.current, state.previous):
                which = "current" if name == state.current else "previous"
                raise Conflict(f"version {name!r} is the {which} version and cannot be removed")
            trash = self.staging_dir / f"removing.{name}.{uuid.uuid4().hex}"
            os.rename(path, trash)  # one rename: the version vanishes at once, never half-deleted
            self._append_history(HistoryEvent.REMOVE, version=name, actor=actor, outcome="success")
        _make_writable(trash)
        shutil.rmtree(trash, ignore_errors=True)

    def record(self, event: HistoryEvent, **fields: Any) -> None:
        with self._lock:
            self._append_history(event, **fields)

    def _append_history(self, event: HistoryEvent, **fields: Any) -> None:
        line = json.dumps({"ts": time.time(), "event": event, **fields}, sort_keys=True)
        fd = os.open(self.history_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def clean_staging(self, *, older_than_s: float = 0.0) -> list[str]:
        """Remove what an interrupted ``add``, upload or ``remove`` left behind (model-sized copies).

        ``older_than_s`` spares folders touched more recently, which an ``add`` running in another
        process may still be filling; with 0, call it only when no add can be running.
        """
        removed = []
        if self.staging_dir.is_dir():
            cutoff = time.time() - older_than_s
            for leftover in self.staging_dir.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    if older_than_s and leftover.stat().st_mtime > cutoff:
                        continue
                    _make_writable(leftover)
                    shutil.rmtree(leftover, ignore_errors=True)
                    removed.append(leftover.name)
        return removed

    def export_archive(self, name: str, out: Path) -> Path:
        """A tar.gz of a version folder, manifest included, as ``POST /admin/model/versions`` takes."""
        root = self.version_dir(name)
        with tarfile.open(out, "w:gz") as tar:
            tar.add(root, arcname=name)
        return out


def _is_folder_clip(path: Path) -> bool:
    """A golden clip in a version folder's ``smoke/``: audio with its transcript beside it."""
    return path.suffix.lower() in AUDIO_SUFFIXES and path.with_suffix(".txt").is_file()


def _check_clip(path: Path) -> None:
    """A golden clip that does not decode would only be found at promote time: refuse it at add."""
    from server.speech import audio

    try:
        audio.decode(path.read_bytes(), max_seconds=3600)
    except VoxswapError as exc:
        raise RegistryError(f"smoke clip {path.name}: {exc.message}", param="smoke_audio") from exc


def _inside(folder: Path, relative: str) -> Path:
    """``folder / relative``, refused if it would leave ``folder`` (absolute, ``..``, links)."""
    path = (folder / relative).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise RegistryError(f"upload: manifest path {relative!r} leaves the version folder")
    return path


def _relative_files(root: Path) -> Iterator[str]:
    for path in root.rglob("*"):
        if path.is_file():
            yield path.relative_to(root).as_posix()


def _make_read_only(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            path.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)


def _make_writable(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        with contextlib.suppress(OSError):
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
