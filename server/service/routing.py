"""Which model, and which version of it, a request asks for.

One namespace: model names, pipeline names, the aliases of the default model (``default``, ``whisper-1``,
``voxswap``, or nothing) and, for clients of earlier releases, a bare version name of the default
model. ``NAME@VERSION`` is the only spelling of a pinned version of a named model; a version pin
in ``X-Model-Version`` applies to the model the request names. A name that is none of these is a
404; a version the registry does not hold is a 404 too, while one it holds but this process has
not loaded is the lease's 409.
"""

from __future__ import annotations

from dataclasses import dataclass

from server.errors import NotFound, RegistryError
from server.lifecycle.models import ModelSet
from server.lifecycle.policy import ModelLifecycle
from server.service.pipeline import Stages
from server.storage.pipelines import PipelineStore
from server.vocab import MODEL_ALIASES, PIN_SEPARATOR


@dataclass(frozen=True)
class Target:
    model: ModelLifecycle
    version: str | None  # a pinned version; None: the model's live version
    stages: Stages | None = None  # a pipeline's; then ``model`` is its speech recognition stage


def resolve(models: ModelSet, requested: str | None, pin: str | None = None,
            pipelines: PipelineStore | None = None) -> Target:
    """The model and version for a request's ``model`` field and its ``X-Model-Version`` header. A
    pipeline's name runs its stages (``X-Model-Version`` then pins its speech recognition stage)."""
    name = (requested or "").strip()
    version: str | None = None
    if name in ("", *MODEL_ALIASES) and not (pin or "").strip():
        return Target(models.default, None)  # the common request, decided without a look at the disk
    if pipelines is not None and PIN_SEPARATOR not in name and (found := pipelines.all().get(name)) is not None:
        stages = Stages(found.name, models.get(found.asr), models.get(found.vad) if found.vad else None,
                        models.get(found.punc) if found.punc else None)
        target = resolve(models, found.asr, pin)
        return Target(target.model, target.version, stages)
    if PIN_SEPARATOR in name:
        name, version = name.split(PIN_SEPARATOR, 1)
        if not version:
            raise NotFound(f"no model version in {requested!r}: spell a pinned version NAME@VERSION", param="model")
    if name in ("", *MODEL_ALIASES):
        model = models.default
    elif name in models:
        model = models.get(name)
    elif version is None and _holds(models.default, name):
        model, version = models.default, name  # a bare version of the default model, as before names
    elif _created_since(models, name):
        model = models.get(name)
    else:
        raise NotFound(f"no model {name[:80]!r}; GET /v1/models lists them", param="model")
    pin = (pin or "").strip() or None
    if pin is not None and version is not None and pin != version:
        raise NotFound(f"model {requested!r} and X-Model-Version {pin!r} name different versions", param="model")
    version = pin or version
    if version is not None and not _holds(model, version):
        raise NotFound(f"model {model.name!r} has no version {version[:80]!r}; GET /v1/models lists them",
                       param="model")
    return Target(model, version)


def _created_since(models: ModelSet, name: str) -> bool:
    """A model made on disk since this process last looked (one directory listing)."""
    return any(lifecycle.name == name for lifecycle in models.discover())


def _holds(model: ModelLifecycle, version: str) -> bool:
    try:
        model.registry.version_dir(version)  # a name that is not a version name is simply not found
    except (NotFound, RegistryError):
        return False
    return True
