"""Files that must survive a crash: atomic replaces, and work folders owned by a living process.

Whether something on disk is still being written is decided by a lock, never by its age: an
``flock`` is held by the process that owns the file or folder for as long as it works on it, and
the kernel releases it when that process ends, even by SIGKILL. Age lies both ways: ``copytree``
gives a staging folder its source's old modification time (so a live add looked abandoned), and a
crash a minute ago leaves a folder that looks fresh for an hour.

Two kinds of things are owned this way:

``.<name>.<pid>.<uuid>.tmp`` (beside ``<name>``)
    the temporary file of an atomic replace, locked by its writer from creation until the rename.
    One that can be locked is orphaned: its writer died before renaming it.
``<work>`` with ``<work>.lock`` beside it
    a work folder (a version being staged, an upload, a version being deleted). The lock file is
    created and locked *before* the folder exists and removed only *after* the folder is gone, so
    a folder whose lock can be taken, or that has no lock file at all (left by an older release),
    belongs to nobody. The lock sits beside the folder, not inside it, so a staged version is
    published by one rename with nothing to take out of it first.

Creating a lock file and locking it are two steps; a cleaner that takes the lock in between removes
the file. The creator notices (the file it locked has no name left) and creates it again, so the
cleaner and the owner can never both believe they own the same thing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import stat
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

LOCK_SUFFIX = ".lock"
TMP_GLOB = ".*.tmp"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def stat_signature(path: Path) -> list[int]:
    """What changes whenever a file's bytes may have: device, inode, size, mtime and ctime (no write,
    chmod, touch or copy keeps ctime, and ctime cannot be set back)."""
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class HashCheck:
    """Whether files have the size and sha256 a record gives them, each file hashed once while its
    stat signature stays the same: re-hashing a 900 MB model on every swap or rollback would take
    a core away from serving for about two seconds. Safe to share between threads."""

    def __init__(self) -> None:
        self._hashed: dict[tuple[str, str], list[int]] = {}  # (path, sha256) -> stat signature
        self._lock = threading.Lock()

    def problem(self, path: Path, size: int, sha256: str, *, hashed_at: list[int] | None = None) -> str:
        """"" when ``path`` matches, else what is wrong with it ("is missing", ...). ``hashed_at``: the
        signature the file had when its writer hashed it (then unchanged means unchanged since)."""
        try:
            st = path.stat()
        except FileNotFoundError:
            return "is missing"
        if not stat.S_ISREG(st.st_mode):
            return "is not a regular file"
        if st.st_size != size:
            return "has the wrong size"
        key = (str(path), sha256)
        signature = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        with self._lock:
            if signature in (self._hashed.get(key), hashed_at):
                return ""
        if sha256_file(path) != sha256:
            return "fails its sha256 check"
        with self._lock:
            self._hashed[key] = signature
        return ""


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- atomic replace -------------------------------------------------------------------------------


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` with ``data`` so that a reader sees the old or the new file, never a torn one,
    and a crash at any point leaves one of them (durable: the file and its folder are fsynced)."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n", durable=True)


def write_text_atomic(path: Path, text: str, *, durable: bool = True) -> None:
    """Replace ``path`` with ``text`` (see :func:`atomic_replace`)."""
    with atomic_replace(path, durable=durable) as fh:
        fh.write(text)


@contextmanager
def atomic_replace(path: Path, *, durable: bool = True) -> Iterator[IO[str]]:
    """A file to write the new ``path`` into: a temporary file beside it, locked by this process
    from its creation until it is renamed over ``path`` at the end of the block (dropped if the
    block raises). Raises FileNotFoundError when the folder vanished (a job deleted under its
    worker). ``durable`` fsyncs the file before the rename and the folder after it.
    """
    fd, tmp = _create_locked(lambda: path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"))
    try:
        with os.fdopen(os.dup(fd), "w", encoding="utf-8") as fh:
            yield fh
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    finally:
        os.close(fd)  # releases the lock, after the rename: the temporary name is gone by then
    if durable:
        fsync_dir(path.parent)


def remove_orphaned_tmp(folder: Path) -> list[str]:
    """Remove the temporary files of atomic replaces in ``folder`` whose writer is gone."""
    removed = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for tmp in folder.glob(TMP_GLOB):
            with _unowned(tmp) as orphaned:
                if orphaned:
                    tmp.unlink(missing_ok=True)
                    removed.append(tmp.name)
    return removed


# -- owned work folders ---------------------------------------------------------------------------


@contextmanager
def owned_folder(path: Path, *, create: bool = True) -> Iterator[Path]:
    """Own the work folder ``path`` for the block; whatever is left at ``path`` is removed after.

    ``path`` must not exist yet. With ``create`` it is made empty; without, the caller puts
    something there itself (``Registry.remove`` renames a version into it).
    """
    lock_path = path.with_name(path.name + LOCK_SUFFIX)
    fd, _ = _create_locked(lambda: lock_path)
    try:
        if create:
            path.mkdir()
        yield path
    finally:
        remove_tree(path)
        lock_path.unlink(missing_ok=True)
        os.close(fd)


def remove_unowned(parent: Path) -> list[str]:
    """Remove every work folder under ``parent`` that no living process owns, and stray lock files.

    Safe at any time, from any process: a folder whose owner still runs is never touched.
    """
    removed: list[str] = []
    try:
        entries = sorted(parent.iterdir())
    except FileNotFoundError:
        return removed
    for entry in entries:
        if entry.name.endswith(LOCK_SUFFIX):
            continue
        lock_path = entry.with_name(entry.name + LOCK_SUFFIX)
        with _unowned(lock_path, missing_means_unowned=True) as orphaned:
            if orphaned:
                if remove_tree(entry):  # (not if its owner just published it and let go)
                    removed.append(entry.name)
                lock_path.unlink(missing_ok=True)  # after the folder: never a folder without its lock
    for lock_path in parent.glob("*" + LOCK_SUFFIX):
        if lock_path.with_name(lock_path.name[: -len(LOCK_SUFFIX)]).exists():
            continue  # its folder was judged above (and is alive)
        with _unowned(lock_path) as orphaned:
            if orphaned:
                lock_path.unlink(missing_ok=True)  # an owner that died after removing its folder
    return removed


# -- the locking protocol -------------------------------------------------------------------------


def _create_locked(name: Callable[[], Path]) -> tuple[int, Path]:
    """Create a new file (``name()`` gives its path), lock it, and make sure it still has its name.

    A cleaner may take the lock between our create and our flock, and remove the file: then the
    file we locked has no link left, and we start again.
    """
    while True:
        path = name()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink > 0:
                return fd, path
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        os.close(fd)


@contextmanager
def _unowned(path: Path, *, missing_means_unowned: bool = False) -> Iterator[bool]:
    """True when nobody holds the lock on ``path``; we then hold it for the block.

    The lock counts only while ``path`` still names the file we locked: a file renamed or removed
    meanwhile is not ours to judge.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        yield missing_means_unowned
        return
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            same = os.path.samestat(os.stat(path), os.fstat(fd))
        except FileNotFoundError:
            same = False
        yield same
    finally:
        os.close(fd)


def remove_tree(path: Path) -> bool:
    """Remove a file or folder, read-only files (a staged or removed version) included; False when
    there was nothing to remove."""
    if path.is_dir() and not path.is_symlink():
        make_writable(path)
        shutil.rmtree(path, ignore_errors=True)
        return True
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


READ_ONLY = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH


def make_read_only(root: Path) -> None:
    """Every file under ``root`` read-only; one that already is keeps its ctime (a chmod moves it,
    and a file's stat signature is how its checksum is trusted without hashing: see HashCheck)."""
    for path in root.rglob("*"):
        if path.is_file() and stat.S_IMODE(path.stat().st_mode) != READ_ONLY:
            path.chmod(READ_ONLY)


def make_writable(root: Path) -> None:
    for path in [root, *root.rglob("*")]:
        with contextlib.suppress(OSError):
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
