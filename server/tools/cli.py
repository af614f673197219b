"""``voxswap`` command line: serve, manage the registry, and make test models."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from filelock import Timeout
from pydantic import ValidationError

from server.errors import VoxswapError
from server.tools.cli_models import add_make_test_model, add_prepare_command, golden_pairs, graph_maker
from server.tools.cli_pipelines import add_pipeline_commands
from server.vocab import HistoryEvent


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result: int = args.func(args)
        return result
    except VoxswapError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `voxswap registry list --json | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except ValidationError as exc:
        print(f"error: invalid setting: {_setting_errors(exc)}", file=sys.stderr)
        return 2
    except Timeout as exc:
        print(f"error: the registry is locked by another process ({exc.lock_file}); try again", file=sys.stderr)
        return 1
    except (OSError, ValueError, KeyError) as exc:  # a path that is no folder, a damaged registry file
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {value}")
    return value


def _setting_errors(exc: ValidationError) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="voxswap", description="ASR model server with blue/green versions")
    sub = parser.add_subparsers(dest="command")

    serve = sub.add_parser("serve", help="run the HTTP server")
    _registry_arg(serve)
    serve.add_argument("--host", help="interface (default 127.0.0.1, env VOXSWAP_HOST)")
    serve.add_argument("--port", type=int, help="port (default 7860, env VOXSWAP_PORT)")
    serve.add_argument("--workers", type=int, help="processes; more than 1 runs gunicorn")
    serve.add_argument("--admin-token", help="bearer token for /admin (env VOXSWAP_ADMIN_TOKEN)")
    serve.add_argument("--device", help="cpu, cuda or cuda:N")
    serve.add_argument("--log-format", choices=["text", "json"])
    serve.add_argument("--log-level")
    serve.add_argument("--log-file", type=Path, help="also write logs here, rotated")
    serve.add_argument("--no-seed-demo", action="store_true", help="do not seed an empty registry")
    serve.add_argument("--jobs-url", help="job queue: sqlite:///dir or postgresql://... (env VOXSWAP_JOBS_URL)")
    serve.set_defaults(func=_serve)

    tr = sub.add_parser("transcribe", help="transcribe files or folders through a running server")
    tr.add_argument("paths", nargs="+", type=Path, metavar="FILE_OR_DIR")
    tr.add_argument("--server", default="http://127.0.0.1:7860", help="server URL (default %(default)s)")
    tr.add_argument("--format", choices=["txt", "srt", "vtt", "json"], default="txt", dest="fmt")
    tr.add_argument("--out", type=Path, help="write <stem>.<format> here (needed for several files)")
    tr.add_argument("--language", default="auto", help="auto, zh, en, yue, ja, ko")
    tr.add_argument("--use-itn", action="store_true", help="punctuation and inverse text normalisation")
    tr.add_argument("--model", default="", help="a model name, NAME@VERSION or a pipeline name (default: the "
                                                "server's default model)")
    tr.set_defaults(func=_transcribe)

    add_make_test_model(sub)

    reg = sub.add_parser("registry", help="manage model versions")
    rsub = reg.add_subparsers(dest="registry_command")
    add = rsub.add_parser("add", help="copy a model folder in as a new immutable version")
    _registry_arg(add)
    add.add_argument("src", type=Path)
    add.add_argument("--version", required=True)
    add.add_argument("--kind", help="the model kind (default: detected from the folder's files)")
    add.add_argument("--smoke-audio", type=Path, action="append", default=[],
                     help="a golden recording (with --smoke-text, or --smoke-segments for fsmn-vad)")
    add.add_argument("--smoke-text", action="append", default=[],
                     help="what a golden must give: the transcript, or (ct-punc) the punctuated text")
    add.add_argument("--smoke-text-in", action="append", default=[], metavar="FILE_OR_TEXT",
                     help="ct-punc: a golden's text to punctuate (a file, or the text itself), with --smoke-text")
    add.add_argument("--smoke-segments", type=Path, action="append", default=[], metavar="FILE",
                     help="fsmn-vad: a JSON file of the segments [[start_ms, end_ms], ...] a --smoke-audio must give")
    add.set_defaults(func=_registry_add)
    lst = rsub.add_parser("list", help="list every model's versions (or one model's, with --model)")
    _registry_arg(lst)
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=_registry_list)
    for name, func, help_ in (("show", _registry_show, "print a version's manifest"),
                              ("verify", _registry_verify, "check a version's checksums"),
                              ("promote", _registry_promote, "verify, smoke-test and make current"),
                              ("remove", _registry_remove, "delete a version (not current/previous)")):
        cmd = rsub.add_parser(name, help=help_)
        _registry_arg(cmd)
        cmd.add_argument("name")
        cmd.set_defaults(func=func)
    rb = rsub.add_parser("rollback", help="smoke-test the previous version and make it current")
    _registry_arg(rb)
    rb.set_defaults(func=_registry_rollback)
    hist = rsub.add_parser("history", help="print the audit log")
    _registry_arg(hist)
    hist.add_argument("--limit", type=_positive, default=50, help="the newest N events (default %(default)s)")
    hist.set_defaults(func=_registry_history)
    exp = rsub.add_parser("export", help="write a version as tar.gz (for upload to another instance)")
    _registry_arg(exp)
    exp.add_argument("name")
    exp.add_argument("out", type=Path)
    exp.set_defaults(func=_registry_export)
    add_prepare_command(rsub, _registry_arg, _registry, _settings)
    add_pipeline_commands(sub, _registry_arg, _catalog)
    can = sub.add_parser("canary", help="canary or shadow rollouts on a running server")
    can.add_argument("canary_command", choices=["start", "status", "stop"])
    can.add_argument("--server", default="http://127.0.0.1:7860", help="server URL (default %(default)s)")
    can.add_argument("--token", help="admin token (default: env VOXSWAP_ADMIN_TOKEN)")
    can.add_argument("--model", help="the named model (default: the default model)")
    can.add_argument("--version", help="start: the candidate")
    can.add_argument("--mode", choices=["canary", "shadow"])
    can.add_argument("--percent", type=float, help="of clients (canary) or requests (shadow)")
    can.add_argument("--duration", type=float, dest="duration_s", help="seconds before it is judged")
    can.add_argument("--on-pass", choices=["promote", "hold"])
    can.add_argument("--min-requests", type=_positive)
    can.add_argument("--wait", action="store_true", help="start: follow it to its verdict (exit 1 unless it passed)")
    can.add_argument("--json", action="store_true")
    can.set_defaults(func=_canary)
    jobs = sub.add_parser("jobs", help="manage the batch-job queue")
    jsub = jobs.add_subparsers(dest="jobs_command", required=True)
    mig = jsub.add_parser("migrate", help="copy every job of an SQLite store into a PostgreSQL one")
    mig.add_argument("--from", dest="source", required=True, help="sqlite:///path/to/data_dir")
    mig.add_argument("--to", dest="dest", required=True, help="postgresql://user:pass@host/db")
    mig.set_defaults(func=_jobs_migrate)
    return parser


def _registry_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--registry", type=Path,
                        help="registry folder (default ./model_registry, env VOXSWAP_REGISTRY)")
    if parser.prog.split()[-2:-1] == ["registry"]:
        parser.add_argument("--model", help="the named model (default: the default model, env VOXSWAP_DEFAULT_MODEL)")


def _settings(args: argparse.Namespace, **extra: Any) -> Any:
    from server.settings import Settings

    overrides = {k: v for k, v in extra.items() if v is not None}
    if getattr(args, "registry", None) is not None:
        overrides["registry"] = args.registry
    return Settings(**overrides)


def _catalog(args: argparse.Namespace) -> Any:
    from server.storage.catalog import ModelCatalog

    settings = _settings(args)
    return ModelCatalog(settings.registry, default=settings.default_model)


def _registry(args: argparse.Namespace) -> Any:
    """The registry of the model ``--model`` names (the default model without it)."""
    catalog = _catalog(args)
    return catalog.registry(getattr(args, "model", None) or catalog.default)


# -- serve --------------------------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    from server.logs import configure_logging

    settings = _settings(
        args, host=args.host, port=args.port, workers=args.workers, admin_token=args.admin_token,
        device=args.device, log_format=args.log_format, log_level=args.log_level, log_file=args.log_file,
        seed_demo=False if args.no_seed_demo else None, jobs_url=args.jobs_url,
    )
    configure_logging(settings.log_level, settings.log_format, settings.log_file,
                      max_mb=settings.log_max_mb, backups=settings.log_backups)
    from server.storage.registry import Registry
    from server.tools.serving import run_gunicorn, serve_single

    Registry(settings.registry).ensure()  # a registry path that is a file fails here, not in every worker

    return run_gunicorn(settings) if settings.workers > 1 else serve_single(settings)


def _transcribe(args: argparse.Namespace) -> int:
    """One file is answered at once; several (or a folder) run as batch jobs on the server."""
    from server.tools.client import ClientError, Options, run

    options = Options(server=args.server, fmt=args.fmt, out=args.out, language=args.language,
                      use_itn=args.use_itn, model=args.model)
    try:
        return run(args.paths, options)
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


# -- test models --------------------------------------------------------------------------------


# -- registry -----------------------------------------------------------------------------------


def _registry_add(args: argparse.Namespace) -> int:
    from server.storage.manifest import check_model_folder, detect_kind, parse_kind
    from server.vocab import ModelKind

    if args.kind:
        kind = parse_kind(args.kind)
        check_model_folder(args.src, kind)
    else:
        kind = detect_kind(args.src)
    with tempfile.TemporaryDirectory(prefix="voxswap-smoke-") as tmp:
        clips = golden_pairs(args, kind, Path(tmp))
        if isinstance(clips, str):
            print(f"error: {clips}", file=sys.stderr)
            return 2
        registry = _catalog(args).open_or_create(args.model, kind)
        manifest = registry.add(args.src, args.version, smoke=clips, kind=kind, prepare=graph_maker(_settings(args)))
    noun = {ModelKind.CT_PUNC: "golden text(s)"}.get(kind, "smoke clip(s)")
    print(f"added {manifest.name} to model {registry.model} ({manifest.kind}): {len(manifest.files)} files, "
          f"{manifest.total_bytes} bytes, {len(manifest.smoke)} {noun}"
          + ("" if manifest.smoke else " (no golden clip)")
          + f", {len(manifest.prepared)} graph(s) prepared for this host")
    return 0


def _registry_list(args: argparse.Namespace) -> int:
    """Every model (or the one ``--model`` names). ``--json`` keeps the default model's ``state`` and
    ``versions`` at the top, where earlier releases printed them, beside ``models``."""
    catalog = _catalog(args)
    names = [args.model] if args.model else catalog.names()
    models = [_model_listing(catalog.registry(name)) for name in names]
    if args.json:
        first = models[0]
        print(json.dumps({"default": catalog.default, "models": models, "state": first["state"],
                          "versions": first["versions"]}, indent=2))
        return 0
    for model in models:
        state = model["state"]
        print(f"model {model['name']} ({model['kind'] or 'empty'}), generation {state['generation']}:")
        for m in model["versions"]:
            mark = "*" if m["name"] == state["current"] else ("-" if m["name"] == state["previous"] else " ")
            created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m["created_at"]))
            print(f"  {mark} {m['name']:<32} {created}  {m['total_bytes'] / 2**20:9.1f} MiB  "
                  f"smoke clips: {len(m['smoke']) or 'none (built-in check)'}")
    print("(* current, - previous)")
    return 0


def _model_listing(registry: Any) -> dict[str, Any]:
    state = registry.state()
    kind = registry.kind()
    return {"name": registry.model, "kind": kind and kind.value, "current": state.current,
            "previous": state.previous, "state": state.to_json(),
            "versions": [m.to_json() for m in registry.versions()]}


def _registry_show(args: argparse.Namespace) -> int:
    print(json.dumps(_registry(args).manifest(args.name).to_file(), indent=2))  # as manifest.json holds it
    return 0


def _registry_verify(args: argparse.Namespace) -> int:
    manifest = _registry(args).verify(args.name)
    print(f"{manifest.name}: {len(manifest.files)} files match their sha256")
    return 0


def _checked_promote(args: argparse.Namespace, name: str, event: HistoryEvent) -> int:
    """The CLI's promote: the same verify + load + smoke as a server swap, then the pointer."""
    from server.lifecycle.builder import CandidateBuilder
    from server.metrics import Metrics

    settings = _settings(args)
    registry = _registry(args)
    report = CandidateBuilder(registry, settings, Metrics().for_model(registry.model)).trial(name, event=event)
    state = registry.promote(name, actor="cli", event=event,
                             details={"timings": report.to_json()["timings"]})
    smoke = report.smoke or {}
    print(f"{event}: {name} is current for model {registry.model} (generation {state.generation}); "
          f"smoke: {smoke.get('summary')} passed in {report.timings.get('smoke_s', 0):.2f} s. "
          "Running servers follow within a second.")
    return 0


def _registry_promote(args: argparse.Namespace) -> int:
    return _checked_promote(args, args.name, HistoryEvent.PROMOTE)


def _registry_rollback(args: argparse.Namespace) -> int:
    return _checked_promote(args, _registry(args).rollback_target(), HistoryEvent.ROLLBACK)


def _registry_remove(args: argparse.Namespace) -> int:
    _registry(args).remove(args.name)
    print(f"removed {args.name}")
    return 0


def _registry_history(args: argparse.Namespace) -> int:
    for event in _catalog(args).history(args.model, args.limit):
        print(json.dumps(event, sort_keys=True))
    return 0


def _registry_export(args: argparse.Namespace) -> int:
    out = _registry(args).export_archive(args.name, args.out)
    print(f"wrote {out} ({os.path.getsize(out)} bytes)")
    return 0


def _canary(args: argparse.Namespace) -> int:
    from server.tools.canary import CanaryClient, run

    token = args.token or os.environ.get("VOXSWAP_ADMIN_TOKEN", "")
    if args.canary_command == "start" and not args.version:
        print("error: canary start needs --version", file=sys.stderr)
        return 2
    body = {"version": args.version, "mode": args.mode, "percent": args.percent, "duration_s": args.duration_s,
            "on_pass": args.on_pass, "criteria": {"min_requests": args.min_requests} if args.min_requests else None}
    return run(args.canary_command, CanaryClient(args.server, token, args.model), body, wait=args.wait,
               as_json=args.json, timeout_s=120)


def _jobs_migrate(args: argparse.Namespace) -> int:
    """Stop the old instance first: a job it runs meanwhile would be copied as pending and run twice."""
    from server.storage.job_transfer import move_jobs

    moved = move_jobs(args.source, args.dest, spool_dir=_settings(args).data_dir / "spool")
    print(f"copied {moved.copied} jobs ({moved.requeued} were running: now pending); "
          f"{moved.skipped} were already there")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
