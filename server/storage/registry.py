"""The model registry on disk: immutable versions, an atomic current/previous pointer, an audit log.

Layout (all under one root folder)::

    versions/<name>/            immutable once added; files are made read-only
        manifest.json           name, created_at, source, every file's size and sha256, smoke clips
        prepared/               graphs optimised for a host, derived from the originals (see
                                server.storage.prepared): never verified here, made again if damaged
    state.json                  {"current", "previous", "generation", ...}, replaced atomically
    history.jsonl               append-only: every add, promote, rollback, refusal and removal
                                (the events are server.vocab.HistoryEvent), each naming its model
    model.json                  {"name", "kind"}: written when a named model is created; the
                                registry root of earlier releases has none (its kind is its
                                versions')
    .lock                       filelock guarding state.json and history.jsonl
    .staging/<work>[.lock]      where ``add`` builds a version before one rename publishes it, an
                                upload is unpacked, a removed version is deleted; each folder is
                                owned through the flock on its ``.lock`` (server.storage.files)

The registry is the source of truth shared by the CLI, every server process and every worker: a
process learns about a promotion by noticing that ``state.json`` changed, never by being told.

One :class:`Registry` is one named model. The root folder is the default model's (the layout of
earlier releases, read in place); every other model is a registry of the same layout under
``models/NAME/`` (see :mod:`server.storage.catalog`).
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import time
import uuid
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from filelock import FileLock

from server.errors import (
    Conflict,
    NotFound,
    RegistryError,
    UnexpectedCurrent,
    VerificationFailed,
)
from server.storage import goldens, prepared
from server.storage.archive import unpack_version
from server.storage.files import (
    HashCheck,
    fsync_dir,
    make_read_only,
    owned_folder,
    remove_orphaned_tmp,
    remove_unowned,
    sha256_file,
    write_json_atomic,
)
from server.storage.manifest import (
    MANIFEST,
    Manifest,
    SmokeClip,
    check_model_folder,
    detect_kind,
    is_generated,
    parse_kind,
    relative_files,
    validate_name,
    validate_new_name,
)
from server.storage.prepared import GraphMaker
from server.vocab import HistoryEvent, ModelKind

ANY_CURRENT: Any = object()  # "no expectation" for compare-and-swap: any current version will do


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


class Registry:
    """The versions of one model on disk. Safe to use from many processes at once: writes go
    through one file lock."""

    MODEL_FILE = "model.json"

    def __init__(self, root: Path, *, model: str = "sensevoice", lock_timeout_s: float = 30.0):
        self.root = Path(root).absolute()
        self.model = model
        self.versions_dir = self.root / "versions"
        self.state_path = self.root / "state.json"
        self.history_path = self.root / "history.jsonl"
        self.staging_dir = self.root / ".staging"
        self._lock = FileLock(str(self.root / ".lock"), timeout=lock_timeout_s)
        self._checks = HashCheck()
        # how add prepares graphs for this host (server.storage.prepared): storage cannot use the
        # engines, so a layer that can sets it (the CLI's add passes one, a server's builder sets it)
        self.preparer: GraphMaker | None = None

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

    def kind(self) -> ModelKind | None:
        """What kind of model this is: as created, else as its versions say; None while empty."""
        try:
            return parse_kind(json.loads((self.root / self.MODEL_FILE).read_text())["kind"])
        except FileNotFoundError:
            pass
        versions = self.versions()
        return parse_kind(versions[0].kind) if versions else None

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
        """The last ``limit`` events, each naming this model (lines earlier releases wrote do not)."""
        try:
            lines = self.history_path.read_text().splitlines()
        except FileNotFoundError:
            return []
        events = [{"model": self.model, **json.loads(line)} for line in lines if line.strip()]
        return events[-limit:] if limit else events

    def verify(self, name: str) -> Manifest:
        """Every original file's size and sha256 against the manifest; raise on the first mismatch.
        A file this process hashed before is not hashed again while unchanged (see HashCheck).
        Prepared graphs are not checked here: a load checks the ones it uses, and falls back."""
        manifest = self.manifest(name)
        root = self.version_dir(name)
        for entry in manifest.files:
            problem = self._checks.problem(root / entry["path"], int(entry["size"]), entry["sha256"])
            if problem:
                raise VerificationFailed(f"version {name!r}: {entry['path']} {problem}")
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
        kind: str | None = None,
        prepare: GraphMaker | None = None,
    ) -> Manifest:
        """Copy a model folder in as an immutable version. A crash leaves no half version behind.

        ``smoke`` adds golden clips: pairs of an input file and what the version must answer to it
        (a transcript; for ct-punc the file is text and the answer punctuated text; for fsmn-vad
        the answer is the segments as JSON). The folder's kind is ``kind`` when given (its files are
        checked for it), else detected from its files; a model holds one kind, so a version of another
        kind is refused here. With ``prepare`` (else :attr:`preparer`) the graphs this host loads are
        prepared beside the originals (a ``prepared/`` folder sent along is never copied: a graph made
        elsewhere is not trusted here); a failure to prepare leaves the version without them.
        The copy is built in a folder of ``.staging`` this process owns (see :meth:`work_folder`),
        so a process killed mid-copy leaves nothing that a later :meth:`clean_staging` would spare.
        """
        validate_new_name(name)
        src = Path(src)
        if kind is None:
            found = detect_kind(src)
        else:
            found = parse_kind(kind)
            check_model_folder(src, found)
        held = self.kind()
        if held is not None and held != found:
            raise RegistryError(f"model {self.model!r} holds {held} versions; a {found} version cannot be added "
                                "to it (add it to a model of that kind: --model NAME)", param="kind")
        self.ensure()
        if (self.versions_dir / name).exists():
            raise Conflict(f"version {name!r} already exists; versions are immutable, pick a new name")
        self.clean_staging()  # a killed add's model-sized copy goes now, not at the next server start
        try:
            with self.work_folder(name) as staging:
                shutil.copytree(src, staging, ignore=prepared.originals_only(src), dirs_exist_ok=True)
                clips = self._collect_smoke(staging, list(smoke), found)
                files = [
                    {"path": rel, "size": (staging / rel).stat().st_size, "sha256": sha256_file(staging / rel)}
                    for rel in sorted(relative_files(staging))
                ]
                manifest = Manifest(
                    name=name,
                    created_at=time.time(),
                    source=source if source is not None else str(src.absolute()),
                    files=files,
                    smoke=clips,
                    metadata={**({"generated": True} if is_generated(staging) else {}), **(metadata or {})},
                    kind=found,
                )
                manifest = prepared.prepare_added(staging, manifest, prepare or self.preparer, model=self.model)
                write_json_atomic(staging / MANIFEST, manifest.to_file())
                make_read_only(staging)
                os.rename(staging, self.versions_dir / name)
                fsync_dir(self.versions_dir)
        except OSError as exc:
            if (self.versions_dir / name).exists():
                raise Conflict(f"version {name!r} already exists") from exc
            raise RegistryError(f"could not add version {name!r}: {exc.strerror or exc}") from exc
        self.record(HistoryEvent.ADD, version=name, actor=actor, outcome="success", bytes=manifest.total_bytes,
                    smoke_clips=len(clips), prepared_graphs=len(manifest.prepared))
        return manifest

    def add_archive(self, archive: Path, name: str, *, actor: str = "api", kind: str | None = None) -> Manifest:
        """Add a version uploaded as a tar.gz of its folder; a manifest inside must match on arrival.

        Only regular files and folders are unpacked, and every path the sent manifest names must
        stay inside the upload: an archive must not make the server read or link its own files.
        """
        validate_new_name(name)
        self.ensure()
        with self.work_folder("upload") as unpack:
            version = unpack_version(archive, unpack)
            return self.add(version.folder, name, smoke=version.smoke, source=version.source,
                            metadata=version.metadata, actor=actor, kind=kind)

    def work_folder(self, kind: str) -> AbstractContextManager[Path]:
        """A new empty folder under ``.staging``, owned by this process for the block and removed
        after it. A process killed while it holds one loses the ownership with its life, and the
        folder is then removed by :meth:`clean_staging`, however recently it was written."""
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        return owned_folder(self.staging_dir / f"{kind}.{uuid.uuid4().hex}")

    def _collect_smoke(self, staging: Path, extra: list[tuple[Path, str]], kind: ModelKind) -> list[SmokeClip]:
        """Golden clips from the folder's ``smoke/`` and from the caller, in ``kind``'s form (see
        :mod:`server.storage.goldens`): ``extra`` pairs an input file with what it must give."""
        smoke_dir = staging / "smoke"
        for i, (source, expected) in enumerate(extra):
            goldens.write_given(smoke_dir, i, source, expected, kind)
        return goldens.scan(smoke_dir, kind)

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

    def remove(self, name: str, *, actor: str = "cli", guard: Callable[[], None] | None = None) -> None:
        """Delete a version that is neither current nor previous.

        ``guard`` runs under the registry lock just before the version goes, and raises to keep it:
        a server refuses to remove a version its workers are rolling out (rollouts are claimed under
        the same lock, so none can begin between the guard and the rename).
        """
        self.version_dir(name)  # 404 before anything is created
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        trash = self.staging_dir / f"removing.{name}.{uuid.uuid4().hex}"
        with owned_folder(trash, create=False), self._lock:
            path = self.version_dir(name)  # again under the lock: a concurrent remove may have won
            state = self.state()
            if name in (state.current, state.previous):
                which = "current" if name == state.current else "previous"
                raise Conflict(f"version {name!r} is the {which} version and cannot be removed")
            if guard is not None:
                guard()
            os.rename(path, trash)  # one rename: the version vanishes at once, never half-deleted
            self._append_history(HistoryEvent.REMOVE, version=name, actor=actor, outcome="success")
        # leaving the block deleted the files; a crash before that leaves an unowned folder behind

    def record(self, event: HistoryEvent, **fields: Any) -> None:
        with self._lock:
            self._append_history(event, **fields)

    def _append_history(self, event: HistoryEvent, **fields: Any) -> None:
        line = json.dumps({"ts": time.time(), "event": event, "model": self.model, **fields}, sort_keys=True)
        fd = os.open(self.history_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)

    def clean_staging(self) -> list[str]:
        """Remove what an interrupted ``add``, upload or ``remove`` left behind (model-sized copies).

        Ownership decides, not age: a folder whose process still runs is never touched, so this is
        safe at any time. A folder without its ``.lock`` (left by an older release) counts as left.
        """
        return remove_unowned(self.staging_dir)

    def clean_leftovers(self) -> list[str]:
        """Everything a crash can leave in the registry: unowned staging folders, and the temporary
        files of atomic replaces (state.json, rollout.json, watch.json, heartbeats) whose writer died
        before renaming them. Returns the paths removed, relative to the root."""
        removed = [f".staging/{name}" for name in self.clean_staging()]
        removed += remove_orphaned_tmp(self.root)
        removed += [f"workers/{name}" for name in remove_orphaned_tmp(self.root / "workers")]
        return removed

    def export_archive(self, name: str, out: Path) -> Path:
        """A tar.gz of a version folder, manifest included, as ``POST /admin/model/versions`` takes."""
        root = self.version_dir(name)
        skip = root / prepared.PREPARED_DIR  # made for this host: the receiving one prepares its own
        with tarfile.open(out, "w:gz") as tar:
            tar.add(root, arcname=name, filter=lambda m: None if Path(root.parent, m.name).is_relative_to(skip) else m)
        return out

