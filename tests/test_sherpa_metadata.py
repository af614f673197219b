"""sherpa-onnx's C++ recognizer runs the generated stand-ins, so bench/sherpa.py compares like with like.

sherpa-onnx ends its process when a model lacks a metadata key it reads, so every decode runs in a
child Python and the test reads its answers (or its last words) from there.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from server.testing.modelgen import TOKENS_FILE
from server.testing.modelgen_small import VOCAB_SIZE, SmallSpec, make_sensevoice_small

pytestmark = [
    pytest.mark.long,
    pytest.mark.skipif(importlib.util.find_spec("sherpa_onnx") is None,
                       reason="sherpa-onnx is not installed (the test extra has it; pip install sherpa-onnx)"),
]

TEXT = "sherpa reads the stand in"
DECODE = """
import json, sys
import sherpa_onnx
from server.testing import synth

folder, model_file, use_itn = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
recognizer = sherpa_onnx.OfflineRecognizer.from_sense_voice(
    model=f"{folder}/{model_file}", tokens=f"{folder}/tokens.txt", num_threads=1, use_itn=use_itn)
clips = [synth.speech_like(1.5, seed=3), synth.silence(1.5), synth.speech_like(2.5, seed=4)]
streams = []
for clip in clips:
    stream = recognizer.create_stream()
    stream.accept_waveform(synth.SAMPLE_RATE, clip)
    streams.append(stream)
recognizer.decode_stream(streams[0])  # one stream alone, then a padded batch of two
recognizer.decode_streams(streams[1:])
for s in streams:
    r = s.result
    print(json.dumps({"text": r.text.strip(), "tags": [r.lang, r.emotion, r.event]}))
"""


def _sherpa(folder: Path, model_file: str = "model.onnx", *, use_itn: bool = False) -> list[dict[str, object]]:
    done = subprocess.run([sys.executable, "-c", DECODE, str(folder), model_file, "1" if use_itn else "0"],
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, f"sherpa-onnx failed on {model_file}:\n{done.stderr[-2000:]}"
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_sherpa_onnx_decodes_the_generated_stand_in_to_its_sentence(model_dir: Callable[..., Path]) -> None:
    folder = model_dir(TEXT, emotion="HAPPY", event="Laughter")
    speech, silence, batched = _sherpa(folder)
    assert speech == batched == {"text": TEXT, "tags": ["<|en|>", "<|HAPPY|>", "<|Laughter|>"]}
    assert silence == {"text": "", "tags": ["<|nospeech|>", "<|EMO_UNKNOWN|>", "<|Event_UNK|>"]}


def test_sherpa_onnx_asks_for_itn_with_the_ids_the_metadata_names(model_dir: Callable[..., Path]) -> None:
    speech, _, batched = _sherpa(model_dir(TEXT, emotion="HAPPY", event="Laughter"), use_itn=True)
    assert speech["text"] == batched["text"] == "Sherpa reads the stand in."


def test_the_small_stand_ins_int8_file_decodes_with_a_token_for_every_logit(tmp_path: Path) -> None:
    folder = make_sensevoice_small(tmp_path / "small", SmallSpec(text=TEXT, quantize=True, num_blocks=2, tp_blocks=1))
    lines = (folder / TOKENS_FILE).read_text(encoding="utf-8").splitlines()
    assert len(lines) == VOCAB_SIZE and lines[0] == "<unk> 0" and lines[-1].endswith(f" {VOCAB_SIZE - 1}")
    speech, silence, batched = _sherpa(folder, "model_quant.onnx")
    assert speech["text"] == batched["text"] == TEXT and silence["text"] == ""
