"""One engine for a version of any kind: the lifecycle loads every version through
:func:`load_engine` and never names a family's class. Each family's module is imported only when a
version of it is loaded, so a server serving SenseVoice alone never imports the others."""

from __future__ import annotations

from pathlib import Path

from server.engines.base import BaseEngine, EngineLoadError
from server.engines.session import SessionConfig
from server.vocab import ModelKind


def load_engine(kind: ModelKind | str, model_dir: Path, model_file: str, threads: int, device: str = "cpu",
                config: SessionConfig | None = None) -> BaseEngine:
    """Load ``model_file`` of the version folder ``model_dir`` as an engine of ``kind``, its sessions
    built as ``config`` says (prepared graphs, spinning); raises :class:`EngineLoadError` when it cannot."""
    try:
        kind = ModelKind(kind)
    except ValueError:
        raise EngineLoadError(f"no engine for model kind {kind!r}") from None
    if kind == ModelKind.SENSEVOICE:
        from server.engines.sensevoice import Engine

        return Engine(model_dir, model_file=model_file, threads=threads, device=device, config=config)
    if kind == ModelKind.CT_PUNC:
        from server.engines.punc import CtPuncEngine

        return CtPuncEngine(model_dir, model_file=model_file, threads=threads, device=device, config=config)
    if kind == ModelKind.FSMN_VAD:
        from server.engines.vad import FsmnVadEngine

        return FsmnVadEngine(model_dir, model_file=model_file, threads=threads, device=device, config=config)
    from server.engines.paraformer import ENGINES

    return ENGINES[kind](model_dir, model_file=model_file, threads=threads, device=device, config=config)
