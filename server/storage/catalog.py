"""The named models of one registry folder, each a :class:`Registry` of its own.

Layout::

    <root>/                     the default model (VOXSWAP_DEFAULT_MODEL, "sensevoice"): the
                                single-model layout of earlier releases, read in place, never moved
    <root>/models/<name>/       every other model, in the same layout, with a model.json naming
                                its kind

Earlier releases sharing the folder during a rolling upgrade keep working: they read the root as
they always did and never look into ``models/``. Each model has its own lock, pointer, generation
and history, so a swap of one never waits for another's.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from server.errors import Conflict, NotFound
from server.storage.archive import unpack_version
from server.storage.files import write_json_atomic
from server.storage.manifest import Manifest, detect_kind, parse_kind, validate_model_name, validate_new_name
from server.storage.registry import Registry
from server.vocab import ModelKind

MODELS_DIR = "models"


class ModelCatalog:
    """Finds, opens and creates the named models of one registry folder."""

    def __init__(self, root: Path, *, default: str = "sensevoice", lock_timeout_s: float = 30.0):
        self.root = Path(root).absolute()
        self.default = default
        self._lock_timeout_s = lock_timeout_s
        self._opened: dict[str, Registry] = {}
        self._guard = threading.Lock()
        self._opened[default] = Registry(self.root, model=default, lock_timeout_s=lock_timeout_s)

    @property
    def default_registry(self) -> Registry:
        return self._opened[self.default]

    def names(self) -> list[str]:
        """The default model first, then every other model created, in name order."""
        found = []
        folder = self.root / MODELS_DIR
        if folder.is_dir():
            found = sorted(child.name for child in folder.iterdir()
                           if (child / Registry.MODEL_FILE).is_file() and child.name != self.default)
        return [self.default, *found]

    def exists(self, name: str) -> bool:
        return name == self.default or (self._model_root(name) / Registry.MODEL_FILE).is_file()

    def registry(self, name: str) -> Registry:
        """The registry of an existing model; 404 for a name no model has."""
        with self._guard:
            opened = self._opened.get(name)
            if opened is not None:
                return opened
            if not self.exists(name):
                raise NotFound(f"no model {name[:80]!r}; GET /admin/models (or /v1/models) lists them", param="model")
            opened = self._opened[name] = Registry(self._model_root(name), model=name,
                                                   lock_timeout_s=self._lock_timeout_s)
            return opened

    def create(self, name: str, kind: str) -> Registry:
        """A new, empty named model of ``kind``; 409 if it exists."""
        validate_model_name(name)
        model_kind = parse_kind(kind)
        if self.exists(name):
            raise Conflict(f"model {name!r} already exists")
        root = self._model_root(name)
        with self.default_registry.lock:  # two creators of one name: the second finds it exists
            if self.exists(name):
                raise Conflict(f"model {name!r} already exists")
            if name in {m.name for m in self.default_registry.versions()}:
                raise Conflict(f"{name!r} is a version of the default model {self.default!r}; requests would "
                               "not know which one they name. Pick another model name")
            root.mkdir(parents=True, exist_ok=True)
            Registry(root, model=name).ensure()
            write_json_atomic(root / Registry.MODEL_FILE, {"name": name, "kind": model_kind.value,
                                                           "created_at": time.time()})
        return self.registry(name)

    def open_or_create(self, name: str | None, kind: ModelKind) -> Registry:
        """For ``registry add --model``: the model if it exists, else a new one of the version's kind."""
        if name is None or name == self.default or self.exists(name):
            return self.registry(name or self.default)
        return self.create(name, kind)

    def add_archive(self, model: str, archive: Path, version: str, *, kind: str | None = None,
                    actor: str = "api") -> Manifest:
        """An uploaded version (see :meth:`Registry.add_archive`); a model not made yet is created
        with the kind the upload's files show (or ``kind``)."""
        if self.exists(model):
            return self.registry(model).add_archive(archive, version, actor=actor, kind=kind)
        validate_model_name(model)
        validate_new_name(version)
        with self.default_registry.work_folder("upload") as unpack:
            sent = unpack_version(archive, unpack)
            found = parse_kind(kind) if kind else detect_kind(sent.folder)
            return self.open_or_create(model, found).add(sent.folder, version, smoke=sent.smoke, source=sent.source,
                                                         metadata=sent.metadata, actor=actor, kind=found)

    def history(self, model: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """One model's events, or every model's merged in time order, each line naming its model."""
        if model is not None:
            return self.registry(model).history(limit)
        merged = sorted((e for name in self.names() for e in self.registry(name).history(limit)),
                        key=lambda e: float(e.get("ts", 0)))
        return merged[-limit:] if limit else merged

    def _model_root(self, name: str) -> Path:
        validate_model_name(name)
        return self.root / MODELS_DIR / name
