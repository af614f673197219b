"""Model kinds on disk: each official layout is recognised from its files, each kind's required files
are checked before anything is copied, a model refuses a version of another kind, and
``make-test-model`` writes a stand-in of every kind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from server.errors import RegistryError
from server.storage.catalog import ModelCatalog
from server.storage.manifest import Manifest, check_model_folder, detect_kind
from server.storage.registry import Registry
from server.testing.modelgen_paraformer import MODEL_KINDS, read_props
from server.tools.cli import main as cli
from server.tools.cli_models import MODEL_KINDS as CLI_KINDS
from server.vocab import ModelKind
from tests.fsmn_vad import fsmn_vad_dir  # noqa: F401  (a fixture)
from tests.kinds import KindFolder, kind_folder  # noqa: F401  (a fixture)

GENERATED = {
    "sensevoice": {"text": "sense voice"},
    "paraformer": {"text": "plain paraformer", "quantize": True},
    "seaco-paraformer": {"text": "seaco model", "quantize": True},
    "contextual-paraformer": {"text": "contextual model"},
    "ct-punc": {"mark": "?"},
}


@pytest.mark.parametrize("kind", sorted(GENERATED))
def test_each_generated_layout_is_detected_as_its_kind(kind_folder: KindFolder, kind: str) -> None:  # noqa: F811
    assert detect_kind(kind_folder(kind, **GENERATED[kind])) == kind


def test_the_real_fsmn_vad_export_is_detected(fsmn_vad_dir: Path) -> None:  # noqa: F811
    assert detect_kind(fsmn_vad_dir) == ModelKind.FSMN_VAD


def test_a_paraformer_with_timestamps_is_a_paraformer(kind_folder: KindFolder) -> None:  # noqa: F811
    assert detect_kind(kind_folder("paraformer", text="timed words", timestamps=True)) == ModelKind.PARAFORMER


def test_seaco_and_contextual_need_their_config_to_tell_them_apart(kind_folder: KindFolder,  # noqa: F811
                                                                   tmp_path: Path) -> None:
    folder = shutil.copytree(kind_folder("seaco-paraformer", text="seaco model", quantize=True), tmp_path / "hw")
    config = (folder / "config.yaml").read_text()
    neutral = config.replace("model: SeacoParaformer", "model: SomeParaformer").replace("CifPredictorV3", "Cif")
    (folder / "config.yaml").write_text(neutral)
    with pytest.raises(RegistryError, match="--kind seaco-paraformer or --kind contextual-paraformer"):
        detect_kind(folder)
    check_model_folder(folder, ModelKind.CONTEXTUAL_PARAFORMER)  # said with --kind, it is fine
    (folder / "model_eb_quant.onnx").unlink()
    with pytest.raises(RegistryError, match=r"missing model_eb_quant\.onnx \(the hotword embedder beside "
                                            r"model_quant\.onnx\)"):
        check_model_folder(folder, ModelKind.SEACO_PARAFORMER)


def test_each_kind_checks_its_own_files(kind_folder: KindFolder, fsmn_vad_dir: Path) -> None:  # noqa: F811
    punc = kind_folder("ct-punc", mark="?")
    with pytest.raises(RegistryError, match=r"not a Paraformer ONNX folder: missing am\.mvn"):
        check_model_folder(punc, ModelKind.PARAFORMER)
    with pytest.raises(RegistryError, match=r"not a SenseVoice ONNX folder: missing am\.mvn, chn_jpn"):
        check_model_folder(punc, ModelKind.SENSEVOICE)
    with pytest.raises(RegistryError, match=r"not a CT-Transformer punctuation ONNX folder: missing tokens\.json"):
        check_model_folder(fsmn_vad_dir, ModelKind.CT_PUNC)
    para = kind_folder("paraformer", text="plain paraformer", quantize=True)
    with pytest.raises(RegistryError, match=r"FSMN-VAD ONNX folder: missing model_conf\.max_end_silence_time in "
                                            r"config\.yaml"):
        check_model_folder(para, ModelKind.FSMN_VAD)


def test_a_folder_of_no_kind_is_refused_with_what_a_sensevoice_folder_would_need(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("model: Whisper\n")
    with pytest.raises(RegistryError, match=r"missing am\.mvn.*model_quant\.onnx or model\.onnx.*fit no model kind"):
        detect_kind(tmp_path)
    (tmp_path / "config.yaml").write_text("model: [unclosed\n")
    with pytest.raises(RegistryError, match=r"config\.yaml cannot be read"):
        detect_kind(tmp_path)


def test_a_model_refuses_a_version_of_another_kind(tmp_path: Path, kind_folder: KindFolder) -> None:  # noqa: F811
    cat = ModelCatalog(tmp_path / "reg")
    para = cat.create("para", "paraformer")
    with pytest.raises(RegistryError, match="model 'para' holds paraformer versions; a seaco-paraformer version"):
        para.add(kind_folder("seaco-paraformer", text="seaco model", quantize=True), "v1")
    with pytest.raises(RegistryError, match="a sensevoice version cannot be added"):
        para.add(kind_folder("sensevoice", text="sense voice"), "v1", kind="sensevoice")
    manifest = para.add(kind_folder("paraformer", text="plain paraformer", quantize=True), "v1")
    assert (manifest.kind, manifest.model_file(), manifest.metadata["generated"]) == ("paraformer",
                                                                                     "model_quant.onnx", True)
    default = Registry(tmp_path / "reg").ensure()
    default.add(kind_folder("sensevoice", text="sense voice"), "s1")
    with pytest.raises(RegistryError, match="holds sensevoice versions"):
        default.add(kind_folder("paraformer", text="plain paraformer", quantize=True), "p1")


def test_manifests_keep_only_the_clip_fields_earlier_releases_know(tmp_path: Path,
                                                                   kind_folder: KindFolder) -> None:  # noqa: F811
    reg = Registry(tmp_path / "reg").ensure()
    manifest = reg.add(kind_folder("paraformer", text="plain paraformer", quantize=True), "v1")
    on_disk = json.loads((reg.version_dir("v1") / "manifest.json").read_text())
    assert [set(clip) for clip in on_disk["smoke"]] == [{"audio", "text", "language", "use_itn"}]
    assert Manifest.from_json(on_disk).smoke == manifest.smoke


def test_a_hotword_model_loads_the_quantized_pair_only_when_both_are_there(tmp_path: Path,
                                                                          kind_folder: KindFolder) -> None:  # noqa: F811
    folder = shutil.copytree(kind_folder("seaco-paraformer", text="seaco model", quantize=True), tmp_path / "hw")
    (folder / "model_eb_quant.onnx").unlink()
    (folder / "model_quant.onnx").unlink()
    reg = Registry(tmp_path / "reg").ensure()
    assert reg.add(folder, "v1").model_file() == "model.onnx"


def test_make_test_model_writes_every_kind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert set(CLI_KINDS) == set(MODEL_KINDS)
    assert cli(["make-test-model", str(tmp_path / "s"), "--kind", "seaco-paraformer", "--text", "x ray",
                "--quantize", "--timestamps"]) == 0
    assert "a seaco-paraformer test model, not real ASR" in capsys.readouterr().out
    props = read_props(tmp_path / "s" / "model.onnx")
    assert (props["kind"], props["timestamps"]) == ("seaco-paraformer", "true")
    assert (tmp_path / "s" / "model_eb_quant.onnx").is_file()
    assert cli(["make-test-model", str(tmp_path / "p"), "--kind", "ct-punc", "--mark", "?", "--comma-every", "3"]) == 0
    assert "not a real punctuation model" in capsys.readouterr().out
    assert detect_kind(tmp_path / "p") == ModelKind.CT_PUNC
    assert cli(["make-test-model", str(tmp_path / "d"), "--text", "default kind"]) == 0
    assert detect_kind(tmp_path / "d") == ModelKind.SENSEVOICE
    capsys.readouterr()
    for args, message in [
        (["--kind", "ct-punc", "--text", "words"], "a ct-punc model takes no text"),
        (["--kind", "paraformer"], "a paraformer model needs --text"),
        (["--text", "t", "--timestamps"], "a sensevoice model takes no timestamps"),
        (["--kind", "paraformer", "--text", "t", "--arch", "sensevoice-small"], "is a sensevoice architecture"),
        (["--text", "t", "--arch", "sensevoice-small", "--weights-mb", "3"], "sensevoice-small takes no weights_mb"),
    ]:
        assert cli(["make-test-model", str(tmp_path / "x"), *args]) == 2, args
        assert message in capsys.readouterr().err, args


def test_goldens_of_every_form_travel_in_an_exported_version(tmp_path: Path, kind_folder: KindFolder,  # noqa: F811
                                                              fsmn_vad_dir: Path) -> None:  # noqa: F811
    from server.testing import synth

    clip = tmp_path / "clip.wav"
    clip.write_bytes(synth.wav_bytes(synth.islands([("silence", 0.5), ("speech", 1.0), ("silence", 0.5)])))
    text_in = tmp_path / "in.txt"
    text_in.write_text("hello world\n")
    source = ModelCatalog(tmp_path / "a")
    vad = source.create("vad", "fsmn-vad")
    vad.add(fsmn_vad_dir, "v1", smoke=[(clip, '{"segments": [[500, 1500]], "tolerance_ms": 250}')])
    punc = source.create("punc", "ct-punc")
    punc.add(kind_folder("ct-punc", mark="?"), "c1", smoke=[(text_in, "hello world?")])
    with pytest.raises(RegistryError, match=r"is not a \[start_ms, end_ms\] pair"):
        vad.add(fsmn_vad_dir, "bad", smoke=[(clip, "[[1500, 500]]")])
    target = ModelCatalog(tmp_path / "b")
    for registry, version in ((vad, "v1"), (punc, "c1")):
        archive = registry.export_archive(version, tmp_path / f"{version}.tgz")
        added = target.add_archive(registry.model, archive, version)
        assert added.smoke == registry.manifest(version).smoke, version
        assert target.registry(registry.model).kind() == registry.kind()
    [golden] = target.registry("vad").manifest("v1").smoke
    assert (golden.segments, golden.tolerance_ms, golden.text) == (((500, 1500),), 250, "")
    [text] = target.registry("punc").manifest("c1").smoke
    assert (text.audio, text.text) == ("smoke/given-0.in.txt", "hello world?")
