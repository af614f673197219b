"""Running one benchmark part on its own (``python -m bench.shadow``, ``python -m bench.pipeline``):
the same models and server as ``bench.run`` builds, the part's section printed as Markdown, and an
exit code that says whether every goal was met."""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from bench.common import FULL, QUICK, Bench, Section, Table, generate, make_registry
from bench.report import table


def main(part: str, doc: str, run: Callable[[Bench], Section], argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m bench.{part}", description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny models, few requests: proves the harness works")
    parser.add_argument("--weights-mb", type=int, help="generated model weights (default 240; quick 2)")
    parser.add_argument("--compute-ms", type=float, help="generated model CPU ms per audio second (default 40)")
    args = parser.parse_args(argv)
    profile = QUICK if args.quick else FULL
    overrides = {"weights_mb": args.weights_mb, "compute_ms": args.compute_ms}
    profile = dataclasses.replace(profile, **{k: v for k, v in overrides.items() if v is not None})
    workdir = Path(tempfile.mkdtemp(prefix=f"voxswap-{part}-"))
    try:
        print(f"[bench] generating {profile.weights_mb} MB models ...", file=sys.stderr, flush=True)
        models = generate(workdir / "models", profile.weights_mb, profile.compute_ms, refusals=False)
        section = run(Bench(profile, workdir, workdir, part, models, make_registry(workdir / "registry", models)))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return print_section(section, models_label=models.label)


def print_section(section: Section, *, models_label: str = "") -> int:
    """The section as Markdown on stdout; 1 when a goal was missed."""
    print(f"## {section.title}\n\n{section.intro}\n" + (f"\nModels: {models_label}\n" if models_label else ""))
    for t in section.tables:
        print(table(t) + "\n")
    print(table(Table(["goal", "target", "measured", "met?"],
                      [[g.name, g.goal, g.measured, {True: "yes", False: "**no**", None: "-"}[g.met]]
                       for g in section.goals])))
    for note in section.notes:
        print(f"- {note}")
    return 0 if all(g.met is not False for g in section.goals) else 1
