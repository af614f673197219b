"""Shared pieces of the generated stand-in models: the ONNX version pins, the identity CMVN, and the
``--weights-mb`` / ``--compute-ms`` load knobs.

``onnx`` and ``onnxruntime`` are imported inside the functions, so importing this module (and the
generators built on it) costs nothing until a model is actually written.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx
    from onnx import TensorProto

FEATURE_DIM = 560  # 80 mel bins x lfr_m 7: what the SenseVoice and Paraformer frontends feed the graph
LOUDNESS_GATE = 9.0  # mean log-mel of a frame; digital silence sits at -15.9 (4.4 dithered), -40 dBFS speech ~11
OPSET = 17
IR_VERSION = 8  # onnx 1.23 writes IR 14 by default, which onnxruntime 1.31 refuses
HIDDEN = 256  # width of the --compute-ms work chain


def identity_cmvn(dim: int = FEATURE_DIM) -> str:
    """Kaldi text CMVN with shift 0 and scale 1, so the graph sees raw log-mel features."""
    zeros = " ".join(["0"] * dim)
    ones = " ".join(["1"] * dim)
    return (
        f"<Nnet>\n<Splice> {dim} {dim}\n[ 0 ]\n"
        f"<AddShift> {dim} {dim}\n<LearnRateCoef> 0 [ {zeros} ]\n"
        f"<Rescale> {dim} {dim}\n<LearnRateCoef> 0 [ {ones} ]\n</Nnet>\n"
    )


def big_weights(weights_mb: int) -> TensorProto:
    from onnx import numpy_helper

    rows = weights_mb * 256  # 256 rows x 1024 float32 = 1 MiB
    # a cheap, non-constant fill: every page is written, nothing compresses or folds away
    data = np.tile(np.linspace(-1.0, 1.0, 1024, dtype=np.float32), (rows, 1))
    data[:, 0] = np.arange(rows, dtype=np.float32)
    return numpy_helper.from_array(data, "big_weights")


def compute_chain(repeats: int) -> tuple[list[onnx.NodeProto], list[TensorProto]]:
    """Per-frame MatMul work on the ``speech`` input repeated in a Loop: cost grows with audio
    length like an encoder's. The result is the scalar ``work_mean``."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w_in = (rng.standard_normal((FEATURE_DIM, HIDDEN)) / np.sqrt(FEATURE_DIM)).astype(np.float32)
    w_hidden = (rng.standard_normal((HIDDEN, HIDDEN)) / np.sqrt(HIDDEN)).astype(np.float32)
    N = helper.make_node
    body = helper.make_graph(
        [
            N("MatMul", ["h_in", "w_hidden"], ["h_mm"]),
            N("Tanh", ["h_mm"], ["h_out"]),
            N("Identity", ["cond_in"], ["cond_out"]),
        ],
        "work_body",
        inputs=[
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", TensorProto.FLOAT, None),
        ],
        outputs=[
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_out", TensorProto.FLOAT, None),
        ],
    )
    inits = [
        numpy_helper.from_array(w_in, "w_in"),
        numpy_helper.from_array(w_hidden, "w_hidden"),
        numpy_helper.from_array(np.array(repeats, np.int64), "work_repeats"),
        numpy_helper.from_array(np.array(True), "work_cond"),
    ]
    nodes = [
        N("MatMul", ["speech", "w_in"], ["h0_mm"]),
        N("Tanh", ["h0_mm"], ["h0"]),
        N("Loop", ["work_repeats", "work_cond", "h0"], ["h_final"], body=body),
        N("ReduceMean", ["h_final"], ["work_mean"], keepdims=0),
    ]
    return nodes, inits


def calibrated_repeats(compute_ms: float, threads: int = 2) -> int:
    """How many chain steps cost ``compute_ms`` per audio second on this machine, measured now."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    probe_repeats = 40
    frames_per_second = 16000 // 160 // 6 + 1  # LFR frames in one second of audio
    nodes, inits = compute_chain(probe_repeats)
    graph = helper.make_graph(
        nodes,
        "calibrate",
        [helper.make_tensor_value_info("speech", TensorProto.FLOAT, [1, None, FEATURE_DIM])],
        [helper.make_tensor_value_info("work_mean", TensorProto.FLOAT, [])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 4
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    feats = np.zeros((1, frames_per_second, FEATURE_DIM), np.float32)
    session.run(None, {"speech": feats})
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        session.run(None, {"speech": feats})
        runs.append(time.perf_counter() - start)
    per_repeat_ms = sorted(runs)[len(runs) // 2] * 1000 / probe_repeats
    return max(1, round(compute_ms / max(per_repeat_ms, 1e-4)))


def load_nodes(weights_mb: int, repeats: int, lengths: str) -> tuple[list[onnx.NodeProto], list[TensorProto], str]:
    """The ``--weights-mb`` and ``--compute-ms`` work as nodes ending in a scalar that is always 0
    (named in the result, "" when there is no work): add it to a score and the answer is unchanged,
    but onnxruntime must keep the weights resident and run the chain. ``lengths`` names an int64
    [B] tensor whose values pick the weight row, so nothing folds away at load time."""
    from onnx import helper, numpy_helper

    N = helper.make_node
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []
    terms: list[str] = []
    if weights_mb > 0:
        inits.append(big_weights(weights_mb))
        nodes += [
            N("Gather", ["big_weights", lengths], ["big_row"], axis=0),
            N("ReduceMean", ["big_row"], ["big_mean"], keepdims=0),
        ]
        terms.append("big_mean")
    if repeats > 0:
        work, work_inits = compute_chain(repeats)
        nodes += work
        inits += work_inits
        terms.append("work_mean")
    if not terms:
        return [], [], ""
    inits.append(numpy_helper.from_array(np.array(0.0, np.float32), "load_zero"))
    nodes += [
        N("Sum", terms, ["load_raw"]),
        N("Tanh", ["load_raw"], ["load_bounded"]),
        N("Mul", ["load_bounded", "load_zero"], ["load_bias"]),  # adds work, never changes the answer
    ]
    return nodes, inits, "load_bias"


def finish_model(graph: onnx.GraphProto, producer: str, props: dict[str, str]) -> onnx.ModelProto:
    """Pin the opset and IR version onnxruntime 1.31 accepts, tag the metadata, check the model."""
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    model.producer_name = producer
    helper.set_model_props(model, {"voxswap_test_model": "1", **props})
    onnx.checker.check_model(model)
    return model


def save(model: onnx.ModelProto, path: Path) -> None:
    import onnx

    onnx.save(model, str(path))


def read_props(model_file: Path) -> dict[str, str]:
    """The metadata a generated model carries (empty for a real model)."""
    import onnx

    model = onnx.load(str(model_file), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}
