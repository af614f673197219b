"""``python -m bench.run [--quick] [--model-dir DIR] [--out docs/benchmarks.md] [--only PART,...]``

Generates the models (or copies a real folder) into a scratch registry, runs every benchmark against
real ``voxswap serve`` processes, prints the report and writes it with its plots and raw JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import (
    batching,
    common,
    floor,
    memory,
    overhead,
    pipeline,
    report,
    shadow,
    sherpa,
    startup,
    streams,
    swaps,
    throughput,
)
from bench.common import Bench, Profile, Section, loadavg

PARTS: dict[str, Callable[[Bench], Section]] = {
    "overhead": overhead.run,
    "throughput": throughput.run,
    "swaps": swaps.run,
    "memory": memory.run,
    "startup": startup.run,
    "shadow": shadow.run,
    "pipeline": pipeline.run,
    "streams": streams.run,
    "floor": floor.run,
    "sherpa": sherpa.run,
    "batching": batching.run,
}
QUICK_OUT = Path("artifacts/benchmarks-quick.md")  # a smoke run must never overwrite the published report


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[2])
    parser.add_argument("--quick", action="store_true", help="tiny models, few requests: proves the harness works")
    parser.add_argument("--model-dir", type=Path, help="a real SenseVoice-small folder instead of generated models")
    parser.add_argument("--out", type=Path, help="report path (default docs/benchmarks.md; quick: "
                                                  f"{QUICK_OUT}); plots and JSON go beside it")
    parser.add_argument("--only", help=f"comma-separated parts to rerun ({', '.join(PARTS)}); the others are "
                                       "kept from the JSON beside --out")
    parser.add_argument("--render", action="store_true", help="only rewrite the report from the JSON beside --out")
    parser.add_argument("--weights-mb", type=int, help="generated model weights (default 240; quick 2)")
    parser.add_argument("--large-weights-mb", type=int, help="generated large model (default 900; 0 skips)")
    parser.add_argument("--compute-ms", type=float, help="generated model CPU ms per audio second (default 40)")
    parser.add_argument("--arch", choices=("sensevoice-small", "matmul"), default="sensevoice-small",
                        help="generated models: SenseVoice-small's real architecture and cost (default; int8, "
                             "fp32 for the large rows), or the synthetic MatMul stand-in of --weights-mb and "
                             "--compute-ms (always for --quick)")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a new temporary one, removed)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.render:
        out = args.out or (QUICK_OUT if args.quick else Path("docs/benchmarks.md"))
        doc, sections = report.load_previous(out)
        if not sections:
            raise SystemExit(f"no results beside {out} to render")
        text = report.save(out, doc, sections)
    else:
        text = run(args, command=_command(argv))
    print(text)
    return 0


def _command(argv: Sequence[str] | None) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join([".venv/bin/python", "-m", "bench.run", *args])


def _profile(args: argparse.Namespace) -> Profile:
    profile = common.QUICK if args.quick else common.FULL
    overrides = {"weights_mb": args.weights_mb, "large_weights_mb": args.large_weights_mb,
                 "compute_ms": args.compute_ms}
    return dataclasses.replace(profile, **{k: v for k, v in overrides.items() if v is not None})


def run(args: argparse.Namespace, *, command: str) -> str:
    """Run the chosen parts and write the report; returns its text."""
    profile = _profile(args)
    out: Path = args.out or (QUICK_OUT if args.quick else Path("docs/benchmarks.md"))
    parts = list(PARTS) if not args.only else [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise SystemExit(f"unknown part(s): {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    doc, sections = report.load_previous(out) if args.only else ({}, {})
    out.parent.mkdir(parents=True, exist_ok=True)
    started, load_start = time.time(), loadavg()
    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="voxswap-bench-")) if own_workdir else args.workdir
    try:
        large_needed = bool({"memory", "startup"} & set(parts))
        bench = _prepare(profile if large_needed else dataclasses.replace(profile, large_weights_mb=0),
                         workdir, args.model_dir, out, faithful=args.arch == "sensevoice-small" and not profile.quick)
        for name in parts:
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            before, t0 = loadavg(), time.monotonic()
            section = PARTS[name](bench)
            section.load = (before, loadavg())
            section.seconds = time.monotonic() - t0
            section.ran_at = time.strftime("%Y-%m-%d %H:%M", time.localtime())
            sections[name] = section
            print(f"[bench] {name} done in {section.seconds:.0f} s", file=sys.stderr, flush=True)
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    this_run = {"command": command, "started": time.strftime("%Y-%m-%d %H:%M", time.localtime(started)),
                "minutes": (time.time() - started) / 60, "load_start": load_start, "load_end": loadavg(),
                "sections": parts}
    doc = {
        "quick": profile.quick,
        "stand_in": args.model_dir is None,
        "machine": report.machine(),
        "software": report.software(),
        "models": list(dict.fromkeys([*doc.get("models", []), *_model_labels(bench)])) if args.only
        else _model_labels(bench),
        "runs": [*doc.get("runs", []), this_run] if args.only else [this_run],
    }
    return report.save(out, doc, sections)


def _model_labels(bench: Bench) -> list[str]:
    labels = [bench.models.label]
    if bench.large is not None:
        labels.append(bench.large.label + " (large rows)")
    return labels


def _prepare(profile: Profile, workdir: Path, model_dir: Path | None, out: Path, *, faithful: bool = False) -> Bench:
    """Models and registries in ``workdir``: generated stand-ins, or a real folder registered twice."""
    models_root = workdir / "models"
    large: common.ModelSet | None = None
    prefer_quantized_large = True
    if model_dir is not None:
        models = common.real(model_dir, models_root, prefer_quantized=True, refusals=True)
        if (model_dir / "model.onnx").is_file() and (model_dir / "model_quant.onnx").is_file() \
                and not profile.quick:
            large = common.real(model_dir, models_root / "large", prefer_quantized=False, refusals=False)
            prefer_quantized_large = False
    elif faithful:
        print("[bench] generating SenseVoice-small stand-ins (int8) ...", file=sys.stderr, flush=True)
        models = common.faithful(models_root, quantized=True, refusals=True)
        if profile.large_weights_mb:
            print("[bench] generating SenseVoice-small stand-ins (fp32) ...", file=sys.stderr, flush=True)
            large = common.faithful(models_root / "large", quantized=False, refusals=False)
            prefer_quantized_large = False
    else:
        print(f"[bench] generating {profile.weights_mb} MB models ...", file=sys.stderr, flush=True)
        models = common.generate(models_root, profile.weights_mb, profile.compute_ms, refusals=True)
        if profile.large_weights_mb:
            print(f"[bench] generating {profile.large_weights_mb} MB models ...", file=sys.stderr, flush=True)
            large = common.generate(models_root / "large", profile.large_weights_mb, profile.compute_ms,
                                    refusals=False)
    registry = common.make_registry(workdir / "registry", models)
    large_registry = common.make_registry(workdir / "registry-large", large) if large is not None else None
    if model_dir is None:
        shutil.rmtree(models_root, ignore_errors=True)  # the registries hold their own copies; spare the disk
    return Bench(profile, workdir, out.parent, out.stem, models, registry, large, large_registry,
                 prefer_quantized_large)


if __name__ == "__main__":
    raise SystemExit(main())
