"""Prepared graphs: what makes loading a version cheap, made from its original files and kept beside them.

onnxruntime parses a single-file ONNX model into a second copy of its weights while it loads it (a
load peaks near twice the file), then optimises its graph, on every load. A *prepared graph* is
that graph optimised once by onnxruntime and saved with its weights as external data: a load maps
the weights instead of parsing and copying them, and skips the optimisation (measured with
onnxruntime 1.32 on the 894 MB SenseVoice-small stand-in: a load's peak went from +1.59 GB to
+0.96 GB above the process, what it kept from +1.54 GB to +0.91 GB, its time from ~3 s to
~1.4 s; weights no kernel repacks stay in the page cache, shared). The engines make it
(:mod:`server.engines.session`, the only onnxruntime user); this module says where it lives, what
records it, and whether a host may use it. Layout, inside a version folder::

    prepared/<stem>-<key>/      one prepared graph, read-only once published
        model.onnx              the optimised graph, naming its weights by offset in:
        model.onnx.data         the weights, aligned for mapping
        prepared.json           the record: the original (file and sha256), the target it was made
                                for, why it was made, and each of its files' size and sha256 (and
                                stat signature when hashed: a load on the host that made it, where
                                the signature is unchanged, trusts the file without hashing it)
    prepared/.lock              taken while a graph is made, so the workers of a host make it once

An optimised graph holds choices onnxruntime made for the host that made it: its version, its
execution providers, the CPU's instruction sets. That host's *target* (a dict the engines describe)
is recorded, and a host uses only a graph made for a target equal to its own; ``<key>`` hashes the
original's sha256 and the target, so hosts of different targets sharing a registry folder (a
fleet on one volume, a registry copied between hosts, a rolling upgrade of onnxruntime) each keep
their own and never overwrite each other's.

The originals stay what ``verify`` checks and what a load falls back to. The manifest's
``prepared`` lists the graphs made at add, for the record; a graph made later (for another target,
or in place of a damaged one) is recorded by its own prepared.json only, so a version's manifest
never changes after add and a version of an earlier release (no ``prepared``) loads as it did.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from filelock import FileLock

from server.storage.files import (
    HashCheck,
    fsync_dir,
    make_read_only,
    remove_tree,
    sha256_file,
    stat_signature,
    write_json_atomic,
)
from server.storage.manifest import EMBEDDERS, MANIFEST, Manifest
from server.vocab import HOTWORD_KINDS

log = logging.getLogger("voxswap.registry")

PREPARED_DIR = "prepared"
RECORD = "prepared.json"
LOCK = ".lock"
LOCK_TIMEOUT_S = 900.0  # a peer preparing a 1 GB graph; a timeout falls back to the original
_checks = HashCheck()  # the prepared files this process hashed (a load re-hashes only what changed)


class PrepareFailed(Exception):
    """A graph could not be prepared (what onnxruntime said); the original still loads."""


@dataclass(frozen=True)
class GraphMaker:
    """How this host prepares graphs, handed down by a layer allowed to use the engines.

    ``make(original, folder)`` writes the prepared graph of ``original`` into the empty ``folder``
    and answers the names it wrote, the graph first, or raises :class:`PrepareFailed`. ``target``
    is what such a graph is made for. ``prefer_quantized`` picks the model file (and embedder) that
    this host loads, the ones add prepares.
    """

    target: Mapping[str, str]
    make: Callable[[Path, Path], list[str]]
    prefer_quantized: bool = True


@dataclass(frozen=True)
class PreparedGraph:
    """The record of one prepared graph (its prepared.json; an entry of the manifest's ``prepared``)."""

    source: str  # the original model file, in the version folder
    source_sha256: str
    folder: str  # relative to the version folder
    graph: str  # the graph's file name in ``folder``
    target: dict[str, str]
    files: list[dict[str, Any]]  # path (in ``folder``), size, sha256
    created_at: float
    reason: str = ""  # why it was made: "add", or why a load made it again

    def path(self, version_dir: Path) -> Path:
        return version_dir / self.folder / self.graph

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PreparedGraph:
        return cls(source=str(data["source"]), source_sha256=str(data["source_sha256"]), folder=str(data["folder"]),
                   graph=str(data["graph"]), target={str(k): str(v) for k, v in dict(data["target"]).items()},
                   files=list(data["files"]), created_at=float(data["created_at"]), reason=str(data.get("reason", "")))


@dataclass(frozen=True)
class Choice:
    """What one session of an engine loads: ``graph``, a prepared graph, or None for the original.
    ``reason`` says why the stored prepared graph was not usable ("" when it was); with
    ``prepared_now`` the graph was made by this load, for that reason."""

    source: str
    graph: Path | None
    reason: str = ""
    prepared_now: bool = False


def graph_sources(kind: str, model_file: str) -> list[str]:
    """The original files an engine of ``kind`` builds a session on: the model, and the hotword
    embedder beside it for SeACo and contextual Paraformers."""
    return [model_file, EMBEDDERS[model_file]] if kind in HOTWORD_KINDS else [model_file]


def unit_folder(source: str, source_sha256: str, target: Mapping[str, str]) -> str:
    """``prepared/<stem>-<key>``: one folder per original and target, so targets never collide."""
    key = hashlib.sha256(json.dumps([source_sha256, dict(sorted(target.items()))]).encode()).hexdigest()[:16]
    return f"{PREPARED_DIR}/{Path(source).stem}-{key}"


# -- making -----------------------------------------------------------------------------------------


def make_units(version_dir: Path, manifest: Manifest, maker: GraphMaker) -> list[PreparedGraph]:
    """Prepare the graphs this host loads into a version being added (its staging copy, not yet
    published); the records, for the manifest. Raises :class:`PrepareFailed` or OSError."""
    sums = {entry["path"]: entry["sha256"] for entry in manifest.files}
    sources = graph_sources(manifest.kind, manifest.model_file(maker.prefer_quantized))
    return [_make(version_dir, source, sums[source], maker,
                  version_dir / unit_folder(source, sums[source], maker.target), reason="add")
            for source in sources if source in sums]


def prepare_added(staging: Path, manifest: Manifest, maker: GraphMaker | None, *, model: str) -> Manifest:
    """``manifest`` with the graphs :func:`make_units` prepared in ``staging`` (a version being
    added); unchanged without a maker, or when preparing fails (logged; a load prepares them later)."""
    if maker is None:
        return manifest
    try:
        return replace(manifest, prepared=[record.to_json() for record in make_units(staging, manifest, maker)])
    except (PrepareFailed, OSError) as exc:
        log.warning("version added without prepared graphs", extra={
            "event": "prepare_failed", "model": model, "version": manifest.name, "reason": str(exc)})
        remove_tree(staging / PREPARED_DIR)
        return manifest


def originals_only(src: Path) -> Callable[[str, list[str]], set[str]]:
    """copytree's ignore for add: no manifest, no hidden files, no prepared graphs (at the top)."""
    hidden = shutil.ignore_patterns(MANIFEST, ".*")
    return lambda folder, names: hidden(folder, names) | (
        {PREPARED_DIR} if Path(folder) == Path(src) and PREPARED_DIR in names else set())


def _make(version_dir: Path, source: str, source_sha256: str, maker: GraphMaker, out: Path, *,
          reason: str) -> PreparedGraph:
    """Prepare ``source`` into the new folder ``out`` and write its record there (read-only after)."""
    out.mkdir(parents=True)
    names = maker.make(version_dir / source, out)
    make_read_only(out)  # before the signatures: nothing touches these files' ctime after this
    record = PreparedGraph(
        source=source, source_sha256=source_sha256, folder=unit_folder(source, source_sha256, maker.target),
        graph=names[0], target=dict(maker.target), created_at=time.time(), reason=reason,
        files=[{"path": name, "size": (out / name).stat().st_size, "sha256": sha256_file(out / name),
                "hashed_at": stat_signature(out / name)} for name in names])
    write_json_atomic(out / RECORD, record.to_json())
    make_read_only(out)
    return record


def reprepare(version_dir: Path, source: str, source_sha256: str, maker: GraphMaker, *,
              work: Callable[[str], AbstractContextManager[Path]], reason: str) -> tuple[PreparedGraph, bool]:
    """Make this host's prepared graph of ``source`` from the original (which the caller verified)
    and publish it with one rename, in place of a damaged or foreign one at its folder; the record,
    and whether this call made it (a peer may have made it while this one waited for the lock).

    The graph is made in ``work``'s folder (the registry's ``.staging``, owned by this process), so
    a process killed while preparing leaves nothing in the version. Raises :class:`PrepareFailed`
    or OSError (a read-only registry, the lock's timeout), and the caller loads the original.
    """
    (version_dir / PREPARED_DIR).mkdir(exist_ok=True)
    with FileLock(str(version_dir / PREPARED_DIR / LOCK), timeout=LOCK_TIMEOUT_S):
        found, _ = find(version_dir, source, source_sha256, maker.target)
        if found is not None:
            return found, False
        with work("prepare") as staging:
            record = _make(version_dir, source, source_sha256, maker, staging / "new", reason=reason)
            dest = version_dir / record.folder
            if dest.exists():
                os.rename(dest, staging / "old")  # removed with the work folder; a mapped file outlives it
            os.rename(staging / "new", dest)
            fsync_dir(dest.parent)
        return record, True


# -- choosing ---------------------------------------------------------------------------------------


def find(version_dir: Path, source: str, source_sha256: str, target: Mapping[str, str]
         ) -> tuple[PreparedGraph | None, str]:
    """This host's prepared graph of ``source`` if its record says it was made from that original
    for ``target`` and its files match the record; else None and why not."""
    folder = version_dir / unit_folder(source, source_sha256, target)
    try:
        record = PreparedGraph.from_json(json.loads((folder / RECORD).read_text()))
    except FileNotFoundError:
        return None, _missing(version_dir, source, target)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return None, f"the record of {folder.name} cannot be read ({type(exc).__name__})"
    if record.target != dict(target):
        return None, f"{folder.name} was made for another host: {_difference(record.target, target)}"
    if record.source != source or record.source_sha256 != source_sha256:
        return None, f"{folder.name} was made from another {source}"
    try:
        names = [str(entry["path"]) for entry in record.files]
        if record.folder != unit_folder(source, source_sha256, target) or record.graph not in names or any(
                Path(name).name != name or name.startswith(".") for name in names):
            return None, f"the record of {folder.name} names files outside it"  # never load what it did not check
        for entry in record.files:
            problem = _checks.problem(folder / entry["path"], int(entry["size"]), str(entry["sha256"]),
                                      hashed_at=entry.get("hashed_at"))
            if problem:
                return None, f"{folder.name}/{entry['path']} {problem}"
    except (KeyError, TypeError, ValueError):
        return None, f"the record of {folder.name} cannot be read"
    return record, ""


def choose(version_dir: Path, manifest: Manifest, model_file: str, maker: GraphMaker, *, prepare_missing: bool,
           work: Callable[[str], AbstractContextManager[Path]]) -> list[Choice]:
    """For each session an engine of this version builds: the prepared graph to load, made again
    first where it is missing, foreign or damaged and ``prepare_missing`` allows; else the original
    and why. Never raises for a prepared graph: the originals, verified, always load."""
    sums = {entry["path"]: entry["sha256"] for entry in manifest.files}
    choices = []
    for source in graph_sources(manifest.kind, model_file):
        if source not in sums:
            choices.append(Choice(source, None, f"{source} is not in the manifest"))
            continue
        record, why = find(version_dir, source, sums[source], maker.target)
        made = False
        if record is None and prepare_missing:
            try:
                record, made = reprepare(version_dir, source, sums[source], maker, work=work, reason=why)
                why = why if made else ""  # a peer made it while this load waited: usable as it is
            except (PrepareFailed, OSError) as exc:
                why = f"{why}; preparing it again failed: {exc}"
        choices.append(Choice(source, record.path(version_dir) if record else None, why, made))
    return choices


def stored(version_dir: Path) -> list[PreparedGraph]:
    """Every prepared graph in a version folder (any target), as its record says; unreadable ones skipped."""
    found = []
    for record_path in sorted((version_dir / PREPARED_DIR).glob(f"*/{RECORD}")):
        try:
            found.append(PreparedGraph.from_json(json.loads(record_path.read_text())))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


def _missing(version_dir: Path, source: str, target: Mapping[str, str]) -> str:
    others = [r for r in stored(version_dir) if r.source == source]
    if others:
        return f"the prepared graphs of {source} were made for other hosts: {_difference(others[-1].target, target)}"
    return f"{source} has no prepared graph (added before prepared graphs, or without them)"


def _difference(made: Mapping[str, str], here: Mapping[str, str]) -> str:
    keys = sorted(key for key in set(made) | set(here) if made.get(key) != here.get(key))
    return ", ".join(f"{key} {made.get(key)!r} (here {here.get(key)!r})" for key in keys)


