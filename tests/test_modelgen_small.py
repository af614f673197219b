"""The SenseVoice-small stand-in has the real architecture and cost, and still says who computed it.

The full-size tests build the real 234M-parameter graph (~940 MB fp32 plus ~240 MB int8, about 45 s
on two cores, most of it onnxruntime's quantizer), so they are marked e2e; the unmarked tests check
the same contract on a two-block build of the same code in a few seconds.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from funasr_onnx import SenseVoiceSmall

from server.testing import synth
from server.testing.modelgen_small import (
    EXPECTED_PARAMETERS,
    KERNEL_SIZE,
    OUTPUT_SIZE,
    TEXT_SCORE,
    VOCAB_SIZE,
    SmallSpec,
    make_sensevoice_small,
    parameter_count,
)

TEXT = "the small stand in says hello"
SPEECH = f"<|en|><|NEUTRAL|><|Speech|><|woitn|> {TEXT}"
SILENCE = "<|nospeech|><|EMO_UNKNOWN|><|Event_UNK|><|woitn|>"
CHEAP = SmallSpec(text=TEXT, quantize=True, num_blocks=2, tp_blocks=1)
FULL = SmallSpec(text=TEXT, quantize=True)
Loader = Callable[[bool], SenseVoiceSmall]


def _loader(folder: Path) -> Loader:
    cache: dict[bool, SenseVoiceSmall] = {}

    def load(quantize: bool) -> SenseVoiceSmall:
        if quantize not in cache:
            cache[quantize] = SenseVoiceSmall(model_dir=str(folder), quantize=quantize, intra_op_num_threads=2)
        return cache[quantize]

    return load


@pytest.fixture(scope="module")
def cheap(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Loader]:
    folder = make_sensevoice_small(tmp_path_factory.mktemp("small") / "cheap", CHEAP)
    return folder, _loader(folder)


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Loader]:
    folder = make_sensevoice_small(tmp_path_factory.mktemp("small") / "full", FULL)
    return folder, _loader(folder)


def _graph_stats(path: Path) -> tuple[Counter[str], int, int]:
    """Op counts, depthwise kernel-11 convolutions, and float parameters of a saved graph."""
    graph = onnx.load(str(path)).graph
    depthwise = 0
    for node in graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv" and attrs.get("group") == OUTPUT_SIZE and attrs.get("kernel_shape") == [KERNEL_SIZE]:
            assert attrs["pads"] == [5, 5]  # MultiHeadedAttentionSANM's padding with sanm_shfit 0
            depthwise += 1
    params = sum(int(np.prod(i.dims)) for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT)
    return Counter(n.op_type for n in graph.node), depthwise, params


def _check_transcribes(load: Loader, quantize: bool) -> None:
    model = load(quantize)
    assert model(synth.speech_like(2.0, seed=3)) == [SPEECH]
    assert model(synth.silence(1.5)) == [SILENCE]


def _check_logits_depend_on_input(load: Loader, quantize: bool) -> None:
    model = load(quantize)
    feats, lengths = model.extract_feat([synth.speech_like(2.0, seed=1), synth.speech_like(2.0, seed=2)])
    logits, out_lens = model.infer(feats, lengths, np.zeros(2, np.int32), np.full(2, 15, np.int32))
    assert logits.shape == (2, feats.shape[1] + 4, VOCAB_SIZE)
    assert out_lens.tolist() == (lengths + 4).tolist()
    best = logits.argmax(-1)
    assert (best[0] == best[1]).all()  # the same text path for both clips...
    assert np.abs(logits[0] - logits[1]).max() > 1e-3  # ...but the encoder's share differs (float noise ~1e-6)
    chosen = np.take_along_axis(logits, best[..., None], -1)
    assert np.abs(chosen - TEXT_SCORE).max() < 0.5 and np.abs(np.where(logits > 10, 0, logits)).max() < 0.5


def test_parameter_count_is_sensevoice_smalls() -> None:
    assert parameter_count(FULL) == 233_999_167
    assert abs(parameter_count(FULL) - EXPECTED_PARAMETERS) < 0.01 * EXPECTED_PARAMETERS


def test_cheap_build_has_the_graph_the_formula_counts(cheap: tuple[Path, Loader]) -> None:
    folder, _ = cheap
    ops, depthwise, params = _graph_stats(folder / "model.onnx")
    assert depthwise == 3 and ops["LayerNormalization"] == 2 * 3 + 2
    assert 0 <= params - parameter_count(CHEAP) < 1000  # plus a few scalar constants
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    assert proto.ir_version <= 13  # onnxruntime 1.31 refuses IR 14
    assert [i.name for i in proto.graph.input] == ["speech", "speech_lengths", "language", "textnorm"]
    assert [o.name for o in proto.graph.output] == ["ctc_logits", "encoder_out_lens"]
    props = {p.key: p.value for p in proto.metadata_props}
    assert props["voxswap_test_model"] == "1" and props["arch"] == "sensevoice-small" and props["text"] == TEXT
    quant_ops, _, _ = _graph_stats(folder / "model_quant.onnx")
    assert quant_ops["MatMulInteger"] == 4 * 3 + 1  # every linear layer and the CTC head, as the export does


@pytest.mark.parametrize("quantize", [False, True], ids=["fp32", "int8"])
def test_cheap_build_transcribes_and_its_logits_depend_on_input(cheap: tuple[Path, Loader], quantize: bool) -> None:
    _check_transcribes(cheap[1], quantize)
    _check_logits_depend_on_input(cheap[1], quantize)


@pytest.mark.e2e
@pytest.mark.long
def test_full_graph_is_sensevoice_small(full: tuple[Path, Loader]) -> None:
    folder, _ = full
    ops, depthwise, params = _graph_stats(folder / "model.onnx")
    assert depthwise == 70  # 50 encoders + 20 tp_encoders, each with its FSMN memory
    assert ops["LayerNormalization"] == 2 * 70 + 2 and ops["Softmax"] == 70
    assert abs(params - EXPECTED_PARAMETERS) < 0.01 * EXPECTED_PARAMETERS
    quant_ops, _, _ = _graph_stats(folder / "model_quant.onnx")
    assert quant_ops["MatMulInteger"] == 4 * 70 + 1
    assert (folder / "model_quant.onnx").stat().st_size < 0.3 * (folder / "model.onnx").stat().st_size


@pytest.mark.e2e
@pytest.mark.long
@pytest.mark.parametrize("quantize", [False, True], ids=["fp32", "int8"])
def test_full_model_transcribes_and_its_logits_depend_on_input(full: tuple[Path, Loader], quantize: bool) -> None:
    _check_transcribes(full[1], quantize)
    _check_logits_depend_on_input(full[1], quantize)
