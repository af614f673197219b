"""Named pipelines: which model runs each stage (voice activity detection, speech recognition,
punctuation), kept in ``pipelines.json`` at the registry's root.

A pipeline names models, never versions: each stage serves its model's live version and swaps
blue/green on its own. The file is replaced atomically under the registry's lock, and every change
is a line of the default model's history. Pipeline names share the namespace of model names and
the request aliases, so a request's ``model`` never means two things.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from server.errors import Conflict, InvalidRequest, NotFound
from server.storage.catalog import ModelCatalog
from server.storage.files import write_json_atomic
from server.storage.manifest import validate_model_name
from server.vocab import HistoryEvent, ModelKind

PIPELINES = "pipelines.json"
STAGE_FITS: dict[str, Callable[[ModelKind], bool]] = {
    "asr": lambda kind: kind.transcribes,
    "vad": lambda kind: kind == ModelKind.FSMN_VAD,
    "punc": lambda kind: kind == ModelKind.CT_PUNC,
}


@dataclass(frozen=True)
class Pipeline:
    name: str
    asr: str
    vad: str | None = None
    punc: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    smoke: list[dict[str, str]] = field(default_factory=list)  # golden clips through every stage: audio, text

    def stages(self) -> dict[str, str]:
        """The stages that are set, in the order audio goes through them."""
        return {role: model for role, model in (("vad", self.vad), ("asr", self.asr), ("punc", self.punc)) if model}

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class PipelineStore:
    """The pipelines of one registry folder; reads are cached by the file's signature."""

    def __init__(self, catalog: ModelCatalog):
        self.catalog = catalog
        self.path = catalog.root / PIPELINES
        self._guard = threading.Lock()
        self._cache: tuple[tuple[int, int, int] | None, dict[str, Pipeline]] = (None, {})

    def all(self) -> dict[str, Pipeline]:
        """Every pipeline by name: one ``stat`` per call, the file read only when it changed."""
        try:
            st = self.path.stat()
            signature: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            signature = None
        with self._guard:
            if signature != self._cache[0]:
                self._cache = (signature, self._read() if signature else {})
            return dict(self._cache[1])

    def get(self, name: str) -> Pipeline:
        found = self.all().get(name)
        if found is None:
            raise NotFound(f"no pipeline {name[:80]!r}; GET /admin/pipelines lists them", param="pipeline")
        return found

    def _read(self) -> dict[str, Pipeline]:
        try:
            data = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return {}
        return {name: Pipeline(**{"name": name, **fields}) for name, fields in data.get("pipelines", {}).items()}

    def set(self, name: str, *, asr: str, vad: str | None = None, punc: str | None = None,
            smoke: list[tuple[Path, str]] | None = None, actor: str = "cli") -> Pipeline:
        """Create or change a pipeline; every stage's model must exist and be of the stage's kind.

        ``smoke``: golden clips and the text the whole pipeline must give for each; a new version of
        any stage then has to pass them (with the other stages' live versions) before it serves.
        Without new clips, a change keeps the pipeline's goldens."""
        validate_model_name(name)
        if self.catalog.exists(name):
            raise Conflict(f"{name!r} is a model; a pipeline needs a name of its own", param="pipeline")
        for role, model in (("asr", asr), ("vad", vad), ("punc", punc)):
            if model is not None:
                kind = self.catalog.registry(model).kind()  # 404 for a model that does not exist
                if kind is None or not STAGE_FITS[role](kind):
                    raise InvalidRequest(f"model {model!r} ({kind or 'no version yet'}) cannot be the {role} stage",
                                         param=role)
        registry = self.catalog.default_registry
        with registry.lock:
            current = self._read()
            before = current.get(name)
            now = time.time()
            goldens = self._store_clips(name, smoke) if smoke else (before.smoke if before else [])
            pipeline = Pipeline(name, asr, vad, punc, before.created_at if before else now, now, goldens)
            current[name] = pipeline
            self._write(current)
            registry.record(HistoryEvent.PIPELINE_SET, pipeline=name, stages=pipeline.stages(), actor=actor,
                            before=before.stages() if before else None)
        return pipeline

    def remove(self, name: str, *, actor: str = "cli") -> Pipeline:
        registry = self.catalog.default_registry
        with registry.lock:
            current = self._read()
            if name not in current:
                raise NotFound(f"no pipeline {name[:80]!r}", param="pipeline")
            removed = current.pop(name)
            self._write(current)
            registry.record(HistoryEvent.PIPELINE_REMOVE, pipeline=name, stages=removed.stages(), actor=actor)
        return removed

    def clip_path(self, golden: dict[str, str]) -> Path:
        return self.catalog.root / golden["audio"]

    def _store_clips(self, name: str, smoke: list[tuple[Path, str]]) -> list[dict[str, str]]:
        """The clips copied beside the pipelines file (checked to decode first): they must outlive
        the files the operator gave."""
        from server.storage.manifest import check_clip

        folder = self.catalog.root / "pipelines" / name
        folder.mkdir(parents=True, exist_ok=True)
        goldens = []
        for i, (audio, text) in enumerate(smoke):
            check_clip(Path(audio))
            target = folder / f"golden-{i}{Path(audio).suffix or '.wav'}"
            shutil.copyfile(audio, target)
            goldens.append({"audio": str(target.relative_to(self.catalog.root)), "text": text.strip()})
        return goldens

    def using(self, model: str) -> list[Pipeline]:
        """The pipelines one of whose stages is ``model``."""
        return [p for p in self.all().values() if model in p.stages().values()]

    def _write(self, pipelines: dict[str, Pipeline]) -> None:
        data = {"pipelines": {name: {k: v for k, v in p.to_json().items() if k != "name"}
                              for name, p in sorted(pipelines.items())}}
        write_json_atomic(self.path, data)
