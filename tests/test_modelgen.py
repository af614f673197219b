"""The generated SenseVoice-format test models honour funasr-onnx's contract."""

from __future__ import annotations

import gc
from collections.abc import Callable
from pathlib import Path

import onnx
import psutil
import pytest
from funasr_onnx import SenseVoiceSmall

from server.lifecycle.holder import malloc_trim
from server.testing import synth
from server.testing.modelgen import LANGUAGE_IDS, read_test_model_props


def test_funasr_onnx_loads_a_generated_folder_and_transcribes_its_text(model_dir: Callable[..., Path]) -> None:
    model = SenseVoiceSmall(model_dir=str(model_dir("hello from the test model")), intra_op_num_threads=1)
    [raw] = model(synth.speech_like(1.0), language="auto", textnorm="woitn")
    assert raw == "<|en|><|NEUTRAL|><|Speech|><|woitn|> hello from the test model"


def test_two_versions_transcribe_differently(model_dir: Callable[..., Path]) -> None:
    clip = synth.speech_like(2.0, seed=9)
    outputs = {SenseVoiceSmall(model_dir=str(model_dir(t)), intra_op_num_threads=1)(clip)[0] for t in ("one", "two")}
    assert len(outputs) == 2


@pytest.mark.parametrize("language", sorted(set(LANGUAGE_IDS) - {"auto", "nospeech"}))
def test_the_language_asked_for_is_tagged(model_dir: Callable[..., Path], language: str) -> None:
    model = SenseVoiceSmall(model_dir=str(model_dir("lang test")), intra_op_num_threads=1)
    assert model(synth.speech_like(1.0), language=language)[0].startswith(f"<|{language}|>")


def test_emotion_event_itn_and_silence(model_dir: Callable[..., Path]) -> None:
    model = SenseVoiceSmall(model_dir=str(model_dir("so happy", emotion="HAPPY", event="Laughter")),
                            intra_op_num_threads=1)
    assert model(synth.speech_like(1.0), textnorm="withitn")[0] == \
        "<|en|><|HAPPY|><|Laughter|><|withitn|> So happy."
    assert model(synth.silence(1.5))[0] == "<|nospeech|><|EMO_UNKNOWN|><|Event_UNK|><|woitn|>"


def test_repeated_words_survive_ctc_collapse(model_dir: Callable[..., Path]) -> None:
    model = SenseVoiceSmall(model_dir=str(model_dir("no no no")), intra_op_num_threads=1)
    assert model(synth.speech_like(1.0))[0].endswith(" no no no")


def test_quantized_file_and_metadata(model_dir: Callable[..., Path]) -> None:
    folder = model_dir("quantized", quantize=True)
    assert (folder / "model_quant.onnx").is_file()
    model = SenseVoiceSmall(model_dir=str(folder), quantize=True, intra_op_num_threads=1)
    assert model(synth.speech_like(1.0))[0].endswith(" quantized")
    props = read_test_model_props(folder / "model.onnx")
    assert props["text"] == "quantized" and props["voxswap_test_model"] == "1"
    proto = onnx.load(str(folder / "model.onnx"))
    assert proto.ir_version <= 13  # onnxruntime 1.31 refuses IR 14
    assert [i.name for i in proto.graph.input] == ["speech", "speech_lengths", "language", "textnorm"]
    assert [o.name for o in proto.graph.output] == ["ctc_logits", "encoder_out_lens"]


def test_weights_mb_stays_resident_after_load_and_is_given_back(model_dir: Callable[..., Path]) -> None:
    folder = model_dir("heavy", weights_mb=96)
    process = psutil.Process()
    gc.collect()
    malloc_trim()
    before = process.memory_info().rss
    model = SenseVoiceSmall(model_dir=str(folder), intra_op_num_threads=1)
    assert model(synth.speech_like(1.0))[0].endswith(" heavy")
    loaded = process.memory_info().rss
    assert loaded - before > 80 * 2**20
    del model
    gc.collect()
    malloc_trim()
    assert process.memory_info().rss - before < 40 * 2**20


def test_compute_ms_adds_work_proportional_to_audio(model_dir: Callable[..., Path]) -> None:
    props = read_test_model_props(model_dir("busy", compute_ms=40) / "model.onnx")
    assert int(props["compute_repeats"]) > 0 and float(props["compute_ms"]) == 40
