"""The onnxruntime sessions of every engine, built here with explicit options, from a prepared graph
when there is one for this host.

funasr-onnx's model classes build their own session in ``__init__`` (``OrtInferSession``: graph
optimisation at ``ORT_ENABLE_ALL`` on every load, the spinning thread pool left on) from the
single-file ONNX model, which onnxruntime parses into a second copy of its weights while it loads.
:func:`building` swaps the name those classes look the session class up by for a factory that,
inside a load of ours, builds the session here instead, so funasr-onnx's front end, tokenizer and
decoding are kept as they are and its own session is never built. Outside a load of ours the
factory is funasr-onnx's class unchanged, so the swap is safe for any other caller in the process;
the plan is per thread, so models loading in several threads at once never see each other's.

A prepared graph (:func:`prepare_graph`) is the graph onnxruntime optimised once, saved with its
weights as external data: a load maps the weights instead of parsing and copying them and skips
optimisation. It is valid only for the onnxruntime version, execution providers and CPU
instruction sets that made it, which :func:`host_target` describes for the registry to record.
"""

from __future__ import annotations

import functools
import platform
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PREPARE_FORMAT = "1"  # bumped when prepare_graph changes what it writes: older graphs are made again
OPTIMISATION = "all"  # the level a prepared graph was optimised at (funasr-onnx's own, ORT_ENABLE_ALL)
EXTERNAL_MIN_BYTES = 1024  # initializers from this size go to the external data file (mapped at load)
# The instruction sets onnxruntime's CPU kernels (MLAS) choose code paths by: a graph optimised on a
# host with one of them may hold kernels or layouts another host cannot run. Other flags (security
# mitigations, virtualisation) differ between hosts of one CPU model and must not force a re-prepare.
CPU_ISA = frozenset({
    "sse3", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq",
    "avx512vl", "avx512cd", "avx512_vnni", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8",
    "amx_bf16", "asimd", "asimddp", "asimdhp", "sve", "sve2", "i8mm", "bf16", "fphp",
})
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class GraphSource:
    """Where one session's graph comes from: a prepared graph, or the original file (``prepared``
    None) and why (reported with the engine)."""

    prepared: Path | None
    reason: str = ""


@dataclass(frozen=True)
class SessionConfig:
    """How an engine's sessions are built beyond threads and device.

    ``graphs`` maps an original model file name (``model_quant.onnx``, ``model_eb.onnx``) to where
    its session's graph comes from; a file it does not name is loaded from the original.
    """

    graphs: Mapping[str, GraphSource] = field(default_factory=dict)
    spin_wait: bool = False


class SessionError(Exception):
    """onnxruntime could not build a session or prepare a graph (it raises many unrelated types)."""


class Session:
    """What funasr-onnx's ``OrtInferSession`` is to its model classes, over a session built here.

    funasr-onnx asks the session for its input and output names on every call (two lists of
    fresh ``NodeArg`` objects each time): they are read once here. ``info`` says what was loaded.
    """

    def __init__(self, session: Any, info: dict[str, Any]):
        self.session = session
        self.info = info
        self._inputs = [node.name for node in session.get_inputs()]
        self._outputs = [node.name for node in session.get_outputs()]
        self.meta_dict = session.get_modelmeta().custom_metadata_map

    def __call__(self, input_content: list[Any], run_options: Any = None) -> list[Any]:
        from funasr_onnx.utils.utils import ONNXRuntimeError

        try:
            outputs: list[Any] = self.session.run(self._outputs, dict(zip(self._inputs, input_content, strict=False)),
                                                  run_options)
        except Exception as exc:  # funasr-onnx's callers catch its own error type
            raise ONNXRuntimeError("ONNXRuntime inferece failed.") from exc
        return outputs

    def get_input_names(self) -> list[str]:
        return list(self._inputs)

    def get_output_names(self) -> list[str]:
        return list(self._outputs)

    def have_key(self, key: str = "character") -> bool:
        return key in self.meta_dict

    def get_character_list(self, key: str = "character") -> list[str]:
        return str(self.meta_dict[key]).splitlines()


@dataclass
class _Plan:
    """One load's sessions: how to build each, and what was built (in the order funasr-onnx asked)."""

    model_dir: Path
    threads: int
    device: str
    config: SessionConfig
    built: list[Session] = field(default_factory=list)

    def build(self, model_file: str) -> Session:
        path = Path(model_file)
        source = path.name if path.parent.resolve() == self.model_dir.resolve() else str(path)
        chosen = self.config.graphs.get(source, GraphSource(None))
        loaded = chosen.prepared if chosen.prepared is not None else path
        session = build_session(loaded, threads=self.threads, device=self.device, spin_wait=self.config.spin_wait,
                                optimise=chosen.prepared is None)
        shown = loaded.relative_to(self.model_dir) if loaded.is_relative_to(self.model_dir) else loaded
        built = Session(session, {"source": source, "loaded": shown.as_posix(), "prepared": chosen.prepared is not None,
                                  "optimised_at_load": chosen.prepared is None, "reason": chosen.reason})
        self.built.append(built)
        return built


_local = threading.local()
_install_lock = threading.Lock()
FUNASR_MODULES = ("sensevoice_bin", "paraformer_bin", "punc_bin", "vad_bin", "paraformer_online_bin")


def _factory(model_file: str, device_id: Any = -1, intra_op_num_threads: int = 4) -> Any:
    """What funasr-onnx's model classes call as ``OrtInferSession``: ours within :func:`building`."""
    plan: _Plan | None = getattr(_local, "plan", None)
    if plan is None:
        from funasr_onnx.utils.utils import OrtInferSession

        return OrtInferSession(model_file, device_id, intra_op_num_threads=intra_op_num_threads)
    return plan.build(model_file)


def _install() -> None:
    import importlib

    with _install_lock:
        for name in FUNASR_MODULES:
            module = importlib.import_module(f"funasr_onnx.{name}")
            if getattr(module, "OrtInferSession", None) is not _factory:
                setattr(module, "OrtInferSession", _factory)  # noqa: B010 (a module, not a typed object)


@contextmanager
def building(model_dir: Path, *, threads: int, device: str, config: SessionConfig) -> Iterator[list[Session]]:
    """Within the block, funasr-onnx model classes constructed in this thread get sessions built
    here (the list yielded fills with them, in order)."""
    _install()
    plan = _Plan(Path(model_dir), threads, device, config)
    _local.plan = plan
    try:
        yield plan.built
    finally:
        _local.plan = None


def providers(device: str) -> list[tuple[str, dict[str, str]]]:
    """The execution providers funasr-onnx 0.4.3 picks for ``cpu`` / ``cuda[:N]``, with its options."""
    import onnxruntime

    chosen: list[tuple[str, dict[str, str]]] = []
    if device != "cpu" and onnxruntime.get_device() == "GPU" and CUDA in onnxruntime.get_available_providers():
        device_id = device.split(":", 1)[1] if ":" in device else "0"
        chosen.append((CUDA, {"device_id": device_id, "arena_extend_strategy": "kNextPowerOfTwo",
                              "cudnn_conv_algo_search": "EXHAUSTIVE", "do_copy_in_default_stream": "true"}))
    chosen.append((CPU, {"arena_extend_strategy": "kSameAsRequested"}))
    return chosen


def _options(threads: int, *, spin_wait: bool, optimise: bool) -> Any:
    """Explicit session options. The CPU memory arena stays off (as funasr-onnx has it): memory a
    request used goes back at once, and what a swap frees is what the engine held. Spinning is off
    by default: with 2 intra-op threads on a busy 2-core host, spinning took ~50% more CPU per
    request and was no faster (a 64M-parameter SAN-M encoder, 6 s of audio)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only: the hardware-specific-graph warning is what the target records
    options.enable_cpu_mem_arena = False
    options.graph_optimization_level = (onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL if optimise
                                        else onnxruntime.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_wait else "0")
    return options


def build_session(path: Path, *, threads: int, device: str, spin_wait: bool, optimise: bool) -> Any:
    """An ``InferenceSession`` on ``path``: optimised at load (an original graph), or not at all (a
    prepared one, optimised when it was made); raises :class:`SessionError`."""
    import onnxruntime

    if not path.is_file():
        raise SessionError(f"{path} does not exist")
    try:
        return onnxruntime.InferenceSession(str(path), sess_options=_options(threads, spin_wait=spin_wait,
                                                                              optimise=optimise),
                                            providers=providers(device))
    except Exception as exc:
        raise SessionError(f"{type(exc).__name__}: {exc}") from exc


def prepare_graph(source: Path, out_dir: Path, *, device: str = "cpu") -> list[str]:
    """Write ``source``'s graph, optimised by onnxruntime for this host, into the empty folder
    ``out_dir`` with its weights in an external data file; the names written, the graph first.

    onnxruntime writes the graph while it builds a session on the original, so preparing costs
    one full load (about twice the file in memory, for a moment): it happens at add, not at a swap.
    """
    graph = out_dir / source.name
    data = f"{source.name}.data"
    options = _options(1, spin_wait=False, optimise=True)
    options.optimized_model_filepath = str(graph)
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", data)
    options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                     str(EXTERNAL_MIN_BYTES))
    import onnxruntime

    try:
        onnxruntime.InferenceSession(str(source), sess_options=options, providers=providers(device))
    except Exception as exc:
        raise SessionError(f"could not prepare {source.name}: {type(exc).__name__}: {exc}") from exc
    if not graph.is_file():
        raise SessionError(f"onnxruntime wrote no optimised graph for {source.name}")
    return [graph.name, *([data] if (out_dir / data).is_file() else [])]


def host_target(device: str = "cpu") -> dict[str, str]:
    """What a graph prepared here is made for, as the registry records it: a graph is used only on a
    host whose target is equal."""
    import onnxruntime

    return {
        "format": PREPARE_FORMAT,
        "onnxruntime": onnxruntime.__version__,
        "providers": ",".join(name for name, _ in providers(device)),
        "machine": platform.machine(),
        "cpu_isa": " ".join(sorted(cpu_flags() & CPU_ISA)),
        "optimisation": OPTIMISATION,
    }


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (x86 ``flags``, Arm ``Features``); empty
    elsewhere, where the machine name alone tells hosts apart."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()
