"""The report: machine, software, commands, a goal summary and every benchmark's tables, as Markdown.

The same text goes to the terminal and to ``docs/benchmarks.md``; the raw numbers go to a JSON file
beside it, so one part can be rerun (``--only``) without throwing the others away.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psutil

from bench.common import Section, Table

ORDER = ("overhead", "throughput", "swaps", "memory", "startup", "shadow", "pipeline", "streams", "floor", "sherpa",
         "batching")
REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("onnxruntime", "funasr-onnx", "numpy", "fastapi", "uvicorn", "gunicorn", "httpx")


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": model, "logical_cpus": os.cpu_count(), "physical_cores": psutil.cpu_count(logical=False),
            "ram_gib": round(psutil.virtual_memory().total / 1024**3, 1),
            "os": f"{platform.system()} {platform.release()}"}


def software() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    versions["voxswap commit"] = _git("rev-parse", "--short=12", "HEAD") or "unknown"
    changed = _git("status", "--porcelain", "--", "server")
    if changed:
        versions["voxswap commit"] += f" (+ {len(changed.splitlines())} uncommitted file(s) in server/)"
    return versions


def _git(*args: str) -> str:
    try:
        result = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30, check=False)
    except OSError:
        return ""
    return result.stdout.strip() if result.returncode == 0 else ""


def table(t: Table) -> str:
    """A Markdown table padded to line up in a terminal as well."""
    cells = [t.headers, *t.rows]
    widths = [max(len(row[i]) if i < len(row) else 0 for row in cells) for i in range(len(t.headers))]

    def line(row: list[str]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + " |"

    out = [line(t.headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *(line(r) for r in t.rows)]
    return (f"**{t.title}**\n\n" if t.title else "") + "\n".join(out)


def _met(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "**no**")


def _table(section: Section, title_start: str) -> Table | None:
    return next((t for t in section.tables if t.title.startswith(title_start)), None)


def findings(sections: dict[str, Section]) -> list[str]:
    """What the numbers say, written from the data so that a rerun rewrites it too."""
    out: list[str] = []
    if "overhead" in sections:
        clips = sections["overhead"].data["clips"]
        one, ten = clips.get("1"), clips.get("10")
        if one:
            outside = one["server_p50"] - one["inside_p50"]
            floor = sections["overhead"].data.get("http_floor_p50")
            out.append(f"**Overhead.** On 1 s clips the server's p50 is {one['overhead_p50'] * 1000:.1f} ms above the "
                       f"bare model; {outside * 1000:.1f} ms of its latency is spent outside inference (HTTP, "
                       "multipart parsing, WAV decoding, the hops to the decode and inference threads, JSON). "
                       + (f"A bare `GET /health/live` round trip alone takes {floor * 1000:.1f} ms here. "
                          if floor else "")
                       + "That fixed cost is what misses the 1 ms goal; it is a few per cent of a real clip's "
                       "inference and shrinks relative to longer clips"
                       + (f" (ratio {ten['ratio_p50']:.3f} on 10 s clips)." if ten else "."))
    if "throughput" in sections:
        workers = sections["throughput"].data["workers"]
        parts = [f"{w} worker{'s' if w != '1' else ''}: {cell['best_ratio']:.2f} of direct at best"
                 for w, cell in workers.items()]
        text = "**Throughput.** " + "; ".join(parts) + "."
        shares = workers.get("2", {}).get("shares", {})
        lopsided = [c for c, share in shares.items()
                    if int(c) >= 2 and len(share) > 1 and min(share) <= 0.5 * max(share)]
        if lopsided:
            text += (f" With 2 workers and {', '.join(lopsided)} clients, one worker answered most requests: each "
                     "keep-alive connection stays on the worker that accepted it, so with few clients the other "
                     "worker idles. A load balancer that spreads requests (not connections), or more clients, "
                     "evens it out.")
        above = [w for w, c in workers.items() if c["best_ratio"] > 1.0]
        if above:
            text += (f" A ratio above 1 ({', '.join(above)} worker) cannot be real, since the server runs the same "
                     "model: it is the noise of this shared machine between neighbouring windows.")
        spread = [(c["direct_max"] - c["direct_min"]) / c["direct"] for c in workers.values()
                  if c.get("direct") and "direct_max" in c]
        if spread and max(spread) > 0.1:
            text += (f" The direct maximum itself varied by up to {max(spread):.0%} between cells (other work on "
                     "this shared machine); read single ratios with that margin.")
        out.append(text)
    if "swaps" in sections:
        d = sections["swaps"].data
        text = (f"**Swaps under load.** {d['failed']} of {d['requests']} requests failed across {d['swaps_ok']} "
                f"swaps and {d['refused']} refusals. p99 during swaps is {d['p99_ratio']:.2f}x p99 outside them.")
        by_phase = {k: v for k, v in d.get("by_phase", {}).items() if v == v}
        if by_phase:
            worst = max(by_phase, key=lambda k: by_phase[k])
            text += (" p50 of requests by the phase that covered most of their life, against outside: "
                     + ", ".join(f"{k} {v:.2f}x" for k, v in by_phase.items()) + f"; *{worst}* hurts most.")
        text += (" A swap loads and smoke-tests a whole model (and hashes it, the first time) on the same cores "
                 "that serve, which costs inference CPU however the flip itself is done")
        flips = f"{d['flip_ok']} of {d['swaps_ok']}"
        text += (f"; the flip itself is a pointer under a lock ({flips} swaps flipped within verify + load + "
                 "smoke + 0.2 s).")
        out.append(text)
    if "memory" in sections:
        for name, run in sections["memory"].data.items():
            bare = run.get("bare_load", {})
            text = (f"**Memory ({name}, {run['weights_bytes'] / 1024**2:.0f} MiB model).** RSS after the last swap is "
                    f"{run['drift']:+.1%} from the first"
                    + (f" ({run['late_drift']:+.1%} over the second half)" if "late_drift" in run else "") + "; ")
            if bare:
                peak = (bare["peak"] - bare["before"]) / run["weights_bytes"]
                kept = (bare["after"] - bare["before"]) / run["weights_bytes"]
                text += (f"a bare `Engine` build from the original file alone peaks at {peak:.2f}x the model file "
                         f"and keeps {kept:.2f}x. The server loads the version's prepared graph instead "
                         "(weights mapped, no parse copy, no graph optimisation), ")
                if "added_ratio_max" in run:
                    text += (f"so a swap adds {run['added_ratio_median']:.2f}x the new model's file above the steady "
                             f"state at the median and {run['added_ratio_max']:.2f}x at worst, and peaks at "
                             f"{run['peak_ratio_max']:.2f}x (old + new) above the base.")
                else:
                    text += f"and a swap peaks at {run['peak_ratio_max']:.2f}x (old + new) above the base."
            else:
                text += f"the peak during a swap is {run['peak_ratio_max']:.2f}x (old + new) above the base."
            out.append(text)
    if "startup" in sections:
        rows = sections["startup"].data
        parts = [f"{k}: {v['ready_s']:.2f} s to ready, {v['bare_build_s']:.2f} s of it the bare build"
                 for k, v in rows.items()]
        out.append("**Start-up.** " + "; ".join(parts) + ". The rest is the interpreter and imports (about "
                   f"{next(iter(rows.values()))['imports_s']:.1f} s), hashing the files and the smoke test.")
    if "shadow" in sections:
        d = sections["shadow"].data
        levels = d["levels"]
        parts = [f"{name}: p99 {cell['p99_ratio']:.2f}x, p50 {cell['p50_ratio']:.2f}x and throughput "
                 f"{cell['rps_ratio']:.2f}x without it ({cell['mirrored']:.0f} mirrored, {cell['dropped']:.0f} "
                 "dropped)" for name, cell in levels.items()]
        text = (f"**Shadow traffic.** With a {d['percent']:g}% shadow running, live requests saw "
                + "; ".join(parts) + ".")
        slow = max((cell["mirror_p95"] for cell in levels.values() if cell["mirror_p95"] == cell["mirror_p95"]),
                   default=float("nan"))
        if slow == slow and slow > 3 * d["service_s"]:
            text += (f" Mirrors took up to {slow * 1000:.0f} ms at p95 against {d['service_s'] * 1000:.0f} ms for a "
                     "lone live request: the shadow's candidate runs on one low-priority thread and waits for "
                     "the cores live requests leave idle, which is what keeps the live figures unchanged.")
        out.append(text)
    if "pipeline" in sections:
        text = _pipeline_finding(sections["pipeline"].data)
        if text:
            out.append(text)
    if "streams" in sections:
        out.append(_streams_finding(sections["streams"].data))
    return out


def _streams_finding(d: dict[str, Any]) -> str:
    levels = d["levels"]
    best = levels.get(str(d["best"]))
    text = "**Realtime streams.** " + (
        f"One process held {d['best']} concurrent real-time streams with finalisation p95 under "
        f"{d['goal_s']:g} s ({best['final_p95'] * 1000:.0f} ms; first delta p50 {best['first_delta_p50'] * 1000:.0f} "
        f"ms, p95 {best['first_delta_p95'] * 1000:.0f} ms)" if best else
        f"No level kept finalisation p95 under {d['goal_s']:g} s")
    beyond = [(n, cell) for n, cell in levels.items() if int(n) > d["best"]]
    if beyond:
        n, cell = beyond[0]
        lost = cell["lost"] + sum(cell["failed"].values())
        text += (f"; at {n} streams p95 was {cell['final_p95'] * 1000:.0f} ms"
                 + (f" and {lost} turns failed" if lost else "") + f", the server using {cell['server_cores']:.2f} "
                 f"cores while other work on the machine took {cell.get('other_cores', 0):.2f}")
    return text + ". The first delta waits for the turn's first piece (the segment length less the padding)."


def _pipeline_finding(d: dict[str, Any]) -> str:
    if not d.get("vad_available", True) or not d.get("clips"):
        return ""
    clips = d["clips"]
    direct = [row["vad_direct_rtf"] for row in clips.values()]
    served = [row["vad_served_rtf"] for row in clips.values()]
    punc = [row["paths"]["asr-punc"]["stages_s"] for row in clips.values()]
    full = [row["paths"]["full"]["stages_s"] - row["vad_served_p50"] for row in clips.values()]
    text = (f"**Pipelines.** The real FSMN-VAD costs {min(direct) * 1000:.1f}-{max(direct) * 1000:.1f} ms per audio "
            f"second as a bare engine and {min(served) * 1000:.1f}-{max(served) * 1000:.1f} ms inside the server's "
            f"pipeline (RTF {max(served):.4f} at worst). A pipeline's stages cost a request, over ASR alone: "
            + "; ".join(f"{k} s: asr + punc {row['paths']['asr-punc']['stages_ratio']:.3f}x, vad + asr + punc "
                        f"{row['paths']['full']['stages_ratio']:.3f}x" for k, row in clips.items())
            + f". Without the VAD the stages' time was within {max(abs(v) for v in punc) * 1000:.1f} ms of ASR "
            "alone's (a second lease and the stand-in punctuation pass); with it, the VAD's time plus at most "
            f"{max(full) * 1000:.1f} ms.")
    swings = [row["paths"]["asr-punc"]["inference_p50"] / row["paths"]["sensevoice"]["inference_p50"]
              for row in clips.values()]
    whole = [cell["ratio_p50"] for row in clips.values() for m, cell in row["paths"].items() if m != "sensevoice"]
    if max(abs(s - 1) for s in swings) > 0.1:
        text += (f" Whole requests ranged from {min(whole):.2f}x to {max(whole):.2f}x ASR alone's p50, but that is "
                 f"the ASR's own time moving: with the same model on the same pieces, `asr + punc` spent "
                 f"{min(swings):.2f}x to {max(swings):.2f}x the inference time of `asr alone` (other work on this "
                 "shared machine).")
    text += f" {d['failed']} of {d['requests']} requests failed and {d['mislabelled']} named the wrong versions."
    return text


def render(doc: dict[str, Any], sections: dict[str, Section]) -> str:
    m, sw = doc["machine"], doc["software"]
    parts = [
        "# voxswap benchmarks",
        "",
        ("> **Quick run**: tiny models and a handful of requests, only to prove the harness works. "
         "Its numbers mean nothing.\n" if doc.get("quick") else "")
        + (_stand_in(doc) if doc.get("stand_in", True) else
           "> Measured with a real model folder: " + "; ".join(doc["models"]) + ". The refused versions are "
           "copies of it with a garbage model file and with a smoke clip that expects another transcript."),
        "",
        "Every number below is a ratio or difference measured within one run on one machine (the server against "
        "the bare model, during swaps against outside them), never a timing assert; the test suite only runs "
        "`--quick` to check that the harness works (`tests/test_bench.py`). Each run, and each `--only` rerun of "
        "a part, generates its models afresh and calibrates their compute on the spot, so absolute times differ "
        "between parts run at different times; compare within a part.",
        "",
        "## Summary",
        "",
        table(Table(["benchmark", "goal", "measured", "met?"],
                    [[g.name, g.goal, g.measured, _met(g.met)]
                     for key in ORDER if key in sections for g in sections[key].goals])),
        "",
        "## What the numbers say",
        "",
        *[f"- {line}" for line in findings(sections)],
        "",
        "## Machine and software",
        "",
        f"- CPU: {m['cpu']}, {m['logical_cpus']} logical CPUs ({m['physical_cores']} cores), "
        f"{m['ram_gib']} GiB RAM, {m['os']}",
        "- " + ", ".join(f"{k} {v}" for k, v in sw.items()),
        "- The machine is shared: other work ran beside the benchmark. Load averages (1/5/15 min) are "
        "recorded at the start and end of the run and of every part, so a reader can judge the noise.",
        "",
        "## Commands",
        "",
    ]
    for run in doc["runs"]:
        parts += [f"- `{run['command']}` ({run['started']}, {run['minutes']:.1f} min; "
                  f"load {_load(run['load_start'])} at start, {_load(run['load_end'])} at end; parts: "
                  f"{', '.join(run['sections'])})"]
    parts.append("")
    for key in ORDER:
        if key not in sections:
            continue
        s = sections[key]
        parts += [f"## {s.title}", "", s.intro, ""]
        for t in s.tables:
            parts += [table(t), ""]
        parts += [f"- {note}" for note in s.notes]
        parts += [f"- Ran {s.ran_at} in {s.seconds:.0f} s; load {_load(s.load[0])} before, {_load(s.load[1])} after."]
        parts.append("")
        parts += [f"![{s.title}]({plot})\n" for plot in s.plots]
    return "\n".join(parts).rstrip() + "\n"


def _stand_in(doc: dict[str, Any]) -> str:
    return ("> **The model is a stand-in.** No real SenseVoice weights can be downloaded where this ran, so both "
            "versions are generated SenseVoice-format folders (`server/testing/modelgen.py`) loaded and run by "
            "funasr-onnx exactly like the real export: " + "; ".join(doc["models"]) + ". "
            "They cost what SenseVoice-small int8 costs on a CPU (the published ~40 ms of CPU per audio "
            "second at 2 threads, calibrated on this machine when generated) but recognise nothing. "
            "To measure the real model, point the same benchmark at its folder: "
            "`.venv/bin/python -m bench.run --model-dir /path/to/SenseVoiceSmall` (it uses `model_quant.onnx` "
            "for everything and `model.onnx` for the large rows when both are there).")


def _load(values: list[float]) -> str:
    return "/".join(f"{v:.2f}" for v in values) if values else "n/a"


def save(path: Path, doc: dict[str, Any], sections: dict[str, Section]) -> str:
    text = render(doc, sections)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    raw = {**doc, "sections": {k: asdict(s) for k, s in sections.items()}}
    path.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=_number) + "\n")
    return text


def load_previous(path: Path) -> tuple[dict[str, Any], dict[str, Section]]:
    """The document and sections of an earlier run, to keep what ``--only`` does not rerun."""
    json_path = path.with_suffix(".json")
    if not json_path.is_file():
        return {}, {}
    raw = json.loads(json_path.read_text())
    sections = {k: Section.from_json(v) for k, v in raw.pop("sections", {}).items()}
    return raw, sections


def _number(value: object) -> object:
    if hasattr(value, "item"):
        return value.item()  # numpy scalars
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
