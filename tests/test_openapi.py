"""``/openapi.json`` is the contract the page, the CLI and OpenAI clients read: every JSON route
answers, in success and in failure, exactly what it declares for that status and media type."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from jsonschema import Draft202012Validator

from server.app import create_app
from server.storage.registry import Registry
from testkit.harness import wait_until
from tests.conftest import AUTH, TEXT_B
from tests.jobs_helpers import WebhookReceiver

try:
    from fastapi.routing import iter_route_contexts
except ImportError:  # before FastAPI kept included routers nested, app.routes listed every route
    def iter_route_contexts(routes: Any) -> Any:
        return iter(routes)

# Routes a client cannot make fail while the server works; each is still called in every state
# the story below reaches (the status route also unloaded).
NO_ERROR_STATE = {
    ("GET", "/v1/models"): "lists the registry; no parameter to get wrong",
    ("GET", "/health/live"): "answers whenever the event loop runs",
    ("GET", "/metrics"): "renders the metrics registry",
    ("GET", "/api/system/status"): "reports not-ready states with 200; called unloaded as well",
    ("GET", "/api/ui/vocabulary"): "constant words",
    ("GET", "/api/system/traffic"): "charts whatever traffic there was, none included",
}
UNKNOWN_JOB = "0" * 32


def schema_routes(app: FastAPI) -> dict[tuple[str, str], Any]:
    """(method, path template) -> the route, for every route the schema documents."""
    found = {}
    for route in iter_route_contexts(app.routes):
        if isinstance(getattr(route, "original_route", route), APIRoute) and route.include_in_schema:
            for method in route.methods:
                found[(method, route.path_format)] = route
    return found


@dataclass
class Contract:
    """A client that checks every answer against ``/openapi.json`` and remembers what it saw."""

    client: TestClient
    spec: dict[str, Any]
    seen: set[tuple[str, str, int, str]] = field(default_factory=set)

    def call(self, method: str, template: str, status: int, *, path: str | None = None,
             **kwargs: Any) -> httpx.Response:
        r = self.client.request(method, path or template, **kwargs)
        assert r.status_code == status, f"{method} {path or template}: {r.status_code} {r.text[:500]}"
        media = r.headers["content-type"].split(";")[0].strip()
        declared = self.spec["paths"][template][method.lower()]["responses"].get(str(status))
        assert declared is not None, f"{method} {template} answered {status}, which it does not declare"
        content = declared.get("content", {})
        assert media in content, f"{method} {template} {status} answered {media}; declared: {sorted(content)}"
        schema = content[media]["schema"]
        if media == "application/json":
            validator = Draft202012Validator({**schema, "components": self.spec["components"]})
            problems = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(r.json())]
            assert not problems, f"{method} {template} {status} does not match its schema: {problems[:5]}"
        else:
            assert schema == {"type": "string"} and r.text
        for header in declared.get("headers", {}):
            assert header in r.headers, f"{method} {template} {status} declares {header} but did not send it"
        self.seen.add((method, template, status, media))
        return r


@pytest.fixture
def contract(make_settings: Callable[..., Any], tmp_path: Path) -> Iterator[Contract]:
    settings = make_settings(data_dir=tmp_path / "data", job_poll_s=0.05, webhook_allow_networks="127.0.0.1/32")
    with TestClient(create_app(settings)) as client:
        yield Contract(client, client.get("/openapi.json").json())


def test_every_json_route_answers_what_openapi_declares(contract: Contract, registry: Registry,
                                                         model_dir: Callable[..., Path], speech_wav: bytes,
                                                         tmp_path: Path) -> None:
    c = contract
    audio = {"file": ("a.wav", speech_wav, "audio/wav")}

    # transcription, in every format, pinned to a missing version, and with uploads that are not audio
    c.call("POST", "/api/transcribe", 200, files=audio)
    c.call("POST", "/api/transcribe", 400, files={"file": ("a.wav", b"")})
    c.call("POST", "/api/transcribe", 404, files=audio, headers={"X-Model-Version": "nope"})
    c.call("POST", "/api/transcribe", 415, files={"file": ("a.wav", b"not audio at all" * 20)})
    for fmt in ("json", "verbose_json", "text", "srt", "vtt"):
        c.call("POST", "/v1/audio/transcriptions", 200, files=audio, data={"response_format": fmt})
    c.call("POST", "/v1/audio/transcriptions", 400, files=audio, data={"language": "xx"})
    c.call("POST", "/v1/audio/transcriptions", 404, files=audio, data={"model": "nope"})
    c.call("GET", "/v1/models", 200)
    for path in ("/health", "/health/ready", "/health/live", "/api/system/status", "/api/ui/vocabulary",
                 "/api/system/traffic"):
        c.call("GET", path, 200)
    assert c.call("GET", "/metrics", 200).headers["content-type"].startswith("text/plain")

    # batch jobs: submit (with a webhook), follow, fetch the result in every format, delete
    with WebhookReceiver() as hook:
        job = c.call("POST", "/api/jobs", 202, files=[("files", ("m.wav", speech_wav))],
                     data={"webhook_url": hook.url}).json()["jobs"][0]
        one = f"/api/jobs/{job['id']}"
        wait_until(lambda: (c.client.get(one).json()["webhook"] or {}).get("status") == "delivered",
                   timeout_s=60, message="the job and its webhook")
    c.call("POST", "/api/jobs", 400, files=[("files", ("empty.wav", b""))])
    c.call("GET", "/api/jobs", 200)
    c.call("GET", "/api/jobs", 400, params={"status": "bogus"})
    c.call("GET", "/api/jobs/{job_id}", 200, path=one)
    c.call("GET", "/api/jobs/{job_id}", 404, path=f"/api/jobs/{UNKNOWN_JOB}")
    for fmt in ("json", "txt", "srt", "vtt"):
        c.call("GET", "/api/jobs/{job_id}/result", 200, path=f"{one}/result", params={"format": fmt})
    c.call("GET", "/api/jobs/{job_id}/result", 400, path=f"{one}/result", params={"format": "pdf"})
    c.call("GET", "/api/jobs/{job_id}/result", 404, path=f"/api/jobs/{UNKNOWN_JOB}/result")
    c.call("DELETE", "/api/jobs/{job_id}", 200, path=one)
    c.call("DELETE", "/api/jobs/{job_id}", 404, path=one)

    # admin: a swap watched until it settles, refusals, rollback, reload, unload and load
    c.call("GET", "/admin/model/versions", 200, headers=AUTH)
    c.call("GET", "/admin/model/versions", 401)
    c.call("POST", "/admin/model/update", 200, json={"version": "b", "watch_seconds": 0.3}, headers=AUTH)
    c.call("GET", "/admin/model/watch", 200, headers=AUTH)
    wait_until(lambda: c.client.get("/admin/model/watch", headers=AUTH).json()["watch"]["state"] != "watching",
               timeout_s=30, message="the post-swap watch to finish")
    assert c.call("GET", "/admin/model/watch", 200, headers=AUTH).json()["watch"]["new"]
    c.call("GET", "/admin/model/watch", 401)
    c.call("GET", "/api/system/status", 200)  # now with a finished watch
    c.call("POST", "/admin/model/update", 400, json={}, headers=AUTH)
    c.call("POST", "/admin/model/update", 404, json={"version": "nope"}, headers=AUTH)
    c.call("POST", "/admin/model/update", 409, json={"version": "a", "expected_current": "a"}, headers=AUTH)
    registry.add(model_dir(TEXT_B), "broken")
    victim = registry.version_dir("broken") / "am.mvn"
    os.chmod(victim, 0o644)
    victim.write_text(victim.read_text() + " ")
    refused = c.call("POST", "/admin/model/update", 422, json={"version": "broken"}, headers=AUTH)
    assert refused.json()["error"]["report"]["outcome"] == "verify_failed"
    c.call("POST", "/admin/model/rollback", 200, headers=AUTH)
    c.call("POST", "/admin/model/rollback", 409, json={"expected_current": "b"}, headers=AUTH)
    c.call("POST", "/admin/model/reload", 200, headers=AUTH)
    c.call("POST", "/admin/model/reload", 401)
    c.call("POST", "/admin/model/load", 409, headers=AUTH)
    assert c.call("POST", "/admin/model/unload", 200, headers=AUTH).json()["unloaded"] == "a"
    assert c.call("POST", "/admin/model/unload", 200, headers=AUTH).json() == {"unloaded": None}
    c.call("POST", "/admin/model/unload", 401)
    c.call("GET", "/health", 503)
    c.call("GET", "/health/ready", 503)
    c.call("GET", "/api/system/status", 200)  # unloaded: no model, no smoke report
    c.call("POST", "/api/transcribe", 503, files=audio)
    c.call("POST", "/v1/audio/transcriptions", 503, files=audio)
    c.call("POST", "/admin/model/load", 200, headers=AUTH)

    # versions: upload, refuse a duplicate and a bad name, remove
    archive = registry.export_archive("b", tmp_path / "b.tar.gz").read_bytes()
    upload = {"file": ("b.tar.gz", archive, "application/gzip")}
    c.call("POST", "/admin/model/versions", 201, data={"version": "b2"}, files=upload, headers=AUTH)
    c.call("POST", "/admin/model/versions", 409, data={"version": "b2"}, files=upload, headers=AUTH)
    c.call("POST", "/admin/model/versions", 400, data={"version": "bad name"}, files=upload, headers=AUTH)
    c.call("DELETE", "/admin/model/versions/{name}", 200, path="/admin/model/versions/b2", headers=AUTH)
    c.call("DELETE", "/admin/model/versions/{name}", 404, path="/admin/model/versions/b2", headers=AUTH)
    c.call("DELETE", "/admin/model/versions/{name}", 409, path="/admin/model/versions/a", headers=AUTH)
    c.call("GET", "/admin/history", 200, headers=AUTH)
    c.call("GET", "/admin/history", 400, params={"limit": 0}, headers=AUTH)
    c.call("GET", "/api/system/traffic", 200)  # now with the requests above to chart

    # the named-model twins of the routes above, and the list of models
    m = "/admin/models/{model}"
    c.call("POST", f"{m}/versions", 201, path="/admin/models/meeting/versions", data={"version": "m1"},
           files=upload, headers=AUTH)
    c.call("POST", f"{m}/versions", 400, path="/admin/models/a@b/versions", data={"version": "m1"}, files=upload,
           headers=AUTH)
    c.call("POST", f"{m}/versions", 409, path="/admin/models/meeting/versions", data={"version": "m1"},
           files=upload, headers=AUTH)
    c.call("GET", "/admin/models", 200, headers=AUTH)
    c.call("GET", "/admin/models", 401)
    c.call("POST", f"{m}/load", 503, path="/admin/models/meeting/load", headers=AUTH)  # no current version yet
    c.call("POST", f"{m}/update", 200, path="/admin/models/meeting/update", json={"version": "m1"}, headers=AUTH)
    c.call("POST", f"{m}/update", 404, path="/admin/models/nope/update", json={"version": "m1"}, headers=AUTH)
    c.call("GET", f"{m}/versions", 200, path="/admin/models/meeting/versions", headers=AUTH)
    c.call("GET", f"{m}/versions", 404, path="/admin/models/nope/versions", headers=AUTH)
    c.call("GET", f"{m}/watch", 200, path="/admin/models/meeting/watch", headers=AUTH)
    c.call("GET", f"{m}/watch", 404, path="/admin/models/nope/watch", headers=AUTH)
    c.call("POST", f"{m}/reload", 200, path="/admin/models/meeting/reload", headers=AUTH)
    c.call("POST", f"{m}/reload", 404, path="/admin/models/nope/reload", headers=AUTH)
    c.call("POST", f"{m}/rollback", 409, path="/admin/models/meeting/rollback", headers=AUTH)  # no previous
    c.call("GET", "/health/ready", 200, params={"model": "meeting"})
    c.call("GET", "/health/ready", 404, params={"model": "nope"})
    c.call("POST", "/api/transcribe", 200, files=audio, data={"model": "meeting"})
    c.call("GET", "/admin/history", 200, params={"model": "meeting"}, headers=AUTH)
    c.call("GET", "/admin/history", 404, params={"model": "nope"}, headers=AUTH)
    c.call("POST", f"{m}/unload", 200, path="/admin/models/meeting/unload", headers=AUTH)
    c.call("POST", f"{m}/unload", 404, path="/admin/models/nope/unload", headers=AUTH)
    c.call("POST", f"{m}/load", 200, path="/admin/models/meeting/load", headers=AUTH)
    c.call("DELETE", f"{m}/versions/{{name}}", 409, path="/admin/models/meeting/versions/m1", headers=AUTH)
    c.call("DELETE", f"{m}/versions/{{name}}", 404, path="/admin/models/meeting/versions/zz", headers=AUTH)
    c.call("POST", f"{m}/versions", 201, path="/admin/models/meeting/versions", data={"version": "m2"},
           files=upload, headers=AUTH)
    c.call("POST", f"{m}/update", 200, path="/admin/models/meeting/update", json={"version": "m2"}, headers=AUTH)
    c.call("POST", f"{m}/rollback", 200, path="/admin/models/meeting/rollback", headers=AUTH)
    c.call("POST", f"{m}/versions", 201, path="/admin/models/meeting/versions", data={"version": "m3"},
           files=upload, headers=AUTH)
    c.call("DELETE", f"{m}/versions/{{name}}", 200, path="/admin/models/meeting/versions/m3", headers=AUTH)

    # pipelines: a one-stage pipeline over the meeting model, answered through it
    p = "/admin/pipelines/{name}"
    c.call("PUT", p, 200, path="/admin/pipelines/talks", json={"asr": "meeting"}, headers=AUTH)
    c.call("PUT", p, 404, path="/admin/pipelines/talks", json={"asr": "nope"}, headers=AUTH)
    c.call("PUT", p, 409, path="/admin/pipelines/meeting", json={"asr": "meeting"}, headers=AUTH)
    c.call("PUT", p, 400, path="/admin/pipelines/talks", json={"asr": "meeting", "vad": "meeting"}, headers=AUTH)
    c.call("GET", "/admin/pipelines", 200, headers=AUTH)
    c.call("GET", "/admin/pipelines", 401)
    c.call("GET", p, 200, path="/admin/pipelines/talks", headers=AUTH)
    c.call("GET", p, 404, path="/admin/pipelines/nope", headers=AUTH)
    c.call("POST", "/api/transcribe", 200, files=audio, data={"model": "talks"})
    c.call("DELETE", p, 200, path="/admin/pipelines/talks", headers=AUTH)
    c.call("DELETE", p, 404, path="/admin/pipelines/talks", headers=AUTH)

    # canaries: start, follow, stop, on the default model and a named one
    c.call("GET", "/admin/model/canary", 404, headers=AUTH)
    c.call("POST", "/admin/model/canary", 404, json={"version": "nope"}, headers=AUTH)
    c.call("POST", "/admin/model/canary", 422, json={"version": "broken", "percent": 50}, headers=AUTH)
    live = c.client.get("/admin/model/versions", headers=AUTH).json()["live"]
    c.call("POST", "/admin/model/canary", 200, json={"version": "b" if live == "a" else "a", "mode": "shadow",
                                                     "percent": 10,
                                                     "criteria": {"min_requests": 3}}, headers=AUTH)
    c.call("POST", "/api/transcribe", 200, files=audio)
    c.call("GET", "/admin/model/canary", 200, headers=AUTH)
    c.call("DELETE", "/admin/model/canary", 200, headers=AUTH)
    c.call("DELETE", "/admin/model/canary", 409, headers=AUTH)
    c.call("POST", f"{m}/canary", 200, path="/admin/models/meeting/canary", json={"version": "m2", "percent": 50},
           headers=AUTH)
    c.call("POST", f"{m}/canary", 409, path="/admin/models/meeting/canary", json={"version": "m2"}, headers=AUTH)
    c.call("GET", f"{m}/canary", 200, path="/admin/models/meeting/canary", headers=AUTH)
    c.call("GET", f"{m}/canary", 404, path="/admin/models/nope/canary", headers=AUTH)
    c.call("DELETE", f"{m}/canary", 200, path="/admin/models/meeting/canary", headers=AUTH)
    c.call("DELETE", f"{m}/canary", 409, path="/admin/models/meeting/canary", headers=AUTH)

    # the calls above reached every documented route, each success media type, and each error state
    routes = set(schema_routes(c.client.app))
    called = {(method, template) for method, template, _, _ in c.seen}
    assert called == routes, f"not called: {sorted(routes - called)}; not in the app: {sorted(called - routes)}"
    failed = {(method, template) for method, template, status, _ in c.seen if status >= 400}
    assert set(NO_ERROR_STATE) <= routes
    assert routes - failed == set(NO_ERROR_STATE), f"no error state: {sorted(routes - failed - set(NO_ERROR_STATE))}"
    for method, template in routes:
        for status, declared in c.spec["paths"][template][method.lower()]["responses"].items():
            if status.startswith("2"):
                for media in declared.get("content", {}):
                    assert (method, template, int(status), media) in c.seen, f"{method} {template} {media} never seen"


def test_every_json_route_declares_a_named_response_model(contract: Contract) -> None:
    """A route added with no model documents ``{}`` or a bare object, and fails here."""
    spec = contract.spec
    components = spec["components"]["schemas"]
    for (method, template), route in schema_routes(contract.client.app).items():
        response_class = getattr(route.response_class, "value", route.response_class)
        if not issubclass(response_class, JSONResponse):
            continue
        status = str(route.status_code or 200)
        content = spec["paths"][template][method.lower()]["responses"][status]["content"]
        schema = content["application/json"]["schema"]
        refs = [schema] if "$ref" in schema else schema.get("anyOf", [])
        assert refs and all("$ref" in ref for ref in refs), f"{method} {template} declares no model: {schema}"
        for ref in refs:
            model = components[ref["$ref"].rsplit("/", 1)[1]]
            assert model.get("properties"), f"{method} {template}: {ref['$ref']} has no fields"


def test_metrics_are_declared_as_prometheus_text(contract: Contract) -> None:
    assert set(contract.spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    r = contract.client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain") and "voxswap_" in r.text
