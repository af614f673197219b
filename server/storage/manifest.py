"""What a version is: its manifest (every file with its size and sha256, the golden clips), the
files a model folder of each kind must hold, which kind a folder is, and the rules for version
names. The registry stores manifests; this module says what makes one valid, so the CLI and the
upload route check it before copying.

Each kind is recognised by the files of FunASR's official ONNX export (funasr-onnx's loaders read
exactly these, so a folder missing one would only fail at promote time):

- ``sensevoice``: ``chn_jpn_yue_eng_ko_spectok.bpe.model`` (the SentencePiece tokenizer) + am.mvn
- ``paraformer``: ``tokens.json`` + ``am.mvn`` + ``config.yaml`` + ``model(_quant).onnx``
- ``seaco-paraformer`` / ``contextual-paraformer``: the same plus the hotword embedder
  ``model_eb(_quant).onnx``. funasr-onnx loads both with one loader, so only ``config.yaml`` tells
  them apart (``model: SeacoParaformer`` / ``ContextualParaformer``, as FunASR writes it); a folder
  whose config does not say is refused with a request for ``--kind``
- ``ct-punc``: ``config.yaml`` with ``model_conf.punc_list`` + ``tokens.json``, and no am.mvn (it reads text)
- ``fsmn-vad``: ``am.mvn`` + ``config.yaml`` with VAD settings, and no tokens (it emits no text)
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from server.errors import RegistryError, VoxswapError
from server.vocab import AUDIO_SUFFIXES, HOTWORD_KINDS, MODEL_ALIASES, PIN_SEPARATOR, ModelKind

NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")  # what a registry may hold (older releases allowed these)
NEW_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # what may be added from now on
MODEL_FILES = ("model_quant.onnx", "model.onnx")
EMBEDDERS = {"model_quant.onnx": "model_eb_quant.onnx", "model.onnx": "model_eb.onnx"}  # SeACo/contextual
SENSEVOICE_TOKENIZER = "chn_jpn_yue_eng_ko_spectok.bpe.model"
SIDE_FILES = ("config.yaml", "am.mvn", SENSEVOICE_TOKENIZER)  # SenseVoice's, as earlier releases named them
PARAFORMER_FILES = ("config.yaml", "am.mvn", "tokens.json")
REQUIRED_FILES: dict[ModelKind, tuple[str, ...]] = {
    ModelKind.SENSEVOICE: SIDE_FILES,
    ModelKind.PARAFORMER: PARAFORMER_FILES,
    ModelKind.SEACO_PARAFORMER: PARAFORMER_FILES,
    ModelKind.CONTEXTUAL_PARAFORMER: PARAFORMER_FILES,
    ModelKind.CT_PUNC: ("config.yaml", "tokens.json"),
    ModelKind.FSMN_VAD: ("config.yaml", "am.mvn"),
}
# The config.yaml keys funasr-onnx reads while loading each kind (a missing one is a KeyError at load).
PARAFORMER_CONFIG = ("frontend_conf", "model_conf")
REQUIRED_CONFIG: dict[ModelKind, tuple[str, ...]] = {
    ModelKind.SENSEVOICE: (),
    ModelKind.PARAFORMER: PARAFORMER_CONFIG,
    ModelKind.SEACO_PARAFORMER: PARAFORMER_CONFIG,
    ModelKind.CONTEXTUAL_PARAFORMER: PARAFORMER_CONFIG,
    ModelKind.CT_PUNC: ("model_conf.punc_list",),
    ModelKind.FSMN_VAD: ("frontend_conf", "model_conf.max_end_silence_time", "encoder_conf.fsmn_layers",
                         "encoder_conf.proj_dim", "encoder_conf.lorder"),
}
KIND_TITLES: dict[ModelKind, str] = {
    ModelKind.SENSEVOICE: "SenseVoice",
    ModelKind.PARAFORMER: "Paraformer",
    ModelKind.SEACO_PARAFORMER: "SeACo-Paraformer",
    ModelKind.CONTEXTUAL_PARAFORMER: "contextual Paraformer",
    ModelKind.CT_PUNC: "CT-Transformer punctuation",
    ModelKind.FSMN_VAD: "FSMN-VAD",
}
VAD_SETTINGS = ("max_end_silence_time", "sil_pdf_ids", "speech_noise_thres", "speech_2_noise_ratio")
MANIFEST = "manifest.json"
PUNC_INPUT_SUFFIX = ".in.txt"  # a ct-punc golden: smoke/x.in.txt (the input) -> smoke/x.txt (the answer)
SEGMENTS_SUFFIX = ".segments.json"  # an fsmn-vad golden: smoke/x.wav -> smoke/x.segments.json


@dataclass(frozen=True)
class SmokeClip:
    """A golden clip: an input file inside the version folder and what the version must answer.

    ``audio`` is the input's path in the version: a recording, or for ct-punc the text file to
    punctuate (the field keeps its name so manifests stay readable by earlier releases). ``text``
    is the transcript, or the punctuated text; an fsmn-vad clip has ``segments`` instead (ms), each
    boundary allowed ``tolerance_ms`` off (None: the gate's default).
    """

    audio: str
    text: str
    language: str = "auto"
    use_itn: bool = False
    segments: tuple[tuple[int, int], ...] | None = None
    tolerance_ms: int | None = None

    def to_json(self) -> dict[str, Any]:
        """Unset fields are left out: a manifest an earlier release reads holds only keys it knows."""
        return {key: value for key, value in asdict(self).items() if value is not None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SmokeClip:
        segments = data.get("segments")
        return cls(**{**data, "segments": None if segments is None else tuple(
            (int(start), int(end)) for start, end in segments)})


@dataclass(frozen=True)
class Manifest:
    name: str
    created_at: float
    source: str
    files: list[dict[str, Any]]
    smoke: list[SmokeClip]
    metadata: dict[str, Any] = field(default_factory=dict)
    kind: str = ModelKind.SENSEVOICE  # absent from manifests older releases wrote: all were SenseVoice
    # the graphs add prepared for its host (server.storage.prepared records; absent before them). Not
    # part of files: verify checks the originals, and a load checks a prepared graph by its own record
    prepared: list[dict[str, Any]] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(int(f["size"]) for f in self.files)

    def model_file(self, prefer_quantized: bool = True) -> str:
        """The model file to load; for SeACo and contextual Paraformer one whose hotword embedder
        is there too (funasr-onnx loads model_eb_quant.onnx with model_quant.onnx)."""
        present = {f["path"] for f in self.files}
        order = MODEL_FILES if prefer_quantized else tuple(reversed(MODEL_FILES))
        found = [name for name in order if name in present]
        if self.kind in HOTWORD_KINDS:
            found = [name for name in found if EMBEDDERS[name] in present] or found
        return found[0]

    def to_json(self) -> dict[str, Any]:
        """The version as the admin API answers it (its prepared graphs are in :meth:`to_file`)."""
        data = asdict(self)
        data.pop("prepared")
        data["smoke"] = [clip.to_json() for clip in self.smoke]
        data["total_bytes"] = self.total_bytes
        return data

    def to_file(self) -> dict[str, Any]:
        """manifest.json: :meth:`to_json` and the prepared graphs, when there are any (a manifest of
        earlier releases has no such key, and they read only the keys they know)."""
        return {**self.to_json(), **({"prepared": self.prepared} if self.prepared else {})}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        return cls(
            name=data["name"],
            created_at=float(data["created_at"]),
            source=data.get("source", ""),
            files=list(data["files"]),
            smoke=[SmokeClip.from_json(clip) for clip in data.get("smoke", [])],
            metadata=dict(data.get("metadata", {})),
            kind=str(data.get("kind", ModelKind.SENSEVOICE)),
            prepared=list(data.get("prepared", [])),
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


GENERATED_MARK = "Generated by voxswap make-test-model"


def is_generated(folder: Path) -> bool:
    """A stand-in written by ``voxswap make-test-model`` (its config.yaml says so in its first line)."""
    try:
        with (folder / "config.yaml").open() as fh:
            return GENERATED_MARK in fh.readline()
    except OSError:
        return False


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
    """The kind a model folder's files say it is (see the module's docstring); raises when they fit
    none, or fit two kinds that only ``--kind`` can tell apart."""
    if not src.is_dir():
        raise RegistryError(f"{src} is not a folder")
    kind = _kind_of(src, read_config(src))
    if kind is None:
        try:
            check_model_folder(src, ModelKind.SENSEVOICE)
        except RegistryError as exc:  # the most likely intent, and the message earlier releases gave
            known = ", ".join(k.value for k in ModelKind)
            raise RegistryError(f"{exc.message}. Its files fit no model kind funasr-onnx runs ({known}); "
                                "if it is one, name it with --kind", param="kind") from None
        kind = ModelKind.SENSEVOICE
    check_model_folder(src, kind)
    return kind


def _kind_of(src: Path, config: dict[str, Any]) -> ModelKind | None:
    has = {name for name in ("am.mvn", "tokens.json", SENSEVOICE_TOKENIZER) if (src / name).is_file()}
    if SENSEVOICE_TOKENIZER in has:
        return ModelKind.SENSEVOICE
    found = config.get("model_conf")
    model_conf: dict[str, Any] = found if isinstance(found, dict) else {}
    if "tokens.json" in has and "am.mvn" in has:
        if not any((src / name).is_file() for name in EMBEDDERS.values()):
            return ModelKind.PARAFORMER
        return _hotword_kind(src, config)
    if "tokens.json" in has and "punc_list" in model_conf:
        return ModelKind.CT_PUNC
    if "tokens.json" not in has and "am.mvn" in has and (
            "vad_post_conf" in config or any(key in model_conf for key in VAD_SETTINGS)):
        return ModelKind.FSMN_VAD
    return None


def _hotword_kind(src: Path, config: dict[str, Any]) -> ModelKind:
    """SeACo or contextual: funasr-onnx loads both alike, so only FunASR's config says which."""
    said = " ".join(str(config.get(key, "")) for key in ("model", "decoder", "predictor")).lower()
    if "seaco" in said:
        return ModelKind.SEACO_PARAFORMER
    if "contextual" in said:
        return ModelKind.CONTEXTUAL_PARAFORMER
    raise RegistryError(
        f"{src} holds a hotword embedder (model_eb.onnx), so it is a SeACo or a contextual Paraformer, but its "
        f"config.yaml does not say which (model: {config.get('model')!r}); add it with --kind seaco-paraformer "
        "or --kind contextual-paraformer", param="kind")


def read_config(src: Path) -> dict[str, Any]:
    """A folder's config.yaml as a dict ({} when there is none); unreadable YAML is refused."""
    import yaml

    try:
        data = yaml.safe_load((src / "config.yaml").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise RegistryError(f"{src}/config.yaml cannot be read: {exc}") from None
    return data if isinstance(data, dict) else {}


def check_model_folder(src: Path, kind: ModelKind = ModelKind.SENSEVOICE) -> None:
    """The files (and config.yaml keys) funasr-onnx needs for ``kind``; checked before anything is copied."""
    if not src.is_dir():
        raise RegistryError(f"{src} is not a folder")
    missing = [name for name in REQUIRED_FILES[kind] if not (src / name).is_file()]
    backbones = [name for name in MODEL_FILES if (src / name).is_file()]
    if not backbones:
        missing.append(" or ".join(MODEL_FILES))
    elif kind in HOTWORD_KINDS:
        missing += [f"{EMBEDDERS[name]} (the hotword embedder beside {name})" for name in backbones
                    if not (src / EMBEDDERS[name]).is_file()]
    if not missing and REQUIRED_CONFIG[kind]:
        config = read_config(src)
        missing += [f"{key} in config.yaml" for key in REQUIRED_CONFIG[kind] if not _has_key(config, key)]
    if missing:
        raise RegistryError(f"{src} is not a {KIND_TITLES[kind]} ONNX folder: missing {', '.join(missing)}")


def _has_key(config: dict[str, Any], dotted: str) -> bool:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def is_folder_clip(path: Path) -> bool:
    """A golden clip in a version folder's ``smoke/``, whatever the kind: audio with its transcript
    (``x.wav`` + ``x.txt``) or its speech segments (``x.segments.json``) beside it, or a text to
    punctuate with its answer (``x.in.txt`` + ``x.txt``)."""
    name = path.name
    if name.endswith(PUNC_INPUT_SUFFIX):
        return (path.parent / (name[: -len(PUNC_INPUT_SUFFIX)] + ".txt")).is_file()
    return path.suffix.lower() in AUDIO_SUFFIXES and (
        path.with_suffix(".txt").is_file() or path.with_name(path.stem + SEGMENTS_SUFFIX).is_file())


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

