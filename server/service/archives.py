"""Zips of recordings, judged from their directory before a byte of them is unpacked.

A zip states in its end record how many entries its central directory holds and how large that
directory is, and in the directory how large each entry unpacks. ``zipfile`` never inflates an entry
past its stated size (and checks its CRC), so these numbers bound what extracting can write. A zip
bomb (a few hundred kB of deflated silence that unpack to 200 MB), a zip of a million empty entries
(whose directory alone costs hundreds of MB to parse) and a zip that would unpack past what one
submission may write are refused here, with the reason, before anything reaches the data dir.
"""

from __future__ import annotations

import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import IO

from server.errors import InvalidRequest, PayloadTooLarge
from server.settings import Settings
from server.vocab import AUDIO_SUFFIXES

DIRECTORY_BYTES_PER_ENTRY = 1024  # 46 bytes of header, a name, extra fields: generous for real zips
RATIO_GRACE_BYTES = 1024 * 1024  # the first MB unpacked is never a bomb: small silent clips deflate well
_END = struct.Struct("<4s4H2LH")  # end of central directory record
_END64_LOCATOR = struct.Struct("<4sLQL")
_END64 = struct.Struct("<4sQ2H2L4Q")


@dataclass(frozen=True)
class ZipLimits:
    max_entries: int  # in all the zips of one submission, folders and skipped files included
    max_unpacked_bytes: int  # the recordings of all the zips of one submission
    max_ratio: float  # unpacked / compressed bytes of one zip's recordings
    max_file_bytes: int  # one recording, as for an upload

    @classmethod
    def of(cls, settings: Settings) -> ZipLimits:
        return cls(settings.zip_max_entries, settings.zip_max_unpacked_bytes, settings.zip_max_ratio,
                   settings.max_upload_bytes)


@dataclass(frozen=True)
class ZipPlan:
    """What to unpack of one zip: its recordings, in order, and the names of what it skips."""

    members: tuple[zipfile.ZipInfo, ...]
    skipped: tuple[str, ...]


def is_zip(name: str, fh: IO[bytes]) -> bool:
    head = fh.read(4)
    fh.seek(0)
    return head == b"PK\x03\x04" or name.lower().endswith(".zip")


def is_audio_name(name: str) -> bool:
    return PurePosixPath(name).suffix.lower() in AUDIO_SUFFIXES


class Submission:
    """The uploads of one job submission, surveyed before any is written; blocking (reads files).

    Entries and unpacked bytes are counted across all the zips of the submission, so ten zips are
    held to what one may hold; ``bytes`` is everything the submission will write, plain files too,
    for the data dir's budget.
    """

    def __init__(self, limits: ZipLimits):
        self.limits = limits
        self.entries = 0
        self.unpacked = 0
        self.bytes = 0

    def survey(self, name: str, fh: IO[bytes]) -> ZipPlan | None:
        """None for a plain file (counted as it is); a zip's plan, or 413/400 saying why not."""
        if not is_zip(name, fh):
            self.bytes += fh.seek(0, os.SEEK_END)
            fh.seek(0)
            return None
        stated, directory_bytes = _directory(name, fh)
        self._check_entries(name, stated)
        most = self.limits.max_entries * DIRECTORY_BYTES_PER_ENTRY
        if directory_bytes > most:
            raise PayloadTooLarge(f"{name!r} has a directory of {directory_bytes} bytes; this server reads "
                                  f"at most {most}", param="files")
        try:
            with zipfile.ZipFile(fh) as archive:
                entries = archive.infolist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            raise InvalidRequest(f"{name!r} is not a readable zip file", param="files") from exc
        finally:
            fh.seek(0)
        self._check_entries(name, len(entries))  # the end record may understate them
        self.entries += len(entries)
        return self._plan(name, entries)

    def _check_entries(self, name: str, entries: int) -> None:
        if self.entries + entries > self.limits.max_entries:
            raise PayloadTooLarge(f"{name!r} holds {entries} entries; the zips of one submission may hold "
                                  f"at most {self.limits.max_entries} in all", param="files")

    def _plan(self, name: str, entries: list[zipfile.ZipInfo]) -> ZipPlan:
        limits = self.limits
        members: list[zipfile.ZipInfo] = []
        skipped: list[str] = []
        for entry in entries:
            if entry.is_dir():
                continue
            base = PurePosixPath(entry.filename).name
            if (entry.filename.startswith("__MACOSX/") or base.startswith(".") or not is_audio_name(base)
                    or entry.file_size == 0):
                skipped.append(entry.filename)
                continue
            if entry.file_size > limits.max_file_bytes:
                raise PayloadTooLarge(f"{entry.filename!r} in {name!r} unpacks to {entry.file_size} bytes; "
                                      f"a recording may have at most {limits.max_file_bytes}", param="files")
            members.append(entry)
        unpacked = sum(m.file_size for m in members)
        compressed = sum(m.compress_size for m in members)
        if unpacked > limits.max_ratio * compressed + RATIO_GRACE_BYTES:
            raise PayloadTooLarge(
                f"{name!r} unpacks to {unpacked} bytes from {compressed} ({unpacked / max(1, compressed):.0f}:1); "
                f"this server unpacks at most {limits.max_ratio:g}:1", param="files")
        if self.unpacked + unpacked > limits.max_unpacked_bytes:
            raise PayloadTooLarge(f"the zips of this submission unpack to {self.unpacked + unpacked} bytes; "
                                  f"at most {limits.max_unpacked_bytes}", param="files")
        self.unpacked += unpacked
        self.bytes += unpacked
        return ZipPlan(tuple(members), tuple(skipped))


def _directory(name: str, fh: IO[bytes]) -> tuple[int, int]:
    """(entries, bytes) of the central directory as the end record states them, read before
    ``zipfile`` parses the directory into an object per entry."""
    size = fh.seek(0, os.SEEK_END)
    start = max(0, size - _END.size - 0xFFFF)  # the record, after at most 64 kB of comment
    fh.seek(start)
    tail = fh.read()
    at = tail.rfind(b"PK\x05\x06")
    try:
        if at < 0 or len(tail) - at < _END.size:
            raise ValueError("no end record")
        _, _, _, _, entries, directory_bytes, _, _ = _END.unpack_from(tail, at)
        # a zip64 locator before the end record is what zipfile reads, whatever the plain record
        # says: judge by its numbers too, or a small plain record hides a huge directory
        locator_at = start + at - _END64_LOCATOR.size
        if locator_at >= 0:
            fh.seek(locator_at)
            signature, _, offset, _ = _END64_LOCATOR.unpack(fh.read(_END64_LOCATOR.size))
            if signature == b"PK\x06\x07":
                fh.seek(offset)
                record = fh.read(_END64.size)
                if record[:4] != b"PK\x06\x06":
                    raise ValueError("no zip64 end record")
                entries64, directory_bytes64 = _END64.unpack(record)[7:9]
                entries, directory_bytes = max(entries, entries64), max(directory_bytes, directory_bytes64)
        elif entries == 0xFFFF or directory_bytes == 0xFFFFFFFF:
            raise ValueError("a zip64 record without its locator")
    except (ValueError, OSError, struct.error) as exc:
        raise InvalidRequest(f"{name!r} is not a readable zip file", param="files") from exc
    finally:
        fh.seek(0)
    return int(entries), int(directory_bytes)
