"""A stand-in with SenseVoice-small's real architecture and cost, for benchmarks that must pay it.

:func:`make_sensevoice_small` writes a model folder that funasr-onnx's ``SenseVoiceSmall`` loads
unchanged, like :mod:`server.testing.modelgen`'s stand-ins, but whose graph is FunASR's
``SenseVoiceEncoderSmall`` as the official ONNX export runs it: the four prefix queries (language,
event, emotion, textnorm) looked up in a 16-row embedding and concatenated before the 560-d LFR
features, the scale by sqrt(512) and sinusoidal positions, 50 SAN-M encoder blocks (the first maps
560 -> 512) and ``after_norm``, 20 ``tp_encoders`` and ``tp_norm``, then the 25,055-token CTC head:
~234M seeded random parameters. Each SAN-M block is pre-norm multi-head attention (4 heads, one
fused q/k/v projection) plus the FSMN memory (a depthwise Conv1d, kernel 11, padded as
``MultiHeadedAttentionSANM`` pads with sanm_shfit 0) plus a 2048-unit ReLU feed-forward.

Random weights transcribe nothing, so the answer still comes from the loudness-gated text path of
the tiny stand-ins: ``ctc_logits = 20 * one_hot(text path) + MIX_SCALE * ctc_lo(encoder)``. After
``tp_norm`` (unit gain) every encoder frame has norm sqrt(512), so by Cauchy-Schwarz the encoder
term is bounded by ~0.2, far below the margin of 20: it never changes the argmax, yet it depends on
the input, so onnxruntime must run every block of the encoder and the CTC head on every request.
Like the tiny stand-ins it carries sherpa-onnx's metadata and ``tokens.txt`` (padded to the head's
25,055 ids), so sherpa-onnx's C++ recognizer runs the same file (``bench/sherpa.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from server.testing.onnx_build import FEATURE_DIM, IR_VERSION, LOUDNESS_GATE, OPSET, identity_cmvn

if TYPE_CHECKING:
    import onnx

OUTPUT_SIZE = 512
ATTENTION_HEADS = 4
LINEAR_UNITS = 2048
KERNEL_SIZE = 11
SANM_SHIFT = 0
VOCAB_SIZE = 25055  # SenseVoice-small's CTC vocabulary
QUERY_EMBEDDINGS = 7 + 7 + 2  # FunASR: Embedding(7 + len(lid_dict) + len(textnorm_dict), input_size)
EVENT_EMO_QUERIES = (1, 2)  # the fixed embedding rows FunASR uses for the event and emotion queries
TEXT_SCORE = 20.0  # the text path's logit for its chosen token; every other token gets 0
MIX_SCALE = 0.01  # weight of the real CTC head's logits in ctc_logits (|term| <= ~0.2)
EXPECTED_PARAMETERS = 234_000_000  # SenseVoice-small, as published


@dataclass(frozen=True)
class SmallSpec:
    text: str
    itn_text: str | None = None  # what the model says when asked for ITN; default derived from text
    emotion: str = "NEUTRAL"
    event: str = "Speech"
    auto_language: str = "en"  # what language="auto" reports
    quantize: bool = False  # also write model_quant.onnx (int8), as the official export does
    seed: int = 0  # of the random weights
    num_blocks: int = 50  # encoder blocks, the first mapping 560 -> 512; fewer only for quick tests
    tp_blocks: int = 20
    smoke_seconds: float = 1.5

    @property
    def withitn_text(self) -> str:
        from server.testing.modelgen import TestModelSpec

        return TestModelSpec(text=self.text, itn_text=self.itn_text).withitn_text


def parameter_count(spec: SmallSpec) -> int:
    """The trainable parameters of the graph ``spec`` describes (233,999,167 by default)."""
    d, ff, feat = OUTPUT_SIZE, LINEAR_UNITS, FEATURE_DIM

    def block(in_size: int) -> int:
        attn = in_size * 3 * d + 3 * d + d * d + d + d * KERNEL_SIZE
        return attn + (d * ff + ff + ff * d + d) + 2 * in_size + 2 * d

    blocks = block(feat) + (spec.num_blocks - 1 + spec.tp_blocks) * block(d)
    return QUERY_EMBEDDINGS * feat + blocks + 4 * d + d * VOCAB_SIZE + VOCAB_SIZE


def make_sensevoice_small(out_dir: Path, spec: SmallSpec) -> Path:
    """Write model.onnx (fp32, ~940 MB), model_quant.onnx if asked, side files and ``smoke/``."""
    from server.testing import modelgen as base
    from server.testing import synth

    if spec.emotion not in base.EMOTIONS:
        raise ValueError(f"emotion must be one of {', '.join(base.EMOTIONS)}")
    if spec.event not in base.EVENTS:
        raise ValueError(f"event must be one of {', '.join(base.EVENTS)}")
    if spec.auto_language not in base.LANGUAGE_TAGS:
        raise ValueError(f"auto language must be one of {', '.join(base.LANGUAGE_TAGS)}")
    if spec.num_blocks < 1 or spec.tp_blocks < 0:
        raise ValueError("num_blocks must be at least 1 and tp_blocks at least 0")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(_config_yaml(spec))
    (out_dir / "am.mvn").write_text(identity_cmvn())
    sp = base._train_tokenizer(out_dir / base.BPE_FILE, [spec.text, spec.withitn_text])
    base.write_tokens(out_dir / base.TOKENS_FILE, sp, VOCAB_SIZE)  # for sherpa-onnx, as modelgen's stand-ins
    g = _Graph(np.random.default_rng(spec.seed))
    _text_path(g, spec, sp)
    _encoder(g, spec)
    g.save(spec, out_dir / "model.onnx")
    names = [n.name for n in g.nodes]
    del g
    if spec.quantize:
        _quantize(out_dir / "model.onnx", out_dir / "model_quant.onnx", names)
    smoke = out_dir / "smoke"
    smoke.mkdir(exist_ok=True)
    (smoke / "clip.wav").write_bytes(synth.wav_bytes(synth.speech_like(spec.smoke_seconds, seed=7)))
    (smoke / "clip.txt").write_text(spec.text + "\n")
    return out_dir


def _config_yaml(spec: SmallSpec) -> str:
    from server.testing.modelgen import CONFIG_YAML

    return CONFIG_YAML + (
        "# the architecture of the graph (funasr-onnx reads only frontend_conf)\n"
        "encoder: SenseVoiceEncoderSmall\nencoder_conf:\n"
        f"  output_size: {OUTPUT_SIZE}\n  attention_heads: {ATTENTION_HEADS}\n"
        f"  linear_units: {LINEAR_UNITS}\n  num_blocks: {spec.num_blocks}\n  tp_blocks: {spec.tp_blocks}\n"
        f"  kernel_size: {KERNEL_SIZE}\n  sanm_shfit: {SANM_SHIFT}\n"
        f"input_size: 560\nvocab_size: {VOCAB_SIZE}\n"
    )


class _Graph:
    """Nodes and initializers being collected, with torch-export-like names."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.params = 0

    def const(self, name: str, value: Any, dtype: Any = np.float32) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def weight(self, name: str, array: NDArray[np.float32]) -> str:
        self.params += array.size
        return self.const(name, array)

    def uniform(self, name: str, shape: tuple[int, ...], fan_in: int) -> str:
        """torch's default Linear/Conv init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        bound = np.float32(1.0 / math.sqrt(fan_in))
        data = self.rng.random(shape, dtype=np.float32) * (2 * bound) - bound
        return self.weight(name, data)

    def op(self, op_type: str, inputs: list[str], out: str, **attrs: Any) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def linear(self, x: str, prefix: str, fan_in: int, fan_out: int) -> str:
        w = self.uniform(f"{prefix}.weight", (fan_in, fan_out), fan_in)  # stored transposed, as exported
        b = self.uniform(f"{prefix}.bias", (fan_out,), fan_in)
        return self.op("Add", [self.op("MatMul", [x, w], f"/{prefix}/MatMul"), b], f"/{prefix}/Add")

    def layer_norm(self, x: str, prefix: str, dim: int) -> str:
        scale = self.weight(f"{prefix}.weight", np.ones(dim, np.float32))
        bias = self.weight(f"{prefix}.bias", np.zeros(dim, np.float32))
        return self.op("LayerNormalization", [x, scale, bias], f"/{prefix}/LayerNorm", axis=-1, epsilon=1e-5)

    def save(self, spec: SmallSpec, path: Path) -> None:
        import onnx
        from onnx import TensorProto, helper

        graph = helper.make_graph(
            self.nodes,
            "sensevoice_small_stand_in",
            inputs=[
                helper.make_tensor_value_info("speech", TensorProto.FLOAT, ["batch_size", "feats_length", FEATURE_DIM]),
                helper.make_tensor_value_info("speech_lengths", TensorProto.INT32, ["batch_size"]),
                helper.make_tensor_value_info("language", TensorProto.INT32, ["batch_size"]),
                helper.make_tensor_value_info("textnorm", TensorProto.INT32, ["batch_size"]),
            ],
            outputs=[
                helper.make_tensor_value_info("ctc_logits", TensorProto.FLOAT,
                                              ["batch_size", "logits_length", VOCAB_SIZE]),
                helper.make_tensor_value_info("encoder_out_lens", TensorProto.INT32, ["batch_size"]),
            ],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        model.graph.initializer.extend(self.inits)  # copied once: ~940 MB at full size
        self.inits.clear()
        model.ir_version = IR_VERSION
        model.producer_name = "voxswap.testing.modelgen_small"
        helper.set_model_props(model, _props(spec, self.params))
        onnx.save(model, str(path))
        del model
        onnx.checker.check_model(str(path))  # from the file: 3x faster than from the proto


def _props(spec: SmallSpec, params: int) -> dict[str, str]:
    from server.testing.modelgen import sherpa_metadata

    return {
        "voxswap_test_model": "1",
        "arch": "sensevoice-small",
        "text": spec.text,
        "withitn_text": spec.withitn_text,
        "emotion": spec.emotion,
        "event": spec.event,
        "seed": str(spec.seed),
        "parameters": str(params),
        "num_blocks": str(spec.num_blocks),
        "tp_blocks": str(spec.tp_blocks),
        **sherpa_metadata(VOCAB_SIZE, identity_cmvn(), "voxswap stand-in with SenseVoice-small's architecture"),
    }


def _text_path(g: _Graph, spec: SmallSpec, sp: Any) -> None:
    """``text_scores`` [B,T+4,VOCAB]: the tiny stand-ins' loudness-gated tags and text, one-hot."""
    from server.testing import modelgen as base

    tag = sp.piece_to_id
    woitn = base._ctc_sequence(sp.encode(spec.text) if spec.text else [])
    withitn = base._ctc_sequence(sp.encode(spec.withitn_text) if spec.withitn_text else [])
    width = max(len(woitn), len(withitn))
    sequences = np.zeros((2, width), dtype=np.int64)
    sequences[0, : len(woitn)] = woitn
    sequences[1, : len(withitn)] = withitn
    lang_table = np.full(QUERY_EMBEDDINGS, tag(f"<|{spec.auto_language}|>"), dtype=np.int64)
    for lang, lid in base.LANGUAGE_IDS.items():
        if lang != "auto":
            lang_table[lid] = tag(f"<|{lang}|>")
    tn_table = np.full(QUERY_EMBEDDINGS, tag("<|woitn|>"), dtype=np.int64)
    tn_table[base.TEXTNORM_IDS["withitn"]] = tag("<|withitn|>")
    i64 = np.int64
    seqs, lang_t, tn_t = g.const("text_sequences", sequences, i64), g.const("lang_table", lang_table, i64), \
        g.const("tn_table", tn_table, i64)
    one, axis1 = g.const("one", 1, i64), g.const("axis1", [1], i64)
    g.const("axis2", [2], i64)
    op = g.op
    # speech gate: some valid frame's mean log-mel is above the loudness gate
    t_len = op("Gather", [op("Shape", ["speech"], "speech_shape"), one], "t_len", axis=0)
    t_range = op("Range", [g.const("zero", 0, i64), t_len, one], "t_range")
    lengths = op("Cast", ["speech_lengths"], "lengths64", to=7)  # INT64
    valid = op("Less", [t_range, op("Unsqueeze", [lengths, axis1], "lengths_col")], "valid")
    loud = op("ReduceMean", ["speech"], "loudness", axes=[2], keepdims=0)  # [B,T]
    loud = op("Where", [valid, loud, g.const("very_quiet", -1e4)], "valid_loudness")
    peak = op("ReduceMax", [loud], "peak", axes=[1], keepdims=0)
    is_speech = op("Greater", [peak, g.const("gate", LOUDNESS_GATE)], "is_speech")  # [B]
    # the four tag frames, in the order of FunASR's query frames: language, emotion, event, textnorm
    lang_tok = op("Gather", [lang_t, "language"], "lang_tok", axis=0)
    tags = [
        op("Where", [is_speech, lang_tok, g.const("nospeech_tok", [tag("<|nospeech|>")], i64)], "tag0"),
        op("Where", [is_speech, g.const("emo_tok", [tag(f"<|{spec.emotion}|>")], i64),
                     g.const("emo_unk_tok", [tag("<|EMO_UNKNOWN|>")], i64)], "tag1"),
        op("Where", [is_speech, g.const("event_tok", [tag(f"<|{spec.event}|>")], i64),
                     g.const("event_unk_tok", [tag("<|Event_UNK|>")], i64)], "tag2"),
        op("Gather", [tn_t, "textnorm"], "tag3", axis=0),
    ]
    tag_ids = op("Concat", [op("Unsqueeze", [t, axis1], f"{t}c") for t in tags], "tag_ids", axis=1)
    # the text frames: the chosen sequence, blank once it runs out or when there is no speech
    wants_itn = op("Equal", ["textnorm", g.const("withitn_id", base.TEXTNORM_IDS["withitn"], np.int32)], "wants_itn")
    seq_b = op("Gather", [seqs, op("Cast", [wants_itn], "seq_row", to=7)], "seq_b", axis=0)
    seq_index = op("Min", [t_range, g.const("last_index", width - 1, i64)], "seq_index")
    text_raw = op("Gather", [seq_b, seq_index], "text_ids_raw", axis=1)
    speech_col = op("Unsqueeze", [op("Cast", [is_speech], "speech_i", to=7), axis1], "speech_col")
    ids = op("Concat", [tag_ids, op("Mul", [text_raw, speech_col], "text_ids")], "ids", axis=1)
    op("OneHot", [ids, g.const("vocab", VOCAB_SIZE, i64), g.const("onehot_values", [0.0, TEXT_SCORE])],
       "text_scores", axis=-1)


def _encoder(g: _Graph, spec: SmallSpec) -> None:
    """FunASR's export_forward: prefix queries, SenseVoiceEncoderSmall, ctc_lo; mixed into the text."""
    from server.testing.modelgen import QUERY_FRAMES

    op, i64, d = g.op, np.int64, OUTPUT_SIZE
    axis1 = "axis1"
    embed = g.weight("embed.weight", g.rng.standard_normal((QUERY_EMBEDDINGS, FEATURE_DIM), dtype=np.float32))
    lang_q = op("Unsqueeze", [op("Gather", [embed, "language"], "/embed/lang"), axis1], "/embed/lang_q")
    tn_q = op("Unsqueeze", [op("Gather", [embed, "textnorm"], "/embed/tn"), axis1], "/embed/tn_q")
    ev_emo = op("Gather", [embed, g.const("event_emo_ids", [EVENT_EMO_QUERIES], i64)], "/embed/ev_emo")  # [1,2,F]
    batch = op("Shape", ["speech"], "/embed/batch", start=0, end=1)
    ev_emo = op("Expand", [ev_emo, op("Concat", [batch, g.const("ev_emo_tail", [2, FEATURE_DIM], i64)],
                                      "/embed/ev_emo_shape", axis=0)], "/embed/ev_emo_q")
    x = op("Concat", [lang_q, ev_emo, tn_q, "speech"], "/encoder/input", axis=1)  # [B,T+4,560]
    olens = op("Add", ["speech_lengths", g.const("query_frames", QUERY_FRAMES, np.int32)], "encoder_out_lens")
    # masks: sequence_mask(lengths + 4, maxlen=T+4)
    t4 = op("Gather", [op("Shape", [x], "/encoder/x_shape"), "one"], "/encoder/t4", axis=0)
    frames = op("Range", ["zero", t4, "one"], "/encoder/frames")
    lens_col = op("Unsqueeze", [op("Cast", [olens], "/encoder/lens64", to=7), axis1], "/encoder/lens_col")
    valid = op("Less", [frames, lens_col], "/encoder/valid")  # [B,T+4]
    mask_f = op("Unsqueeze", [op("Cast", [valid], "/encoder/valid_f", to=1), "axis2"], "/encoder/mask_fsmn")
    mask_att = op("Unsqueeze", [valid, g.const("axes12", [1, 2], i64)], "/encoder/mask_att")  # [B,1,1,T+4]
    # xs_pad *= sqrt(output_size); xs_pad = SinusoidalPositionEncoder(xs_pad), positions 1..T+4
    x = op("Mul", [x, g.const("xscale", math.sqrt(d))], "/encoder/scaled")
    half = FEATURE_DIM // 2
    inv = np.exp(np.arange(half, dtype=np.float32) * -(math.log(10000.0) / (half - 1)))
    pos = op("Cast", [op("Add", [frames, "one"], "/encoder/pos1")], "/encoder/pos", to=1)
    st = op("Mul", [op("Unsqueeze", [pos, g.const("axis_last", [1], i64)], "/encoder/pos_col"),
                    g.const("inv_timescales", inv)], "/encoder/scaled_time")  # [T+4,280]
    pe = op("Concat", [op("Sin", [st], "/encoder/sin"), op("Cos", [st], "/encoder/cos")], "/encoder/pe", axis=1)
    x = op("Add", [x, pe], "/encoder/embed")
    g.const("qkv_split", [d, d, d], i64)
    g.const("heads_shape", [0, 0, ATTENTION_HEADS, d // ATTENTION_HEADS], i64)
    g.const("merge_shape", [0, 0, d], i64)
    g.const("d_k_scale", (d // ATTENTION_HEADS) ** -0.5)
    g.const("neg_inf", -np.inf)
    g.const("zero_f", 0.0)
    masks = (mask_f, mask_att)
    x = _sanm_block(g, x, "encoder.encoders0.0", FEATURE_DIM, masks)
    for i in range(spec.num_blocks - 1):
        x = _sanm_block(g, x, f"encoder.encoders.{i}", d, masks)
    x = g.layer_norm(x, "encoder.after_norm", d)
    for i in range(spec.tp_blocks):
        x = _sanm_block(g, x, f"encoder.tp_encoders.{i}", d, masks)
    x = g.layer_norm(x, "encoder.tp_norm", d)
    logits = g.linear(x, "ctc.ctc_lo", d, VOCAB_SIZE)  # what the official export returns as ctc_logits
    op("Add", ["text_scores", op("Mul", [logits, g.const("mix_scale", MIX_SCALE)], "/mix/scaled")], "ctc_logits")


def _sanm_block(g: _Graph, x: str, prefix: str, in_size: int, masks: tuple[str, str]) -> str:
    """EncoderLayerSANM, normalize_before=True, concat_after=False, inference (no dropout)."""
    op, d = g.op, OUTPUT_SIZE
    mask_f, mask_att = masks
    p = f"{prefix}.self_attn"
    hidden = g.layer_norm(x, f"{prefix}.norm1", in_size)
    qkv = g.linear(hidden, f"{p}.linear_q_k_v", in_size, 3 * d)
    q, k, v = (f"/{p}/q", f"/{p}/k", f"/{p}/v")
    g.nodes.append(_split(qkv, [q, k, v], f"/{p}/Split", "qkv_split"))
    heads = "heads_shape"
    q_h = op("Transpose", [op("Reshape", [q, heads], f"/{p}/q_r")], f"/{p}/q_h", perm=[0, 2, 1, 3])
    k_t = op("Transpose", [op("Reshape", [k, heads], f"/{p}/k_r")], f"/{p}/k_t", perm=[0, 2, 3, 1])
    v_h = op("Transpose", [op("Reshape", [v, heads], f"/{p}/v_r")], f"/{p}/v_h", perm=[0, 2, 1, 3])
    # FSMN memory: masked v through a depthwise Conv1d (kernel 11, padded left/right as SANM does)
    left = (KERNEL_SIZE - 1) // 2 + SANM_SHIFT
    v_m = op("Mul", [v, mask_f], f"/{p}/fsmn_in")
    conv_w = g.uniform(f"{p}.fsmn_block.weight", (d, 1, KERNEL_SIZE), KERNEL_SIZE)
    conv = op("Conv", [op("Transpose", [v_m], f"/{p}/fsmn_t", perm=[0, 2, 1]), conv_w], f"/{p}/fsmn_block/Conv",
              group=d, kernel_shape=[KERNEL_SIZE], pads=[left, KERNEL_SIZE - 1 - left])
    memory = op("Add", [op("Transpose", [conv], f"/{p}/fsmn_bt", perm=[0, 2, 1]), v_m], f"/{p}/fsmn_res")
    memory = op("Mul", [memory, mask_f], f"/{p}/fsmn_out")
    # scaled dot-product attention with the key mask, as forward_attention masks it
    q_s = op("Mul", [q_h, "d_k_scale"], f"/{p}/q_s")
    scores = op("MatMul", [q_s, k_t], f"/{p}/scores")
    scores = op("Where", [mask_att, scores, "neg_inf"], f"/{p}/scores_m")
    attn = op("Softmax", [scores], f"/{p}/softmax", axis=-1)
    attn = op("Where", [mask_att, attn, "zero_f"], f"/{p}/attn")
    ctx = op("Transpose", [op("MatMul", [attn, v_h], f"/{p}/ctx_h")], f"/{p}/ctx_t", perm=[0, 2, 1, 3])
    ctx = op("Reshape", [ctx, "merge_shape"], f"/{p}/ctx")
    att = op("Add", [g.linear(ctx, f"{p}.linear_out", d, d), memory], f"/{p}/att")
    x = op("Add", [x, att], f"/{prefix}/res1") if in_size == d else att
    hidden = g.layer_norm(x, f"{prefix}.norm2", d)
    ff = g.linear(hidden, f"{prefix}.feed_forward.w_1", d, LINEAR_UNITS)
    ff = g.linear(op("Relu", [ff], f"/{prefix}/feed_forward/Relu"), f"{prefix}.feed_forward.w_2", LINEAR_UNITS, d)
    return op("Add", [x, ff], f"/{prefix}/res2")


def _split(x: str, outs: list[str], name: str, sizes: str) -> onnx.NodeProto:
    from onnx import helper

    return helper.make_node("Split", [x, sizes], outs, name=name, axis=-1)


def _quantize(src: Path, dst: Path, names: list[str]) -> None:
    """FunASR's export_utils._onnx quantization: dynamic, MatMul only, per channel, uint8 weights."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        model_input=src,
        model_output=dst,
        op_types_to_quantize=["MatMul"],
        per_channel=True,
        reduce_range=False,
        weight_type=QuantType.QUInt8,
        nodes_to_exclude=[n for n in names if "output" in n or "bias_encoder" in n or "bias_decoder" in n],
    )
