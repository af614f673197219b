"""What a version is: its manifest (every file with its size and sha256, the golden clips), the
files a model folder must hold, and the rules for version names. The registry stores manifests;
this module says what makes one valid, so the CLI and the upload route check it before copying."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from server.errors import RegistryError, VoxswapError
from server.vocab import AUDIO_SUFFIXES, MODEL_ALIASES, PIN_SEPARATOR, ModelKind

NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")  # what a registry may hold (older releases allowed these)
NEW_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # what may be added from now on
MODEL_FILES = ("model_quant.onnx", "model.onnx")
SIDE_FILES = ("config.yaml", "am.mvn", "chn_jpn_yue_eng_ko_spectok.bpe.model")
MANIFEST = "manifest.json"


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
    kind: str = ModelKind.SENSEVOICE  # absent from manifests older releases wrote: all were SenseVoice

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
            kind=str(data.get("kind", ModelKind.SENSEVOICE)),
        )


def validate_name(name: str) -> str:
    """Version names become folder names: refuse anything that could escape ``versions/``."""
    if not NAME_RE.fullmatch(name) or set(name) == {"."}:
        raise RegistryError(
            f"invalid version name {name!r}: use 1-64 of A-Z a-z 0-9 . _ - (not only dots)",
            param="version",
        )
    return name


def validate_new_name(name: str) -> str:
    """A new version's name starts with a letter or digit: ``.x`` hides from ``ls`` and ``-x`` reads as
    an option on every command line. Names an older release accepted still load (``validate_name``)."""
    if not NEW_NAME_RE.fullmatch(name):
        raise RegistryError(
            f"invalid version name {name[:80]!r}: start with a letter or digit, then up to 63 of "
            "A-Z a-z 0-9 . _ -",
            param="version",
        )
    return name


def validate_model_name(name: str) -> str:
    """Model names share one namespace with the request aliases (``default``, ``whisper-1``) and
    become folder names under ``models/``; an ``@`` would make ``NAME@VERSION`` ambiguous."""
    if PIN_SEPARATOR in name or not NEW_NAME_RE.fullmatch(name):
        raise RegistryError(f"invalid model name {name!r}: use 1-64 of A-Z a-z 0-9 . _ - (starting with a "
                            "letter or digit; never '@')", param="model")
    if name in MODEL_ALIASES:
        raise RegistryError(f"{name!r} is an alias of the default model and cannot name a model", param="model")
    return name


def parse_kind(kind: str) -> ModelKind:
    try:
        return ModelKind(kind)
    except ValueError:
        known = ", ".join(k.value for k in ModelKind)
        raise RegistryError(f"unknown model kind {kind!r}; known kinds: {known}", param="kind") from None


def detect_kind(src: Path) -> ModelKind:
    """The kind a model folder's files say it is; raises when they fit none."""
    check_model_folder(src)
    return ModelKind.SENSEVOICE


def check_model_folder(src: Path, kind: ModelKind = ModelKind.SENSEVOICE) -> None:
    """The files funasr-onnx needs for ``kind``; checked before anything is copied."""
    if not src.is_dir():
        raise RegistryError(f"{src} is not a folder")
    missing = [name for name in SIDE_FILES if not (src / name).is_file()]
    if not any((src / name).is_file() for name in MODEL_FILES):
        missing.append(" or ".join(MODEL_FILES))
    if missing:
        raise RegistryError(f"{src} is not a SenseVoice ONNX folder: missing {', '.join(missing)}")


def is_folder_clip(path: Path) -> bool:
    """A golden clip in a version folder's ``smoke/``: audio with its transcript beside it."""
    return path.suffix.lower() in AUDIO_SUFFIXES and path.with_suffix(".txt").is_file()


def check_clip(path: Path) -> None:
    """A golden clip that does not decode would only be found at promote time: refuse it at add."""
    from server.speech import audio

    try:
        audio.decode(path.read_bytes(), max_seconds=3600)
    except VoxswapError as exc:
        raise RegistryError(f"smoke clip {path.name}: {exc.message}", param="smoke_audio") from exc


def inside(folder: Path, relative: str) -> Path:
    """``folder / relative``, refused if it would leave ``folder`` (absolute, ``..``, links)."""
    path = (folder / relative).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise RegistryError(f"upload: manifest path {relative!r} leaves the version folder")
    return path


def relative_files(root: Path) -> Iterator[str]:
    for path in root.rglob("*"):
        if path.is_file():
            yield path.relative_to(root).as_posix()

