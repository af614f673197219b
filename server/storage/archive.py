"""A version uploaded as a tar.gz of its folder, unpacked and checked before the registry adds it.

Only regular files and folders are unpacked, and every path the sent manifest names must stay
inside the upload: an archive must not make the server read or link its own files. A manifest
inside must match its files on arrival, so a version damaged in transit is refused at once.
"""

from __future__ import annotations

import json
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from server.errors import RegistryError, VerificationFailed
from server.storage.files import sha256_file
from server.storage.manifest import MANIFEST, Manifest, inside, is_folder_clip


@dataclass
class UnpackedVersion:
    folder: Path
    source: str = "upload"
    metadata: dict[str, Any] = field(default_factory=dict)
    smoke: list[tuple[Path, str]] = field(default_factory=list)  # golden clips the add must copy in


def unpack_version(archive: Path, into: Path) -> UnpackedVersion:
    """Unpack ``archive`` into the empty folder ``into`` and check it against its own manifest."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            odd = [m.name for m in members if not (m.isfile() or m.isdir())]
            if odd:
                raise RegistryError(f"upload may hold only files and folders, not links or devices: {odd[0]}")
            for member in members:
                inside(into, member.name)  # no absolute paths, no "..": checked here on every Python
            if hasattr(tarfile, "data_filter"):
                tar.extractall(into, members=members, filter="data")
            else:  # Python before 3.11.4 (Debian 12's 3.11.2): the checks above are what "data" adds
                for member in members:  # and the rest of it: no special bits, no foreign owners
                    member.mode = (member.mode & 0o755) | (0o700 if member.isdir() else 0o600)
                    member.uid, member.gid, member.uname, member.gname = os.getuid(), os.getgid(), "", ""
                tar.extractall(into, members=members)
        roots = list(into.iterdir())
        folder = roots[0] if len(roots) == 1 and roots[0].is_dir() else into
        if not (folder / MANIFEST).is_file():
            return UnpackedVersion(folder)
        sent = Manifest.from_json(json.loads((folder / MANIFEST).read_text()))
        for entry in sent.files:
            path = inside(folder, entry["path"])
            if not path.is_file() or sha256_file(path) != entry["sha256"]:
                raise VerificationFailed(f"upload: {entry['path']} does not match its checksum")
        smoke = []
        for clip in sent.smoke:
            path = inside(folder, clip.audio)
            if not (clip.audio.startswith("smoke/") and is_folder_clip(path)):  # add finds those itself
                smoke.append((path, clip.text))
        return UnpackedVersion(folder, sent.source, sent.metadata, smoke)
    except (tarfile.TarError, ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise RegistryError(f"upload is not a readable tar.gz of a version folder: {exc}") from exc
