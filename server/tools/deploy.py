"""Rolling upgrade of several voxswap instances, one at a time, with automatic rollback.

``./deploy.sh`` runs this module. For each instance in turn: upload the version if its registry
lacks it, update (with ``expected_current`` and a post-swap watch), wait until every worker serves
it and the instance is ready, send a smoke transcription through it, and wait for the watch's
verdict. On any failure every instance already upgraded goes back to the version it had when the
deploy started (``expected_current`` = the new version, so an instance whose watch already rolled
back is left alone), and the exit code is non-zero. Rerunning with the same version skips the
instances already on it.

With ``--model NAME`` all of this concerns one named model: every admin call goes to
``/admin/models/NAME/...`` (an upload there creates the model where it does not exist yet), the
live version, the workers, readiness and the smoke transcription are that model's, and the others
are left alone. Without it the default model is deployed through ``/admin/model/...``, which
servers of every release answer.
"""

from __future__ import annotations

import argparse
import io
import sys
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from server.testing import synth


class DeployError(Exception):
    pass


@dataclass
class Instance:
    url: str
    token: str
    model: str | None = None  # a named model (--model); None: the default model, by its old routes
    before: str | None = None
    has_version: bool = False
    exists: bool = True  # the model exists there (False: the upload creates it)
    upgraded: bool = False
    notes: list[str] = field(default_factory=list)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.token}"}, timeout=600)

    @property
    def where(self) -> str:
        """The instance (and the model, with --model) as every message names it."""
        return self.url if self.model is None else f"{self.url} model {self.model!r}"

    def admin(self, path: str) -> str:
        """The admin route ``path`` of the model deployed: /admin/models/NAME{path} or /admin/model{path}."""
        return f"/admin/model{path}" if self.model is None else f"/admin/models/{quote(self.model, safe='')}{path}"

    def serving(self, status: dict[str, Any]) -> tuple[str | None, list[dict[str, Any]]]:
        """The model's live version and workers in an ``/api/system/status`` answer."""
        if self.model is None:
            return status.get("model_version"), list(status.get("workers", []))
        for entry in status.get("models", []):
            if entry.get("name") == self.model:
                return entry.get("live_version"), list(entry.get("workers", []))
        return None, []


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    token = args.token or _env_token()
    instances = [Instance(url.rstrip("/"), token, args.model) for url in args.instances.split(",") if url.strip()]
    if not instances:
        print("deploy: no instances given", file=sys.stderr)
        return 2
    say = _printer()
    try:
        for inst in instances:
            _inspect(inst, args.version)
    except (httpx.HTTPError, DeployError) as exc:
        say(f"cannot read the instances: {exc}")
        return 2
    model = "" if args.model is None else f"model {args.model!r}: "
    say(f"plan: {model}{args.version} to {len(instances)} instance(s), one at a time, "
        f"watch {args.watch_seconds:g} s")
    for i, inst in enumerate(instances, 1):
        action = "already on it, skip" if inst.before == args.version else \
            ("update" if inst.has_version else "upload, then update" if inst.exists else
             "upload (creates the model), then update")
        say(f"  {i}. {inst.where}: live {inst.before!r} -> {args.version!r}: {action}")
    missing = [inst for inst in instances if not inst.has_version]
    if missing and not args.model_dir:
        say(f"{len(missing)} instance(s) lack {args.version!r}; give --model-dir to upload it")
        return 2
    if args.dry_run:
        return 0
    clip = _smoke_clip(Path(args.model_dir) if args.model_dir else None)
    started = time.monotonic()
    try:
        for inst in missing:
            _upload(inst, args.version, Path(args.model_dir), say)
        for i, inst in enumerate(instances, 1):
            tag = f"[{i}/{len(instances)}]"
            if inst.before == args.version:
                say(f"{tag} {inst.where}: already serves {args.version}")
                continue
            if _live(inst) == args.version:
                # instances that share a registry moved together with an earlier one: check, not update
                say(f"{tag} {inst.where}: moved to {args.version} with the registry it shares; checking it")
                with inst.client() as c:
                    _check_serving(c, inst, args.version, args.timeout, clip, say, tag)
                continue
            if args.canary and not any(other.upgraded for other in instances):
                _canary_first(inst, args, clip, say, tag)
                continue
            _upgrade(inst, args.version, args.watch_seconds, args.timeout, clip, say, tag)
    except (DeployError, httpx.HTTPError, ValueError) as exc:  # ValueError: an answer that is not JSON
        say(f"FAILED: {exc}")
        _roll_back(instances, args.version, say)
        _report(instances, args.version, say, ok=False)
        return 1
    say(f"done in {time.monotonic() - started:.1f} s")
    _report(instances, args.version, say, ok=True)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="deploy.sh", description="rolling upgrade of voxswap instances")
    p.add_argument("--instances", required=True, help="comma-separated base URLs, upgraded in this order")
    p.add_argument("--version", required=True, help="registry version to deploy")
    p.add_argument("--model", metavar="NAME", help="the named model to deploy it to (default: the default model, "
                                                   "through the /admin/model/... routes older servers answer too)")
    p.add_argument("--model-dir", help="version folder to upload where the registry lacks the version")
    p.add_argument("--token", help="admin token (default: env VOXSWAP_ADMIN_TOKEN)")
    p.add_argument("--watch-seconds", type=float, default=30.0, help="post-swap watch per instance")
    p.add_argument("--timeout", type=float, default=300.0, help="per-instance limit for workers to converge")
    p.add_argument("--canary", type=float, metavar="PERCENT",
                   help="first run a canary on the first instance: PERCENT of its clients on the new version, "
                        "judged beside the live one; the rolling upgrade goes on only if it is promoted")
    p.add_argument("--canary-seconds", type=float, default=300.0, help="the canary's window (default %(default)s)")
    p.add_argument("--canary-min-requests", type=int, help="answers each side needs (default: the server's)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and change nothing")
    return p


def _env_token() -> str:
    import os

    return os.environ.get("VOXSWAP_ADMIN_TOKEN", "")


def _printer() -> Any:
    def say(message: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)

    return say


def _inspect(inst: Instance, version: str) -> None:
    if inst.model is not None and not _model_exists(inst, inst.model):
        inst.before, inst.has_version, inst.exists = None, False, False
        return
    data = _versions(inst)
    inst.before = data["live"]
    inst.has_version = any(v["name"] == version for v in data["versions"])


def _model_exists(inst: Instance, model: str) -> bool:
    with inst.client() as c:
        r = c.get("/admin/models")
    if r.status_code == 404:
        raise DeployError(f"{inst.url} serves no named models (GET /admin/models answered 404): upgrade it, "
                          "or deploy its default model without --model")
    _ok(r, inst, "list models")
    return any(m.get("name") == model for m in r.json().get("models", []))


def _live(inst: Instance) -> str | None:
    live: str | None = _versions(inst)["live"]
    return live


def _versions(inst: Instance) -> dict[str, Any]:
    with inst.client() as c:
        r = c.get(inst.admin("/versions"))
        _ok(r, inst, "list versions")
        data: dict[str, Any] = r.json()
        return data


def _upload(inst: Instance, version: str, model_dir: Path, say: Any) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        tar.add(model_dir, arcname=version)
    say(f"{inst.where}: uploading {version} ({buf.tell() / 2**20:.1f} MiB)")
    with inst.client() as c:
        r = c.post(inst.admin("/versions"), data={"version": version},
                   files={"file": (f"{version}.tar.gz", buf.getvalue(), "application/gzip")})
    if r.status_code == 409:
        return  # uploaded meanwhile (a rerun, or a shared registry): the checksums guard the content
    _ok(r, inst, "upload")
    inst.has_version = True


def _upgrade(inst: Instance, version: str, watch_s: float, timeout_s: float, clip: tuple[bytes, str | None],
             say: Any, tag: str) -> None:
    with inst.client() as c:
        say(f"{tag} {inst.where}: update {inst.before} -> {version}")
        r = c.post(inst.admin("/update"), json={"version": version, "expected_current": inst.before,
                                                 "watch_seconds": watch_s})
        _ok(r, inst, "update")
        inst.upgraded = True
        report = r.json()
        timings = report.get("timings", {})
        say(f"{tag} {inst.where}: swapped in {timings.get('total_s', 0):.2f} s "
            f"(load {timings.get('load_s', 0):.2f} s, smoke {timings.get('smoke_s', 0):.2f} s)")
        _check_serving(c, inst, version, timeout_s, clip, say, tag)
        if watch_s > 0:
            verdict = _wait_watch(c, inst, version, watch_s + 60)
            if verdict["state"] not in ("passed", "inconclusive"):
                raise DeployError(f"{inst.where}: watch {verdict['state']}: {verdict.get('reason')}")
            say(f"{tag} {inst.where}: watch {verdict['state']} {_watch_numbers(verdict)}")


def _canary_first(inst: Instance, args: argparse.Namespace, clip: tuple[bytes, str | None], say: Any,
                  tag: str) -> None:
    """The first instance earns the version through a canary (``on_pass: promote``); anything but a
    promotion stops the deploy, with nothing changed anywhere (a failed canary never left the live
    version)."""
    from server.tools.canary import CanaryClient, CanaryFailed, summary

    client = CanaryClient(inst.url, inst.token, inst.model)
    body = {"version": args.version, "mode": "canary", "percent": args.canary, "duration_s": args.canary_seconds,
            "on_pass": "promote", "expected_current": inst.before,
            "criteria": {"min_requests": args.canary_min_requests} if args.canary_min_requests else None}
    with client.http:
        try:
            state = client.start(body)
            say(f"{tag} {inst.where}: canary started: {args.canary:g}% of clients on {args.version} for "
                f"{args.canary_seconds:g} s")
            state = client.wait(timeout_s=args.canary_seconds + args.timeout)
        except CanaryFailed as exc:
            raise DeployError(f"{inst.where}: canary: {exc}") from exc
    say(f"{tag} {inst.where}: {summary(state)}")
    if state["state"] != "promoted":
        raise DeployError(f"{inst.where}: the canary ended {state['state']}, not promoted; no instance changed")
    inst.upgraded = True
    with inst.client() as c:
        _check_serving(c, inst, args.version, args.timeout, clip, say, tag)


def _check_serving(c: httpx.Client, inst: Instance, version: str, timeout_s: float,
                   clip: tuple[bytes, str | None], say: Any, tag: str) -> None:
    """Every worker serves ``version``, the instance is ready, and a transcription proves it."""
    _wait_converged(c, inst, version, timeout_s)
    say(f"{tag} {inst.where}: every worker serves {version}, ready")
    audio, expected = clip
    r = c.post("/api/transcribe", files={"file": ("smoke.wav", audio, "audio/wav")},
               data=None if inst.model is None else {"model": inst.model})
    _ok(r, inst, "smoke transcription")
    served = r.headers.get("x-model-version")
    if inst.model is not None and r.headers.get("x-model") != inst.model:
        raise DeployError(f"{inst.where}: smoke transcription answered by model {r.headers.get('x-model')!r}")
    if served != version:
        raise DeployError(f"{inst.where}: smoke transcription answered by {served!r}, not {version!r}")
    if expected is not None and r.json().get("text", "").strip().lower() != expected.strip().lower():
        raise DeployError(f"{inst.where}: smoke transcription gave {r.json().get('text')!r}, expected {expected!r}")
    say(f"{tag} {inst.where}: smoke transcription ok")


def _wait_converged(c: httpx.Client, inst: Instance, version: str, timeout_s: float) -> None:
    """With --model, readiness is that model's (``/health/ready?model=``): another model's trouble is
    not this deploy's."""
    deadline = time.monotonic() + timeout_s
    last = ""
    params = None if inst.model is None else {"model": inst.model}
    while time.monotonic() < deadline:
        try:
            live, workers = inst.serving(c.get("/api/system/status").json())
            ready = c.get("/health/ready", params=params).status_code == 200
        except (httpx.HTTPError, ValueError) as exc:
            last = str(exc)
        else:
            versions = {w["version"] for w in workers} or {live}
            if ready and versions == {version}:
                return
            last = f"ready={ready}, workers on {sorted(str(v) for v in versions)}"
        time.sleep(0.2)
    raise DeployError(f"{inst.where}: workers did not all serve {version} within {timeout_s:g} s ({last})")


def _wait_watch(c: httpx.Client, inst: Instance, version: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        watch = c.get(inst.admin("/watch")).json().get("watch")
        if watch and watch["version"] == version and watch["state"] != "watching":
            return dict(watch)
        time.sleep(0.25)
    raise DeployError(f"{inst.where}: no watch verdict for {version} within {timeout_s:g} s")


def _watch_numbers(verdict: dict[str, Any]) -> str:
    new = verdict.get("new") or {}
    return f"({new.get('requests', 0)} requests, {new.get('error_rate', 0):.1%} errors, " \
           f"{new.get('empty_rate', 0):.1%} empty, p95 {new.get('p95_ms')} ms)"


def _roll_back(instances: list[Instance], version: str, say: Any, *, patience_s: float = 120.0) -> None:
    """Every upgraded instance back to its version from before the deploy, each on its own: one
    that cannot be reached is reported and the others are still restored."""
    for inst in instances:
        if inst.upgraded:
            note = _restore(inst, version, patience_s) if inst.before is not None else \
                f"nothing live before the deploy to go back to: left on {version}"
            inst.notes.append(note)
            say(f"rollback {inst.where}: {note}")


def _restore(inst: Instance, version: str, patience_s: float) -> str:
    """No watch on the way back (it would judge the old version against the new one and could
    undo the rollback); ``expected_current`` leaves alone an instance its own watch rolled back."""
    assert inst.before is not None
    deadline = time.monotonic() + patience_s
    while True:
        try:
            with inst.client() as c:
                r = c.post(inst.admin("/update"), json={"version": inst.before, "expected_current": version,
                                                         "watch_seconds": 0})
            if r.status_code == 200:
                return f"rolled back to {inst.before}"
            code, message = _error(r)
            if code == "unexpected_current":
                return f"no longer on {version}, left alone ({message})"
            problem = f"{r.status_code} {code or ''}: {message}"
            if code != "swap_in_progress" and r.status_code < 500:
                return f"ROLLBACK FAILED: {problem}"
        except (httpx.HTTPError, ValueError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            return f"ROLLBACK FAILED after {patience_s:g} s: {problem}"
        time.sleep(1.0)  # a swap still running there, or the instance briefly unreachable


def _report(instances: list[Instance], version: str, say: Any, *, ok: bool) -> None:
    say("report:" if ok else "report (deploy failed, instances restored):")
    for inst in instances:
        try:
            with inst.client() as c:
                live = inst.serving(c.get("/api/system/status").json())[0]
        except httpx.HTTPError as exc:
            live = f"unreachable ({exc})"
        say(f"  {inst.where}: was {inst.before}, now {live}" + (f"; {'; '.join(inst.notes)}" if inst.notes else ""))


def _smoke_clip(model_dir: Path | None) -> tuple[bytes, str | None]:
    """The version's own golden clip when we have its folder; otherwise speech-like audio."""
    if model_dir is not None:
        for text_file in sorted((model_dir / "smoke").glob("*.txt")):
            audio = text_file.with_suffix(".wav")
            if audio.is_file():
                return audio.read_bytes(), text_file.read_text().strip()
    return synth.wav_bytes(synth.speech_like(1.5, seed=7)), None


def _ok(r: httpx.Response, inst: Instance, what: str) -> None:
    if r.status_code >= 300:
        raise DeployError(f"{inst.where}: {what} answered {r.status_code}: {_error(r)[1]}")


def _error(r: httpx.Response) -> tuple[str | None, str]:
    """The code and message of voxswap's error envelope; without one, no code and the raw body."""
    try:
        error = r.json()["error"]
        return str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        return None, r.text[:300]


if __name__ == "__main__":
    raise SystemExit(main())

