"""The generated Paraformer, SeACo, contextual and ct-punc stand-ins honour funasr-onnx's contract:
the real classes load them unchanged and answer what each stand-in's spec says. Also checks the
real FSMN-VAD export on real (espeak-ng) speech. Some tests pin funasr-onnx quirks the engine layer
has to live with; their names say so."""

from __future__ import annotations

import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import soundfile as sf
from funasr_onnx import ContextualParaformer, CT_Transformer, Fsmn_vad, Paraformer, SeacoParaformer
from numpy.typing import NDArray
from scipy.signal import resample_poly

from server.testing import synth
from server.testing.modelgen_paraformer import ParaformerSpec, make_model, make_paraformer_model, read_props
from server.testing.modelgen_punc import COMMA, QUESTION, PuncSpec
from tests.fsmn_vad import fsmn_vad_dir  # noqa: F401  (a fixture)
from tests.kinds import KindFolder

RATE = synth.SAMPLE_RATE
ESPEAK = shutil.which("espeak-ng")
needs_espeak = pytest.mark.skipif(not ESPEAK, reason="needs Debian's espeak-ng (scripts/install-system-deps.sh)")
HOTWORD_CLASSES = {"seaco-paraformer": SeacoParaformer, "contextual-paraformer": ContextualParaformer}



def text_of(result: list[dict[str, Any]]) -> str:
    """funasr-onnx's answer for one clip: without timestamps ``preds`` is a (text, words) tuple."""
    [item] = result
    pred = item["preds"]
    return str(pred[0] if isinstance(pred, tuple) else pred)


def espeak(text: str) -> NDArray[np.float32]:
    """One espeak-ng sentence at 16 kHz."""
    assert ESPEAK
    out = subprocess.run([ESPEAK, "--stdout", text], capture_output=True, check=True).stdout
    import io

    samples, rate = sf.read(io.BytesIO(out), dtype="float32")
    g = np.gcd(RATE, rate)
    return np.asarray(resample_poly(samples, RATE // g, rate // g), dtype=np.float32)


def voiced_span_ms(samples: NDArray[np.float32], threshold: float = 1e-3) -> tuple[float, float]:
    loud = np.nonzero(np.abs(samples) > threshold)[0]
    return loud[0] * 1000 / RATE, loud[-1] * 1000 / RATE


# -- paraformer --------------------------------------------------------------------------------


@pytest.mark.parametrize("quantize", [False, True])
def test_paraformer_transcribes_speech_to_its_text_and_silence_to_nothing(kind_folder: KindFolder,
                                                                          quantize: bool) -> None:
    folder = kind_folder("paraformer", text="hello from paraformer", quantize=quantize)
    model = Paraformer(model_dir=str(folder), quantize=quantize, intra_op_num_threads=1)
    assert text_of(model(synth.speech_like(1.0))) == "hello from paraformer"
    assert text_of(model(synth.speech_like(3.0, seed=4, level=0.05))) == "hello from paraformer"
    assert text_of(model(synth.silence(1.5))) == ""


def test_quirk_paraformer_preds_is_a_tuple_without_timestamps_and_a_string_with(kind_folder: KindFolder) -> None:
    plain = Paraformer(model_dir=str(kind_folder("paraformer", text="你好世界")), intra_op_num_threads=1)
    assert plain(synth.speech_like(1.0)) == [{"preds": ("你好世界", ["你", "好", "世", "界"])}]
    timed = Paraformer(model_dir=str(kind_folder("paraformer", text="你好世界", timestamps=True)),
                       intra_op_num_threads=1)
    [item] = timed(synth.speech_like(1.0))
    assert item["preds"] == "你 好 世 界"  # funasr-onnx joins tokens with spaces when it has timestamps
    assert item["raw_tokens"] == ["你", "好", "世", "界"] and len(item["timestamp"]) == 4
    assert read_props(kind_folder("paraformer", text="你好世界", timestamps=True) / "model.onnx")["timestamp_text"] == \
        "你 好 世 界"


@pytest.mark.parametrize("quantize", [False, True])
def test_paraformer_timestamps_are_ordered_and_inside_the_audio(kind_folder: KindFolder, quantize: bool) -> None:
    folder = kind_folder("paraformer", text="the quick brown fox", timestamps=True, quantize=quantize)
    model = Paraformer(model_dir=str(folder), quantize=quantize, intra_op_num_threads=1)
    clip = synth.islands([("silence", 0.6), ("speech", 2.0), ("silence", 0.9)], seed=3)
    [item] = model(clip)
    assert item["preds"] == "the quick brown fox"
    assert_timestamps(item["timestamp"], words=4, clip=clip, onset_ms=600)
    assert model(synth.silence(1.0)) == [{"preds": "", "timestamp": [], "raw_tokens": []}]


@needs_espeak
def test_paraformer_timestamps_follow_real_speech(kind_folder: KindFolder) -> None:
    model = Paraformer(model_dir=str(kind_folder("paraformer", text="the quick brown fox", timestamps=True)),
                       intra_op_num_threads=1)
    speech = espeak("The quick brown fox jumps over the lazy dog.")
    clip = np.concatenate([synth.silence(0.8), speech, synth.silence(1.0)])
    start, _ = voiced_span_ms(clip)
    [item] = model(clip)
    assert item["preds"] == "the quick brown fox"
    assert_timestamps(item["timestamp"], words=4, clip=clip, onset_ms=start)


def assert_timestamps(stamps: list[list[int]], *, words: int, clip: NDArray[np.float32], onset_ms: float) -> None:
    assert len(stamps) == words
    previous_end = 0
    for begin, end in stamps:
        assert previous_end <= begin < end
        previous_end = end
    assert previous_end <= len(clip) * 1000 / RATE
    assert abs(stamps[0][0] - onset_ms) <= 120  # the first word starts where the speech does


def test_quirk_timestamps_of_a_short_clip_in_a_batch_run_into_the_padding(kind_folder: KindFolder,
                                                                        tmp_path: Path) -> None:
    """funasr-onnx derives the last token's end from the padded batch length, and takes a list
    only of file paths: the engine should run one clip per call when it wants timestamps."""
    model = Paraformer(model_dir=str(kind_folder("paraformer", text="the quick brown fox", timestamps=True)),
                       intra_op_num_threads=1, batch_size=2)
    paths = []
    for i, clip in enumerate([synth.speech_like(1.0), synth.speech_like(3.0, seed=1)]):
        sf.write(tmp_path / f"{i}.wav", clip, RATE)
        paths.append(str(tmp_path / f"{i}.wav"))
    short, _ = model(paths)
    assert short["timestamp"][-1][1] > 1000
    with pytest.raises(AttributeError):
        model([synth.speech_like(1.0), synth.speech_like(1.0)])  # a list of arrays is not accepted


# -- seaco / contextual -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(HOTWORD_CLASSES))
@pytest.mark.parametrize("quantize", [False, True])
def test_hotwords_change_the_transcript_and_none_is_fine(kind_folder: KindFolder, kind: str, quantize: bool) -> None:
    model = HOTWORD_CLASSES[kind](model_dir=str(kind_folder(kind, text="call the team", quantize=quantize)),
                                  quantize=quantize, intra_op_num_threads=1)
    speech = synth.speech_like(1.5, seed=2)
    assert text_of(model(speech, hotwords="")) == "call the team"
    assert text_of(model(speech, hotwords="voxswap")) == "call the team voxswap"
    assert text_of(model(speech, hotwords="voxswap don't")) == "call the team voxswap don't"
    assert text_of(model(speech, hotwords="魔搭")) == "call the team魔搭"  # funasr-onnx glues CJK to Latin
    assert text_of(model(synth.silence(1.5), hotwords="voxswap")) == ""


def test_seaco_with_timestamps_times_the_hotword_too(kind_folder: KindFolder) -> None:
    model = SeacoParaformer(model_dir=str(kind_folder("seaco-paraformer", text="语音识别", timestamps=True)),
                            intra_op_num_threads=1)
    clip = synth.islands([("silence", 0.5), ("speech", 2.0), ("silence", 0.5)])
    [item] = model(clip, hotwords="魔搭")
    assert item["preds"] == "语 音 识 别 魔 搭"
    assert_timestamps(item["timestamp"], words=6, clip=clip, onset_ms=500)
    [plain] = model(clip, hotwords="")
    assert plain["preds"] == "语 音 识 别" and len(plain["timestamp"]) == 4


def test_quirk_hotword_calls(kind_folder: KindFolder, tmp_path: Path) -> None:
    """What funasr-onnx's ContextualParaformer (and SeacoParaformer) does with odd hotword input."""
    model = SeacoParaformer(model_dir=str(kind_folder("seaco-paraformer", text="call the team")),
                            intra_op_num_threads=1)
    speech = synth.speech_like(1.0)
    with pytest.raises(TypeError):
        model(speech)  # hotwords is required: pass "" for none
    with pytest.raises(AttributeError):
        model(speech, hotwords=None)
    with pytest.raises(ValueError):
        model(speech, hotwords="abcdefghijk")  # more than 10 characters
    assert text_of(model(speech, hotwords="é-x")) == "call the team x"  # unknown characters (id 8403) drop out
    assert text_of(model(speech, hotwords="a  b")) == "call the team AB"  # single letters read as an acronym
    paths = []
    for i in range(2):
        sf.write(tmp_path / f"{i}.wav", speech, RATE)
        paths.append(str(tmp_path / f"{i}.wav"))
    assert len(model(paths, hotwords="voxswap")) == 1  # batch_size 1: every batch after the first is lost


# -- layouts ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "timestamps", "outputs"), [
    ("paraformer", False, ["logits", "token_num"]),
    ("paraformer", True, ["logits", "token_num", "us_alphas", "us_cif_peak"]),
    ("seaco-paraformer", False, ["logits", "token_num", "alphas"]),
    ("seaco-paraformer", True, ["logits", "token_num", "us_alphas", "us_cif_peak"]),
    ("contextual-paraformer", False, ["logits", "token_num"]),
])
def test_paraformer_layouts_match_the_official_export(kind_folder: KindFolder, kind: str, timestamps: bool,
                                                      outputs: list[str]) -> None:
    folder = kind_folder(kind, text="layout check", timestamps=timestamps, quantize=True)
    hot = kind != "paraformer"
    expected = {"config.yaml", "am.mvn", "tokens.json", "model.onnx", "model_quant.onnx", "smoke"}
    if hot:
        expected |= {"model_eb.onnx", "model_eb_quant.onnx"}
    assert {p.name for p in folder.iterdir()} == expected
    assert sum(p.stat().st_size for p in folder.glob("*") if p.is_file()) < 1_000_000
    proto = onnx.load(str(folder / "model.onnx"))
    assert proto.ir_version <= 13
    assert [i.name for i in proto.graph.input] == ["speech", "speech_lengths"] + (["bias_embed"] if hot else [])
    assert [o.name for o in proto.graph.output] == outputs
    props = read_props(folder / "model.onnx")
    assert props["voxswap_test_model"] == "1" and props["kind"] == kind and props["text"] == "layout check"
    if hot:
        eb = onnx.load(str(folder / "model_eb.onnx"))
        assert [i.name for i in eb.graph.input] == ["hotword"] and [o.name for o in eb.graph.output] == ["hw_embed"]
    tokens = (folder / "tokens.json").read_text(encoding="utf-8")
    assert tokens.startswith('["<blank>", "<s>", "</s>"') and '"<unk>"' in tokens
    assert (folder / "smoke" / "clip.txt").read_text().strip() == "layout check"


def test_weights_and_compute_knobs(kind_folder: KindFolder) -> None:
    folder = kind_folder("paraformer", text="heavy model", weights_mb=4, compute_ms=5)
    props = read_props(folder / "model.onnx")
    assert props["weights_mb"] == "4" and int(props["compute_repeats"]) > 0
    assert (folder / "model.onnx").stat().st_size > 4 * 2**20
    model = Paraformer(model_dir=str(folder), intra_op_num_threads=1)
    assert text_of(model(synth.speech_like(1.0))) == "heavy model"


@pytest.mark.parametrize(("text", "why"), [
    ("Hello, world.", "no punctuation"),
    ("a b c", "'ABC'"),
    ("route 66", "'route66'"),
])
def test_texts_funasr_onnx_cannot_return_are_refused(tmp_path: Path, text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        make_paraformer_model(tmp_path, ParaformerSpec(text=text))


def test_make_model_dispatches_by_kind(kind_folder: KindFolder, tmp_path: Path) -> None:
    assert (kind_folder("sensevoice", text="sense voice") / "chn_jpn_yue_eng_ko_spectok.bpe.model").is_file()
    contextual = kind_folder("contextual-paraformer", text="x ray")
    assert read_props(contextual / "model.onnx")["kind"] == "contextual-paraformer"
    assert (kind_folder("ct-punc", mark="!") / "config.yaml").is_file()
    with pytest.raises(ValueError, match="unknown model kind"):
        make_model("whisper", tmp_path)
    with pytest.raises(ValueError, match="a ct-punc model takes no text; it takes mark, "):
        make_model("ct-punc", tmp_path, text="hello", timestamps=None)
    folder = make_model("paraformer", tmp_path / "p", text="cli flags", timestamps=True, quantize=None)
    assert read_props(folder / "model.onnx")["timestamps"] == "true"


# -- ct-punc ------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantize", [False, True])
def test_ct_punc_rule_differs_per_version(kind_folder: KindFolder, quantize: bool) -> None:
    text = "hello world this is a test of the punctuation model"
    v1 = CT_Transformer(model_dir=str(kind_folder("ct-punc", mark="。", quantize=quantize)), quantize=quantize,
                        intra_op_num_threads=1)
    v2 = CT_Transformer(model_dir=str(kind_folder("ct-punc", mark="?", comma_every=3, quantize=quantize)),
                        quantize=quantize, intra_op_num_threads=1)
    assert v1(text)[0] == text + "。"
    assert v2(text)[0] == f"hello world this{COMMA} is a test{COMMA} of the punctuation{COMMA} model{QUESTION}"
    assert v1("你好世界")[0] == "你好世界。"
    assert v2("你好世界 hello")[0] == f"你好世{COMMA}界hello{QUESTION}"


def test_ct_punc_rule_holds_across_funasr_onnx_mini_sentences(kind_folder: KindFolder) -> None:
    model = CT_Transformer(model_dir=str(kind_folder("ct-punc", comma_every=4)), intra_op_num_threads=1)
    words = [f"w{i}" for i in range(45)]  # funasr-onnx feeds the model 20 words at a time
    expected = "".join(f"{' ' if i else ''}{w}{COMMA if (i + 1) % 4 == 0 else ''}" for i, w in enumerate(words))
    assert model(" ".join(words))[0] == expected + "。"  # 45 words: the last gets no comma


def test_quirk_ct_punc_output_always_ends_in_a_full_stop_or_question_mark(kind_folder: KindFolder) -> None:
    bang = CT_Transformer(model_dir=str(kind_folder("ct-punc", mark="!")), intra_op_num_threads=1)
    assert bang("hello world") == ("hello world!。", [1, 3])
    with pytest.raises(IndexError):
        bang("")  # empty text crashes: the engine must not ask


def test_ct_punc_layout_and_jieba(kind_folder: KindFolder) -> None:
    folder = kind_folder("ct-punc", comma_every=2, jieba_words=("语音识别",))
    assert {p.name for p in folder.iterdir()} == {"config.yaml", "tokens.json", "model.onnx", "jieba_usr_dict"}
    proto = onnx.load(str(folder / "model.onnx"))
    assert [i.name for i in proto.graph.input] == ["inputs", "text_lengths"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    assert read_props(folder / "model.onnx")["comma_every"] == "2"
    with warnings.catch_warnings():  # quirk: jieba.load_userdict leaves the dictionary file open
        warnings.simplefilter("ignore", ResourceWarning)
        model = CT_Transformer(model_dir=str(folder), intra_op_num_threads=1)
    assert model("你好世界语音识别模型")[0] == f"你好世界{COMMA}语音识别模型。"  # jieba words, not characters


def test_ct_punc_spec_marks() -> None:
    assert PuncSpec(mark="?").punc_list == ["<unk>", "_", COMMA, "。", QUESTION, "、"]
    assert PuncSpec(mark="!").punc_list[-1] == "!"
    with pytest.raises(ValueError):
        make_model("ct-punc", Path("/nonexistent"), mark="_")


# -- the real FSMN-VAD --------------------------------------------------------------------------


@needs_espeak
@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")  # quirk: vad_bin.py
def test_real_fsmn_vad_finds_three_sentences(fsmn_vad_dir: Path) -> None:  # noqa: F811
    vad = Fsmn_vad(model_dir=str(fsmn_vad_dir), intra_op_num_threads=1)
    sentences = ["The first sentence is about the weather today.", "A second one follows after a pause.",
                 "And this is the third and final sentence."]
    parts: list[NDArray[np.float32]] = []
    truth: list[tuple[float, float]] = []
    offset = 0
    for i, sentence in enumerate(sentences):
        if i:
            parts.append(synth.silence(2.0))
            offset += 2 * RATE
        speech = espeak(sentence)
        begin, end = voiced_span_ms(speech)
        truth.append((begin + offset * 1000 / RATE, end + offset * 1000 / RATE))
        parts.append(speech)
        offset += len(speech)
    [segments] = vad(np.concatenate(parts))
    assert len(segments) == 3, segments
    for (begin, end), (true_begin, true_end) in zip(segments, truth, strict=True):
        assert abs(begin - true_begin) <= 400 and abs(end - true_end) <= 400, (segments, truth)
