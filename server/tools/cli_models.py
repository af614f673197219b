"""The CLI's model plumbing: ``make-test-model`` for every kind, the goldens ``registry add`` is given
on the command line (each in its kind's form), and ``registry prepare``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MODEL_KINDS = ("sensevoice", "paraformer", "seaco-paraformer", "contextual-paraformer", "ct-punc")  # generated


def add_make_test_model(sub: Any) -> None:
    gen = sub.add_parser("make-test-model", help="write a tiny stand-in model folder of any kind (not a real model)")
    gen.add_argument("out_dir", type=Path)
    gen.add_argument("--kind", default="sensevoice", choices=MODEL_KINDS, help="the model kind (default %(default)s)")
    gen.add_argument("--arch", choices=["tiny", "sensevoice-small"], default="tiny",
                     help="sensevoice only: tiny, or SenseVoice-small's real architecture and cost (~234M weights)")
    gen.add_argument("--text", help="what the model transcribes any speech to (speech recognition kinds)")
    gen.add_argument("--itn-text", help="sensevoice: what it says with use_itn (default: capitalised, full stop)")
    gen.add_argument("--weights-mb", type=int, help="resident weights to add, in MB (tiny only)")
    gen.add_argument("--compute-ms", type=float, help="CPU ms per audio second (tiny only)")
    gen.add_argument("--emotion", help="sensevoice: the emotion tag (default NEUTRAL)")
    gen.add_argument("--event", help="sensevoice: the event tag (default Speech)")
    gen.add_argument("--auto-language", help="sensevoice: language reported for language=auto (default en)")
    gen.add_argument("--timestamps", action="store_true", default=None,
                     help="paraformer kinds: the BiCif outputs, so funasr-onnx returns timestamps")
    gen.add_argument("--mark", help="ct-punc: the mark after the last word (default 。)")
    gen.add_argument("--comma-every", type=int, help="ct-punc: a comma after every N-th word")
    gen.add_argument("--quantize", action="store_true", default=None, help="also write model_quant.onnx")
    gen.set_defaults(func=_make_test_model)


def _make_test_model(args: argparse.Namespace) -> int:
    """Every kind through one generator; a flag the kind does not take is an error naming those it does."""
    started = time.perf_counter()
    transcribes = args.kind != "ct-punc"
    if transcribes and not args.text:
        print(f"error: a {args.kind} model needs --text (what it transcribes any speech to)", file=sys.stderr)
        return 2
    if args.arch != "tiny" and args.kind != "sensevoice":
        print(f"error: --arch {args.arch} is a sensevoice architecture, not a {args.kind} one", file=sys.stderr)
        return 2
    options = {"text": args.text, "itn_text": args.itn_text, "emotion": args.emotion, "event": args.event,
               "auto_language": args.auto_language, "weights_mb": args.weights_mb, "compute_ms": args.compute_ms,
               "timestamps": args.timestamps, "mark": args.mark, "comma_every": args.comma_every,
               "quantize": args.quantize}
    try:
        out = _generate(args.kind, args.arch, args.out_dir, options)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    what = "not real ASR" if transcribes else "not a real punctuation model"
    print(f"wrote {out} in {time.perf_counter() - started:.2f} s (a {args.kind} test model, {what})")
    return 0


def _generate(kind: str, arch: str, out_dir: Path, options: dict[str, Any]) -> Path:
    from server.testing.modelgen_paraformer import make_model

    if arch == "tiny":
        return make_model(kind, out_dir, **options)
    from dataclasses import fields

    from server.testing.modelgen_small import SmallSpec, make_sensevoice_small

    given = {name: value for name, value in options.items() if value is not None}
    unknown = sorted(set(given) - {f.name for f in fields(SmallSpec)})
    if unknown:
        raise ValueError(f"--arch {arch} takes no {', '.join(unknown)}")
    return make_sensevoice_small(out_dir, SmallSpec(**given))


def golden_pairs(args: argparse.Namespace, kind: Any, tmp: Path) -> list[tuple[Path, str]] | str:
    """The goldens given on the command line as (input file, expected) pairs in ``kind``'s form
    (see Registry.add), or what is wrong with them. A --smoke-text-in that names no file is the
    text itself, written to a file in ``tmp``."""
    from server.vocab import ModelKind

    if kind == ModelKind.CT_PUNC:
        if args.smoke_audio or args.smoke_segments:
            return "a ct-punc model's goldens are texts: --smoke-text-in with --smoke-text"
        if len(args.smoke_text_in) != len(args.smoke_text):
            return "give one --smoke-text (the punctuated answer) per --smoke-text-in"
        pairs = []
        for i, given in enumerate(args.smoke_text_in):
            path = Path(given)
            if not path.is_file():
                path = tmp / f"given-{i}.in.txt"
                path.write_text(given + "\n", encoding="utf-8")
            pairs.append((path, args.smoke_text[i]))
        return pairs
    if args.smoke_text_in:
        return "--smoke-text-in is for ct-punc models"
    if kind == ModelKind.FSMN_VAD:
        if args.smoke_text:
            return "an fsmn-vad model's goldens are segments: --smoke-audio with --smoke-segments"
        if len(args.smoke_audio) != len(args.smoke_segments):
            return "give one --smoke-segments per --smoke-audio"
        return [(audio, segments.read_text(encoding="utf-8"))
                for audio, segments in zip(args.smoke_audio, args.smoke_segments, strict=True)]
    if args.smoke_segments:
        return "--smoke-segments is for fsmn-vad models"
    if len(args.smoke_audio) != len(args.smoke_text):
        return "give one --smoke-text per --smoke-audio"
    return list(zip(args.smoke_audio, args.smoke_text, strict=True))


def graph_maker(settings: Any) -> Any:
    """How ``registry add`` prepares this host's graphs (None with ``prepare_on_add`` off)."""
    if not settings.prepare_on_add:
        return None
    from server.lifecycle.builder import graph_maker as make

    return make(settings.device, settings.prefer_quantized)


def add_prepare_command(rsub: Any, registry_arg: Callable[[argparse.ArgumentParser], None],
                        registry: Callable[[argparse.Namespace], Any],
                        settings: Callable[[argparse.Namespace], Any]) -> None:
    cmd = rsub.add_parser("prepare", help="prepare a version's graphs for this host (onnxruntime, CPU) if it "
                                          "has none, or theirs are damaged")
    registry_arg(cmd)
    cmd.add_argument("name")
    cmd.set_defaults(func=lambda args: _prepare(args, registry(args), settings(args)))


def _prepare(args: argparse.Namespace, registry: Any, settings: Any) -> int:
    """What a server's load would do with ``prepare_on_load``, ahead of it: the originals verified,
    then each graph this host loads checked and made again where it is not usable."""
    from server.lifecycle.builder import graph_maker as make
    from server.storage import prepared

    manifest = registry.verify(args.name)
    root = registry.version_dir(args.name)
    choices = prepared.choose(root, manifest, manifest.model_file(settings.prefer_quantized),
                              make(settings.device, settings.prefer_quantized), prepare_missing=True,
                              work=registry.work_folder)
    for choice in choices:
        if choice.graph is None:
            print(f"{choice.source}: not prepared: {choice.reason}", file=sys.stderr)
        else:
            done = f"prepared now ({choice.reason})" if choice.prepared_now else "already prepared for this host"
            print(f"{choice.source}: {choice.graph.relative_to(root)}: {done}")
    return 0 if all(choice.graph for choice in choices) else 1
