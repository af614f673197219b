"""Prepared graphs: add writes this host's optimised graphs (weights as mapped external data) beside
the originals and records them; a load uses them and skips graph optimisation, answering exactly
what the originals answer; a damaged graph, or one made for another onnxruntime or CPU, never fails
a load: it falls back to the original (and is made again where allowed); versions of earlier
releases load as they did; verify checks the originals only."""

from __future__ import annotations

import json
import logging
import shutil
import stat
import tarfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from server.engines.base import AsrEngine, BaseEngine, PuncEngine, VadEngine
from server.engines.factory import load_engine
from server.engines.session import GraphSource, SessionConfig
from server.errors import VerificationFailed
from server.lifecycle.builder import CandidateBuilder, graph_maker
from server.lifecycle.report import SwapReport
from server.metrics import Metrics
from server.settings import Settings
from server.storage import prepared
from server.storage.manifest import MANIFEST, Manifest
from server.storage.registry import Registry
from server.testing import synth
from server.tools.cli import main as cli
from tests.fsmn_vad import fsmn_vad_dir  # noqa: F401  (a fixture)
from tests.kinds import KindFolder, kind_folder  # noqa: F401  (a fixture)

FIXTURE = Path(__file__).parent / "fixtures" / "registry-previous-release"
KINDS: dict[str, dict[str, Any]] = {  # weights_mb: an initializer big enough to go to the external data file
    "sensevoice": {"text": "prepared sense voice", "weights_mb": 1},
    "paraformer": {"text": "prepared paraformer", "timestamps": True, "quantize": True, "weights_mb": 1},
    "seaco-paraformer": {"text": "prepared seaco", "quantize": True},
    "contextual-paraformer": {"text": "prepared contextual"},
    "ct-punc": {"mark": "?", "comma_every": 2},
}
ISLANDS = [("silence", 0.8), ("speech", 1.5), ("silence", 1.0), ("speech", 1.0), ("silence", 0.8)]


def _maker() -> prepared.GraphMaker:
    return graph_maker("cpu", True)


def _folder(kind: str, kind_folder: KindFolder, fsmn_vad_dir: Path) -> Path:  # noqa: F811
    return fsmn_vad_dir if kind == "fsmn-vad" else kind_folder(kind, **KINDS[kind])


def _build(registry: Registry, version: str, **settings: Any) -> tuple[BaseEngine, SwapReport]:
    report = SwapReport(version=version, from_version=None, event="test", model=registry.model)
    options = {"registry": registry.root, "seed_demo": False, **settings}
    builder = CandidateBuilder(registry, Settings(**options), Metrics().for_model(registry.model))
    return builder.build(version, report).engine, report


def _writable(path: Path) -> Path:
    path.chmod(path.stat().st_mode | stat.S_IWUSR)
    return path


def _damage(path: Path) -> None:
    with _writable(path).open("r+b") as fh:
        fh.seek(path.stat().st_size // 2)
        fh.write(b"\xff" * 8)


def _unit(registry: Registry, version: str, index: int = 0) -> tuple[Path, dict[str, Any]]:
    root = registry.version_dir(version)
    entry = registry.manifest(version).prepared[index]
    return root / entry["folder"], entry


def _answers(engine: BaseEngine) -> Any:
    """What an engine answers, in its kind's form, to the same inputs every time."""
    if isinstance(engine, AsrEngine):
        clips = [synth.speech_like(1.2, seed=2), synth.speech_like(0.7, seed=3)]
        answers: list[Any] = [engine.transcribe_batch(clips), engine.transcribe_batch(clips, use_itn=True)]
        if engine.takes_hotwords:
            answers.append(engine.transcribe_batch(clips, hotwords="prepared seaco"))
        if engine.gives_timestamps:
            answers.append(engine.transcribe_batch_with_words(clips))
        return answers
    if isinstance(engine, PuncEngine):
        return [engine.punctuate("one two three four five"), engine.punctuate("你好 世界 今天")]
    assert isinstance(engine, VadEngine)
    audio = synth.islands(ISLANDS, seed=4)
    stream = engine.open_stream(silence_ms=500)
    chunks = [stream.feed(audio[i:i + 3200]) for i in range(0, len(audio), 3200)] + [stream.feed(audio[:0], final=True)]
    return [engine.segments(audio), chunks]


# -- add --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [*KINDS, "fsmn-vad"])
def test_add_prepares_this_hosts_graphs_beside_the_originals_and_records_them_checksummed(
        tmp_path: Path, kind_folder: KindFolder, fsmn_vad_dir: Path, kind: str) -> None:  # noqa: F811
    registry = Registry(tmp_path / "registry").ensure()
    manifest = registry.add(_folder(kind, kind_folder, fsmn_vad_dir), "v1", prepare=_maker())
    root = registry.version_dir("v1")
    model_file = manifest.model_file()
    assert [entry["source"] for entry in manifest.prepared] == prepared.graph_sources(kind, model_file)
    assert not any(entry["path"].startswith("prepared/") for entry in manifest.files)  # verify's list: originals
    for entry in manifest.prepared:
        folder = root / entry["folder"]
        assert json.loads((folder / prepared.RECORD).read_text()) == entry  # its own record says the same
        assert entry["target"] == dict(_maker().target) and entry["reason"] == "add"
        assert entry["graph"] == entry["source"] and {f["path"] for f in entry["files"]} >= {entry["graph"]}
        for file in entry["files"]:
            path = folder / file["path"]
            assert path.stat().st_size == file["size"] and not path.stat().st_mode & stat.S_IWUSR
    if kind in ("sensevoice", "paraformer"):  # a 1 MiB initializer: the weights are in the mapped file
        assert {f["path"] for f in manifest.prepared[0]["files"]} == {model_file, f"{model_file}.data"}
    on_disk = json.loads((root / MANIFEST).read_text())
    assert on_disk["prepared"] == manifest.prepared and "prepared" not in manifest.to_json()  # API shape as before
    assert registry.history()[-1]["prepared_graphs"] == len(manifest.prepared)


def test_without_a_maker_add_writes_no_prepared_graphs_and_a_folder_sent_with_some_is_not_trusted(
        tmp_path: Path, kind_folder: KindFolder) -> None:  # noqa: F811
    registry = Registry(tmp_path / "registry").ensure()
    registry.add(kind_folder("sensevoice", **KINDS["sensevoice"]), "v1", prepare=_maker())
    sent = shutil.copytree(registry.version_dir("v1"), tmp_path / "sent")  # prepared/ and all
    manifest = registry.add(sent, "v2")
    assert manifest.prepared == [] and not (registry.version_dir("v2") / prepared.PREPARED_DIR).exists()
    assert "prepared" not in json.loads((registry.version_dir("v2") / MANIFEST).read_text())


def test_an_upload_is_prepared_by_the_registry_s_preparer_and_an_export_leaves_its_graphs_behind(
        tmp_path: Path, kind_folder: KindFolder) -> None:  # noqa: F811
    source = Registry(tmp_path / "a").ensure()
    source.add(kind_folder("sensevoice", **KINDS["sensevoice"]), "v1", prepare=_maker())
    archive = source.export_archive("v1", tmp_path / "v1.tar.gz")
    with tarfile.open(archive) as tar:
        assert not [name for name in tar.getnames() if "/prepared" in name]
    receiver = Registry(tmp_path / "b").ensure()
    receiver.preparer = _maker()  # what a server's builder sets, so uploads prepare too
    manifest = receiver.add_archive(archive, "v1")
    assert len(manifest.prepared) == 1
    assert (receiver.version_dir("v1") / manifest.prepared[0]["folder"] / prepared.RECORD).is_file()


# -- loading ----------------------------------------------------------------------------------------


def test_a_load_maps_the_prepared_graph_and_skips_graph_optimisation(
        tmp_path: Path, kind_folder: KindFolder) -> None:  # noqa: F811
    registry = Registry(tmp_path / "registry").ensure()
    registry.add(kind_folder("seaco-paraformer", **KINDS["seaco-paraformer"]), "v1", prepare=_maker())
    engine, report = _build(registry, "v1")
    assert engine.prepared and "prepare_s" in report.timings
    assert [(s["source"], s["prepared"], s["optimised_at_load"], s["reason"]) for s in engine.sessions] == [
        ("model_quant.onnx", True, False, ""), ("model_eb_quant.onnx", True, False, "")]
    assert [s["loaded"] for s in engine.sessions] == [f"{e['folder']}/{e['graph']}"
                                                      for e in registry.manifest("v1").prepared]
    assert engine.model_file == "model_quant.onnx"  # what the version is, as before
    engine.close()


def test_funasr_onnx_builds_no_session_of_its_own_and_is_unchanged_outside_a_load(
        tmp_path: Path, kind_folder: KindFolder, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    import funasr_onnx
    import onnxruntime

    registry = Registry(tmp_path / "registry").ensure()
    registry.add(kind_folder("sensevoice", **KINDS["sensevoice"]), "v1", prepare=_maker())
    opened: list[str] = []
    real = onnxruntime.InferenceSession

    def counting(path: str, *args: Any, **kwargs: Any) -> Any:
        opened.append(str(Path(path).relative_to(registry.version_dir("v1"))))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", counting)
    engine, _ = _build(registry, "v1")
    assert opened == [engine.sessions[0]["loaded"]]  # the prepared graph only: the original was never parsed
    plain = funasr_onnx.SenseVoiceSmall(model_dir=str(registry.version_dir("v1")), intra_op_num_threads=1)
    assert type(plain.ort_infer).__name__ == "OrtInferSession"  # funasr-onnx's own, as ever


@pytest.mark.parametrize("kind", [*KINDS, "fsmn-vad"])
def test_every_kind_answers_exactly_the_same_from_its_prepared_graphs(
        tmp_path: Path, kind_folder: KindFolder, fsmn_vad_dir: Path, kind: str) -> None:  # noqa: F811
    registry = Registry(tmp_path / "registry").ensure()
    manifest = registry.add(_folder(kind, kind_folder, fsmn_vad_dir), "v1", prepare=_maker())
    root = registry.version_dir("v1")
    original = load_engine(kind, root, manifest.model_file(), 1)
    graphs = {e["source"]: GraphSource(root / e["folder"] / e["graph"]) for e in manifest.prepared}
    from_prepared = load_engine(kind, root, manifest.model_file(), 1, config=SessionConfig(graphs))
    assert from_prepared.prepared and not original.prepared
    assert all(s["optimised_at_load"] for s in original.sessions)
    assert _answers(from_prepared) == _answers(original)
    assert from_prepared.metadata == original.metadata  # the ONNX metadata survives the optimised save


def test_the_sensevoice_small_architecture_gives_the_same_logits_from_its_prepared_graph(tmp_path: Path) -> None:
    """Real SAN-M blocks, whose graph onnxruntime does fuse (two blocks: the cost stays small)."""
    from server.testing.modelgen_small import SmallSpec, make_sensevoice_small

    folder = make_sensevoice_small(tmp_path / "small", SmallSpec(text="small arch", num_blocks=2, tp_blocks=1))
    registry = Registry(tmp_path / "registry").ensure()
    manifest = registry.add(folder, "v1", prepare=_maker())
    root = registry.version_dir("v1")
    graphs = {e["source"]: GraphSource(root / e["folder"] / e["graph"]) for e in manifest.prepared}
    engines = [load_engine("sensevoice", root, "model.onnx", 1, config=config)
               for config in (None, SessionConfig(graphs))]
    clips = [synth.speech_like(1.0, seed=5)]
    original, from_prepared = (engine._ctc_logits(clips, "auto", False)[0] for engine in engines)  # type: ignore[attr-defined]
    np.testing.assert_array_equal(from_prepared, original)  # the same graph: the same kernels, bit for bit
    [text] = engines[1].transcribe_batch(clips)
    assert engines[0].transcribe_batch(clips) == [text] and text.endswith("> small arch")


def test_a_graph_is_hashed_only_where_it_may_have_changed_since_it_was_made(
        tmp_path: Path, kind_folder: KindFolder, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """Hashing a 900 MB graph costs about two seconds: the host that made it trusts its unchanged
    stat signature, as verify trusts a file it hashed earlier in the process."""
    from server.storage import files

    registry = Registry(tmp_path / "registry").ensure()
    manifest = registry.add(kind_folder("sensevoice", **KINDS["sensevoice"]), "v1", prepare=_maker())
    hashed: list[str] = []
    real = files.sha256_file
    monkeypatch.setattr(files, "sha256_file", lambda path: hashed.append(Path(path).name) or real(path))
    sha = manifest.prepared[0]["source_sha256"]
    assert prepared.find(registry.version_dir("v1"), "model.onnx", sha, _maker().target)[0] is not None
    assert hashed == []
    copied = shutil.copytree(registry.version_dir("v1"), tmp_path / "copied")  # new inodes: hashed, once
    for _ in range(2):
        assert prepared.find(copied, "model.onnx", sha, _maker().target)[0] is not None
    assert sorted(hashed) == ["model.onnx", "model.onnx.data"]


# -- falling back -----------------------------------------------------------------------------------


def test_a_damaged_prepared_graph_makes_the_load_fall_back_to_the_original_and_says_why(
        tmp_path: Path, kind_folder: KindFolder, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    registry = Registry(tmp_path / "registry").ensure()
    registry.add(kind_folder("sensevoice", **KINDS["sensevoice"]), "v1", prepare=_maker())
    folder, _ = _unit(registry, "v1")
    _damage(folder / "model.onnx.data")
    with caplog.at_level(logging.WARNING, "voxswap.lifecycle"):
        engine, _ = _build(registry, "v1", prepare_on_load=False)
    [session] = engine.sessions
    assert (session["loaded"], session["prepared"], session["optimised_at_load"]) == ("model.onnx", False, True)
    assert "model.onnx.data fails its sha256 check" in session["reason"]
    [logged] = [r for r in caplog.records if getattr(r, "event", "") == "prepared_graph_unused"]
    assert "fails its sha256 check" in logged.reason  # type: ignore[attr-defined]
    assert isinstance(engine, AsrEngine)
    assert engine.transcribe(synth.speech_like(1.2)).endswith(KINDS["sensevoice"]["text"])


def test_a_damaged_prepared_graph_is_made_again_from_the_original_when_a_load_may_prepare(
        tmp_path: Path, kind_folder: KindFolder) -> None:  # noqa: F811
    registry = Registry(tmp_path / "registry").ensure()
    registry.add(kind_folder("sensevoice", **KINDS["sensevoice"]), "v1", prepare=_maker())
    manifest_bytes = (registry.version_dir("v1") / MANIFEST).read_bytes()
    folder, entry = _unit(registry, "v1")
    _damage(folder / "model.onnx.data")
    engine, _ = _build(registry, "v1")
    [session] = engine.sessions
    assert session["prepared"] and session["loaded"] == f"{entry['folder']}/model.onnx"
    assert "fails its sha256 check" in session["reason"]  # why it was made again
    record = json.loads((folder / prepared.RECORD).read_text())
    def same(files: list[dict[str, Any]]) -> list[tuple[str, int, str]]:
        return [(f["path"], f["size"], f["sha256"]) for f in files]

    assert same(record["files"]) == same(entry["files"])  # the same bytes (onnxruntime is deterministic)
    assert "fails its sha256 check" in record["reason"]
    assert prepared.find(registry.version_dir("v1"), "model.onnx", record["source_sha256"], _maker().target)[0]
    assert (registry.version_dir("v1") / MANIFEST).read_bytes() == manifest_bytes  # the version never changed
    assert not list(registry.staging_dir.iterdir())  # the replaced graph went with the work folder


@pytest.mark.parametrize("field,value", [("onnxruntime", "1.19.2"), ("cpu_isa", "avx sse4_1 sse4_2")])
def test_a_graph_made_for_another_onnxruntime_or_cpu_is_not_used_and_is_made_again(
        tmp_path: Path, kind_folder: KindFolder, field: str, value: str) -> None:  # noqa: F811
    registry = Registry(tmp_path / "registry").ensure()
    registry.add(kind_folder("paraformer", **KINDS["paraformer"]), "v1", prepare=_maker())
    folder, entry = _unit(registry, "v1")
    record = {**entry, "target": {**entry["target"], field: value}}
    _writable(folder / prepared.RECORD).write_text(json.dumps(record))

    engine, _ = _build(registry, "v1", prepare_on_load=False)
    here = _maker().target[field]
    assert not engine.prepared and f"{field} {value!r} (here {here!r})" in engine.sessions[0]["reason"]

    engine, _ = _build(registry, "v1")
    assert engine.prepared and f"{field} {value!r} (here {here!r})" in engine.sessions[0]["reason"]
    assert json.loads((folder / prepared.RECORD).read_text())["target"] == dict(_maker().target)


def test_a_registry_moved_to_a_host_of_another_target_keeps_both_hosts_graphs(
        tmp_path: Path, kind_folder: KindFolder) -> None:  # noqa: F811
    registry = Registry(tmp_path / "registry").ensure()
    manifest = registry.add(kind_folder("sensevoice", **KINDS["sensevoice"]), "v1", prepare=_maker())
    here = _maker()
    other = prepared.GraphMaker(target={**here.target, "onnxruntime": "9.9.9"}, make=here.make)
    root = registry.version_dir("v1")
    [choice] = prepared.choose(root, manifest, "model.onnx", other, prepare_missing=False, work=registry.work_folder)
    assert choice.graph is None and "onnxruntime '1" in choice.reason and "(here '9.9.9')" in choice.reason
    [choice] = prepared.choose(root, manifest, "model.onnx", other, prepare_missing=True, work=registry.work_folder)
    assert choice.prepared_now and choice.graph is not None
    assert len(prepared.stored(root)) == 2  # one per target: neither host overwrites the other's
    [mine] = prepared.choose(root, manifest, "model.onnx", here, prepare_missing=False, work=registry.work_folder)
    assert mine.graph is not None and not mine.prepared_now


def test_a_prepared_graph_that_fails_to_load_leaves_the_engine_on_the_original(
        tmp_path: Path, kind_folder: KindFolder) -> None:  # noqa: F811
    registry = Registry(tmp_path / "registry").ensure()
    registry.add(kind_folder("ct-punc", **KINDS["ct-punc"]), "v1", prepare=_maker())
    folder, entry = _unit(registry, "v1")
    broken = b"not an onnx graph"
    _writable(folder / "model.onnx").write_bytes(broken)  # and a record that vouches for it
    import hashlib

    files = [{"path": "model.onnx", "size": len(broken), "sha256": hashlib.sha256(broken).hexdigest()}]
    _writable(folder / prepared.RECORD).write_text(json.dumps({**entry, "files": files}))
    engine, _ = _build(registry, "v1")
    assert not engine.prepared and "failed to load" in engine.sessions[0]["reason"]
    assert isinstance(engine, PuncEngine)
    assert engine.punctuate("one two three") == "one two\uff0c three\uff1f"  # full-width comma, question mark


def test_a_record_naming_files_outside_its_folder_is_never_loaded(tmp_path: Path, kind_folder: KindFolder) -> None:  # noqa: F811
    registry = Registry(tmp_path / "registry").ensure()
    registry.add(kind_folder("sensevoice", **KINDS["sensevoice"]), "v1", prepare=_maker())
    folder, entry = _unit(registry, "v1")
    _writable(folder / prepared.RECORD).write_text(json.dumps({**entry, "graph": "../../model.onnx"}))
    engine, _ = _build(registry, "v1", prepare_on_load=False)
    assert not engine.prepared and "names files outside it" in engine.sessions[0]["reason"]


def test_workers_loading_one_version_at_once_prepare_it_once(tmp_path: Path, kind_folder: KindFolder) -> None:  # noqa: F811
    registry = Registry(tmp_path / "registry").ensure()
    manifest = registry.add(kind_folder("sensevoice", **KINDS["sensevoice"]), "v1")  # no graphs yet
    made: list[bool] = []

    def load() -> None:
        [choice] = prepared.choose(registry.version_dir("v1"), manifest, "model.onnx", _maker(),
                                   prepare_missing=True, work=registry.work_folder)
        made.append(choice.prepared_now)

    threads = [threading.Thread(target=load) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(made) == [False, False, True]


# -- earlier releases, verify -----------------------------------------------------------------------


def test_a_version_the_previous_release_added_loads_and_gets_its_graphs_prepared(
        tmp_path: Path, speech_wav: bytes) -> None:
    root = shutil.copytree(FIXTURE, tmp_path / "registry")
    registry = Registry(root)
    manifest_bytes = (root / "versions" / "v1" / MANIFEST).read_bytes()
    assert "prepared" not in json.loads(manifest_bytes) and registry.manifest("v1").prepared == []

    engine, _ = _build(registry, "v1", prepare_on_load=False)
    assert not engine.prepared and "has no prepared graph" in engine.sessions[0]["reason"]
    assert not (root / "versions" / "v1" / prepared.PREPARED_DIR).exists()  # off: the folder is left alone

    engine, _ = _build(registry, "v1")
    assert engine.prepared and "has no prepared graph" in engine.sessions[0]["reason"]
    assert isinstance(engine, AsrEngine) and engine.transcribe(synth.speech_like(1.5, seed=1)).endswith("> legacy one")
    assert (root / "versions" / "v1" / MANIFEST).read_bytes() == manifest_bytes
    registry.verify("v1")


def test_verify_checks_the_originals_and_never_the_prepared_graphs(
        tmp_path: Path, kind_folder: KindFolder) -> None:  # noqa: F811
    registry = Registry(tmp_path / "registry").ensure()
    registry.add(kind_folder("sensevoice", **KINDS["sensevoice"]), "v1", prepare=_maker())
    folder, _ = _unit(registry, "v1")
    _damage(folder / "model.onnx.data")
    assert isinstance(registry.verify("v1"), Manifest)
    assert cli(["registry", "verify", "v1", "--registry", str(registry.root)]) == 0
    _damage(registry.version_dir("v1") / "model.onnx")
    with pytest.raises(VerificationFailed, match=r"model\.onnx fails its sha256 check"):
        registry.verify("v1")


def test_the_cli_prepares_at_add_unless_told_not_to_and_registry_prepare_makes_what_is_missing(
        tmp_path: Path, kind_folder: KindFolder, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    folder, reg = str(kind_folder("ct-punc", **KINDS["ct-punc"])), str(tmp_path / "registry")
    assert cli(["registry", "add", folder, "--version", "v1", "--registry", reg]) == 0
    assert "1 graph(s) prepared for this host" in capsys.readouterr().out
    monkeypatch.setenv("VOXSWAP_PREPARE_ON_ADD", "false")
    assert cli(["registry", "add", folder, "--version", "v2", "--registry", reg]) == 0
    assert "0 graph(s) prepared" in capsys.readouterr().out
    for expected in ("prepared now (model.onnx has no prepared graph", "already prepared for this host"):
        assert cli(["registry", "prepare", "v2", "--registry", reg]) == 0
        assert expected in capsys.readouterr().out


def test_the_status_says_which_graph_each_session_loaded(client: TestClient) -> None:
    """An operator sees whether the live version runs from its prepared graph, and why not."""
    model = client.get("/api/system/status").json()["models"][0]
    (session,) = model["sessions"]
    assert session["source"] == model["model_file"] and session["prepared"] is True
    assert session["optimised_at_load"] is False
