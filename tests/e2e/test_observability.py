"""The shipped Prometheus config, alert rules and Grafana dashboard work against the real server.

promtool checks the files; then a real voxswap process serves traffic, swaps once and refuses a
broken version while a real Prometheus scrapes it and evaluates the repository's alert rules, and
every dashboard and alert query is run through Prometheus' HTTP API.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient
from websockets.sync.client import connect

from server.metrics import SWAP_OUTCOMES, SWAP_PHASES
from server.settings import Settings
from server.storage.registry import Registry
from testkit.harness import LoadGenerator, wait_until
from testkit.prometheus import (
    ALERT_RULES,
    ALERT_TESTS,
    DASHBOARD,
    GRAFANA_PROVISIONING,
    GRAFANA_VARIABLE,
    PROMETHEUS,
    PROMETHEUS_CONFIG,
    PROMTOOL,
    PrometheusAPI,
    Query,
    QueryError,
    alert_rules,
    all_panels,
    annotation_queries,
    exported_names,
    free_port,
    has_finite_value,
    load_dashboard,
    log_tail,
    panel_queries,
    running,
    scrape_config,
    substitute,
    variable_queries,
)
from tests.conftest import AUTH, TEXT_A, TEXT_B, TOKEN, copy_model
from tests.test_realtime_observability import Talker, receive, transcribe_one_turn, ws_url

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not found; scripts/install-system-deps.sh installs Debian's prometheus")
needs_prometheus = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="prometheus not found; scripts/install-system-deps.sh installs Debian's prometheus")

# Panels that may be empty after a healthy run: no request was refused, and prometheus-client only
# creates a labelled counter's series at its first increment.
MAY_BE_EMPTY = {"Rejected requests by reason"}
# Per-window swap means are 0/0 (NaN) once the swap is older than the window.
MAY_BE_NAN = {"Swap phase durations"}
# The name of the model the registry folder itself holds: the one a single-model server serves.
DEFAULT_MODEL: str = Settings.model_fields["default_model"].default
# The families that carry a `model` label, and their labels (`le` and gunicorn's `pid` aside): the
# dashboard filters each by $model, and the alerts about models keep the label. A family that gains
# or loses the label must be handled in grafana/ and deploy/prometheus/ too.
PER_MODEL_LABELS: dict[str, set[str]] = {
    "voxswap_requests_total": {"route", "status", "model", "version"},
    "voxswap_request_duration_seconds": {"route", "model", "version"},
    "voxswap_inference_duration_seconds": {"model", "version"},
    "voxswap_audio_seconds_total": {"model", "version"},
    "voxswap_real_time_factor": {"model", "version"},
    "voxswap_model_active": {"model", "version"},
    "voxswap_model_loaded": {"model"},
    "voxswap_swaps_total": {"model", "outcome"},
    "voxswap_swap_phase_duration_seconds": {"model", "phase"},
    "voxswap_model_load_duration_seconds": {"model"},
    "voxswap_model_memory_bytes": {"model"},
    "voxswap_swap_freed_memory_bytes": {"model"},
    "voxswap_registry_generation": {"model"},
    "voxswap_shadow_requests_total": {"model", "outcome"},
    "voxswap_realtime_turns_total": {"model", "outcome"},
    "voxswap_realtime_first_delta_seconds": {"model"},
    "voxswap_realtime_finalize_seconds": {"model"},
    "voxswap_realtime_audio_seconds_total": {"model"},
    "voxswap_batch_requests": {"model"},
}
# a per-model family named in PromQL, a histogram by any of its series
PER_MODEL_METRIC = re.compile(
    r"\b(?:" + "|".join(sorted(PER_MODEL_LABELS, key=len, reverse=True)) + r")(?:_bucket|_sum|_count)?\b")


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True, timeout=60)


def samples(exposition: str) -> dict[str, list[dict[str, str]]]:
    """The label sets of every sample in an exposition, by family name (``_total`` kept on counters).

    The text format writes a counter's or histogram's ``X_created`` as a gauge family of its own,
    after ``X``'s: its samples count as ``X``'s.
    """
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(exposition):
        name = family.name + "_total" if family.type == "counter" else family.name
        if name.endswith("_created"):
            base = name.removesuffix("_created")
            name = next((n for n in (base + "_total", base) if n in found), name)
        found.setdefault(name, []).extend(dict(sample.labels) for sample in family.samples)
    return found


# -- the files ------------------------------------------------------------------------------------


@pytest.mark.e2e
@needs_promtool
def test_prometheus_config_and_its_rule_file_are_valid() -> None:
    result = promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout + result.stderr


@pytest.mark.e2e
@needs_promtool
def test_alert_rules_are_valid() -> None:
    result = promtool("check", "rules", str(ALERT_RULES))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.e2e
@needs_promtool
def test_every_alert_fires_and_stays_quiet_in_its_unit_tests() -> None:
    result = promtool("test", "rules", str(ALERT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname:\s*(\w+)", ALERT_TESTS.read_text()))
    assert tested == {rule["alert"] for rule in alert_rules()}
    for rule in alert_rules():
        assert "for" in rule and rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]


def _exercised_metrics(live_server: tuple[str, FastAPI], speech_wav: bytes) -> str:
    """/metrics after a transcription, a realtime turn and a swap, so most labelled families have samples."""
    url, _ = live_server
    with httpx.Client(base_url=url, timeout=60) as client:
        r = client.post("/api/transcribe", files={"file": ("clip.wav", speech_wav, "audio/wav")})
        assert r.status_code == 200, r.text
        with connect(ws_url(url)) as ws:
            assert receive(ws)["type"] == "session.created"
            assert transcribe_one_turn(ws)[-1]["type"].endswith(".completed")
        r = client.post("/admin/model/update", json={"version": "b"}, headers=AUTH)
        assert r.status_code == 200, r.text
        return client.get("/metrics").text


@pytest.mark.e2e
@needs_promtool
def test_the_servers_metrics_pass_promtool_lint(live_server: tuple[str, FastAPI], speech_wav: bytes) -> None:
    result = promtool("check", "metrics", stdin=_exercised_metrics(live_server, speech_wav))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_metric_the_dashboard_and_alerts_name_is_one_the_server_exports(
        live_server: tuple[str, FastAPI], settings: Settings, speech_wav: bytes) -> None:
    exposition = _exercised_metrics(live_server, speech_wav)
    exported = exported_names(exposition)
    # the per-model families carry exactly the labels the dashboard and alerts group by, named for
    # the one model this server serves ("none": a request no model answered), and no other family
    # has a model label
    by_family = samples(exposition)
    for name, labels in PER_MODEL_LABELS.items():
        assert by_family.get(name), f"{name}: no samples after a transcription and a swap"
        for sample in by_family[name]:
            assert set(sample) - {"le", "pid"} == labels, (name, sample)
        assert {s["model"] for s in by_family[name]} - {"none"} == {settings.default_model}, name
    unexpected = {name for name, label_sets in by_family.items() if name not in PER_MODEL_LABELS
                  and any("model" in labels for labels in label_sets)}
    assert not unexpected, f"families with a model label the dashboard does not filter by $model: {unexpected}"
    texts = {"dashboard": DASHBOARD.read_text(), "alerts": ALERT_RULES.read_text()}
    for source, text in texts.items():
        named = set(re.findall(r"\bvoxswap_[a-z_]+\b", text))
        # prose in annotations names metrics too; every name must be real either way
        assert named, source
        assert named <= exported, f"{source} names metrics the server does not export: {named - exported}"


def test_the_dashboard_is_a_well_formed_grafana_dashboard() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "voxswap" and 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("instance", "model"):
        assert variables[name]["multi"] and variables[name]["includeAll"], name
        # "All" must match every value, also model="none" (requests no model answered)
        assert variables[name]["allValue"] == ".+", name
    # Grafana resolves variables in order: each may use only those before it ($model lists the
    # models of the chosen instances)
    names = list(variables)
    for name, _, expr in variable_queries(dashboard):
        used = {m[1] or m[2] for m in GRAFANA_VARIABLE.finditer(expr)}
        assert used <= set(names[:names.index(name)]), f"variable {name} uses {used}"
    assert [label for _, label, _ in variable_queries(dashboard)] == ["job", "instance", "model"]
    panels = list(all_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = [p["title"] for p in panels]
    assert len(titles) == len(set(titles)), "an operator finds a panel by its title"
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    for query in panel_queries(dashboard) + annotation_queries(dashboard):
        # windows follow the scrape interval and zoom: Grafana's variables, never a fixed [5m]
        for window in re.findall(r"\[([^\]]+)\]", query.expr):
            assert window in ("$__rate_interval", "$__interval", "$__range"), f"{query.source}: [{window}]"
        if "voxswap_" in query.expr:
            assert 'instance=~"$instance"' in query.expr, query.source
        # every selector of a per-model family follows $model, and a split by version is a split
        # by model and version: versions of two models may share a name
        for selector in PER_MODEL_METRIC.finditer(query.expr):
            assert query.expr[selector.end():].startswith("{") and \
                'model=~"$model"' in query.expr[selector.end():].split("}", 1)[0], \
                f"{query.source}: {selector[0]} not filtered by $model"
        for grouping in re.findall(r"\bby \(([^)]*)\)", query.expr):
            labels = {label.strip() for label in grouping.split(",")}
            assert "version" not in labels or "model" in labels, f"{query.source}: by ({grouping})"
    for panel in panels:
        for target in panel.get("targets", []):
            legend = target.get("legendFormat", "")
            if "{{version}}" in legend:
                assert "{{model}}@{{version}}" in legend, f"{panel['title']}: {legend!r}"


def test_grafana_provisioning_points_at_the_dashboard_and_a_prometheus() -> None:
    datasources = yaml.safe_load((GRAFANA_PROVISIONING / "datasources" / "prometheus.yml").read_text())
    assert [d["type"] for d in datasources["datasources"]] == ["prometheus"]
    providers = yaml.safe_load((GRAFANA_PROVISIONING / "dashboards" / "voxswap.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]


def test_a_fresh_server_exports_every_swap_outcome_phase_and_rejection_reason(
        client: TestClient, settings: Settings) -> None:
    text = client.get("/metrics").text
    by_family = samples(text)
    model = settings.default_model
    # per model: the first refused swap of any model must be visible to increase() (VoxswapSwapFailed)
    swaps = {(s["model"], s["outcome"]) for s in by_family["voxswap_swaps_total"]}
    assert {(model, outcome) for outcome in SWAP_OUTCOMES} <= swaps, swaps
    phases = {(s["model"], s["phase"]) for s in by_family["voxswap_swap_phase_duration_seconds"]}
    assert {(model, phase) for phase in SWAP_PHASES} <= phases, phases
    for reason in ("overloaded", "timeout", "too_large"):
        assert f'voxswap_rejected_requests_total{{reason="{reason}"}}' in text
    for outcome in ("completed", "failed", "cancelled"):
        assert f'voxswap_jobs_finished_total{{outcome="{outcome}"}} 0.0' in text
    for outcome in ("delivered", "failed"):
        assert f'voxswap_job_webhooks_total{{outcome="{outcome}"}} 0.0' in text
    assert re.search(r"voxswap_jobs_pending\{queue=\"[^\"]+\"\} 0.0", text)


# -- against a real Prometheus -------------------------------------------------------------------


@dataclass
class Voxswap:
    url: str
    target: str  # host:port, Prometheus' `instance` label
    workers: int
    model: str  # the one model it serves: the registry folder's own, the default model


@dataclass
class Prometheus:
    api: PrometheusAPI
    started: float


@pytest.fixture(params=[1, 2], ids=["uvicorn", "gunicorn-2-workers"])
def voxswap(request: pytest.FixtureRequest, tmp_path: Path, model_dir: Callable[..., Path]) -> Iterator[Voxswap]:
    """``voxswap serve`` as a child process: versions a (current), b, and broken (garbage model.onnx).

    With two workers, gunicorn's multiprocess metrics (per-worker ``pid`` labels) are scraped.
    """
    workers: int = request.param
    registry = Registry(tmp_path / "registry").ensure()
    registry.add(model_dir(TEXT_A), "a")
    registry.add(model_dir(TEXT_B), "b")
    broken = copy_model(model_dir(TEXT_A), tmp_path / "broken-model")
    (broken / "model.onnx").write_bytes(b"these bytes are not an ONNX model")
    registry.add(broken, "broken")
    registry.promote("a")
    port = free_port()
    exe = Path(sys.executable).with_name("voxswap")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "server.tools.cli"]
    cmd += ["serve", "--registry", str(registry.root), "--port", str(port), "--admin-token", TOKEN,
            "--no-seed-demo", "--workers", str(workers)]
    log = tmp_path / "voxswap.log"
    # one onnxruntime thread: the test machine's cores are shared with Prometheus and the load;
    # no load balancer watches readiness here, so stop at once on SIGTERM
    env = {"VOXSWAP_INTRA_OP_THREADS": "1", "VOXSWAP_SHUTDOWN_DELAY_S": "0", "VOXSWAP_DEFAULT_MODEL": DEFAULT_MODEL}
    with running(cmd, log, env=env) as proc:
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            assert proc.poll() is None, f"voxswap exited:\n{log_tail(log)}"
            return httpx.get(f"{url}/health", timeout=2).status_code == 200

        wait_until(healthy, timeout_s=60, interval_s=0.1, message="voxswap to serve")
        yield Voxswap(url, f"127.0.0.1:{port}", workers, DEFAULT_MODEL)


@pytest.fixture
def prometheus(tmp_path: Path, voxswap: Voxswap) -> Iterator[Prometheus]:
    """Prometheus scraping the server every second and evaluating the repository's alerts.yml."""
    assert PROMETHEUS is not None
    listen = f"127.0.0.1:{free_port()}"
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(voxswap.target, listen)))
    log = tmp_path / "prometheus.log"
    cmd = [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
           f"--web.listen-address={listen}", "--log.level=warn"]
    started = time.time()
    with running(cmd, log, cwd=tmp_path) as proc:
        api = PrometheusAPI(f"http://{listen}")
        try:
            def up() -> bool:
                assert proc.poll() is None, f"prometheus exited:\n{log_tail(log)}"
                return api.ready() and bool(api.query('up{job="voxswap"} == 1'))

            wait_until(up, timeout_s=30, interval_s=0.2, message="Prometheus to scrape voxswap")
            yield Prometheus(api, started)
        finally:
            api.close()


def _run(api: PrometheusAPI, query: Query, values: dict[str, str]) -> tuple[list[dict[str, Any]], str | None]:
    try:
        return api.query(substitute(query.expr, values)), None
    except (QueryError, KeyError) as exc:
        return [], f"{query.source}: {exc}\n  {query.expr}"


def _firing(api: PrometheusAPI, name: str) -> list[dict[str, Any]]:
    return [a for a in api.alerts() if a["labels"]["alertname"] == name and a["state"] == "firing"]


@pytest.mark.e2e
@needs_prometheus
def test_every_dashboard_and_alert_query_runs_on_a_real_prometheus_scraping_a_swapping_server(
        voxswap: Voxswap, prometheus: Prometheus, speech_wav: bytes) -> None:
    api = prometheus.api
    dashboard = load_dashboard()
    # what Grafana would send with this instance and its model selected and a 1 s scrape interval
    model = voxswap.model
    values = {"job": "voxswap", "instance": voxswap.target, "model": model, "__rate_interval": "5s",
              "__interval": "1s", "__range": "5m"}
    with LoadGenerator(voxswap.url, speech_wav, concurrency=2, pause_s=0.02) as load, ExitStack() as realtime:
        wait_until(lambda: api.query(f'rate(voxswap_requests_total{{status="200", model="{model}", version="a"}}[5s])'
                                     ' > 0'),
                   timeout_s=30, interval_s=0.2, message=f"Prometheus to see traffic on {model}@a")
        swap = httpx.post(f"{voxswap.url}/admin/model/update", json={"version": "b"}, headers=AUTH, timeout=60)
        assert swap.status_code == 200 and swap.json()["version"] == "b", swap.text
        refused = httpx.post(f"{voxswap.url}/admin/model/update", json={"version": "broken"}, headers=AUTH,
                             timeout=60)
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"]["report"]["outcome"] == "load_failed"
        # then a realtime session speaking turn after turn, for the dashboard's realtime row (not before
        # the swaps: a turn holds its version's lease, so a worker could still be draining a when the
        # second swap is asked for, and that swap would get a 409)
        talker = realtime.enter_context(Talker(voxswap.url))
        # every worker
        on_b = f'count(voxswap_model_active{{model="{model}", version="b"}} == 1) == {voxswap.workers}'
        wait_until(lambda: api.query(on_b)
                   and api.query(f'rate(voxswap_inference_duration_seconds_count{{model="{model}", version="b"}}[5s])'
                                 ' > 0')
                   and api.query(f'voxswap_swaps_total{{model="{model}", outcome="load_failed"}}')
                   and api.query(f'rate(voxswap_realtime_finalize_seconds_count{{model="{model}"}}[5s]) > 0')
                   and api.query(f'rate(voxswap_realtime_first_delta_seconds_count{{model="{model}"}}[5s]) > 0')
                   and api.query(f'rate(voxswap_batch_requests_count{{model="{model}"}}[5s]) > 0'),
                   timeout_s=30, interval_s=0.2,
                   message=f"Prometheus to see {model}@b serve, the refusal and realtime turns end")
        # the refused swap fires its alert (the first failure creates its series, so this also
        # proves the rule sees a counter's first sample)
        firing = wait_until(lambda: _firing(api, "VoxswapSwapFailed"), timeout_s=30, interval_s=0.2,
                            message="VoxswapSwapFailed to fire")

        errors: list[str] = []
        empty: list[str] = []
        other_models: list[str] = []
        finite_panels: set[str | None] = set()
        by_panel: dict[str | None, list[dict[str, Any]]] = {}
        for query in panel_queries(dashboard):
            result, error = _run(api, query, values)
            by_panel.setdefault(query.panel, []).extend(result)
            if error:
                errors.append(error)
            elif not result and query.panel not in MAY_BE_EMPTY:
                empty.append(query.source)
            # $model selects: a series that keeps the label names the selected model
            other_models += [f"{query.source}: {series['metric']}" for series in result
                             if series["metric"].get("model", model) != model]
            if has_finite_value(result):
                finite_panels.add(query.panel)
        not_finite = {q.panel for q in panel_queries(dashboard)} - finite_panels - MAY_BE_EMPTY - MAY_BE_NAN
        for query in [Query(f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules()]:
            errors.extend(e for e in [_run(api, query, values)[1]] if e)
        for name, label, expr in variable_queries(dashboard):
            result, error = _run(api, Query(f"variable {name}", expr), values)
            if error:
                errors.append(error)
            elif values[name] not in {series["metric"].get(label) for series in result}:
                empty.append(f"variable {name} does not offer {values[name]!r}")
        # Grafana runs annotations over the time range: both swaps must leave a mark
        for query in annotation_queries(dashboard):
            try:
                marks = api.query_range(substitute(query.expr, values), prometheus.started, time.time())
            except QueryError as exc:
                errors.append(f"{query.source}: {exc}")
                continue
            if not marks:
                empty.append(query.source)
        rules = api.rules()
        pending_or_firing = {a["labels"]["alertname"] for a in api.alerts()}
        # with two workers this is gunicorn's multiprocess exposition, aggregated from every worker
        lint = promtool("check", "metrics", stdin=httpx.get(f"{voxswap.url}/metrics", timeout=10).text)
    assert load.failures() == [], load.failures()[:3]  # neither swap cost a client a request
    assert talker.completed and not talker.problems, talker.problems[:3]  # nor a realtime turn

    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert not errors, "queries Prometheus refused:\n" + "\n".join(errors)
    assert not empty, f"queries with no data after traffic and swaps: {empty}"
    assert not other_models, f"series of models other than the selected {model!r}: {other_models}"
    assert not not_finite, f"panels with no finite value: {not_finite}"
    # every worker loaded a at start and swapped to b; a staged version is built by each worker,
    # so one or more of them refused broken
    swaps = {(s["metric"]["model"], s["metric"]["outcome"]): float(s["value"][1])
             for s in by_panel["Swaps in the time range"] if float(s["value"][1]) > 0}
    assert swaps.keys() == {(model, "success"), (model, "load_failed")}, swaps
    assert swaps[model, "success"] == 2 * voxswap.workers and 1 <= swaps[model, "load_failed"] <= voxswap.workers, \
        swaps
    assert {r["name"] for r in rules} == {rule["alert"] for rule in alert_rules()}
    unhealthy = [(r["name"], r.get("lastError")) for r in rules if r["health"] == "err"]
    assert not unhealthy, unhealthy
    # one alert, naming the instance, the model and what refused the version
    assert [(a["labels"]["instance"], a["labels"]["model"], a["labels"]["outcome"]) for a in firing] == \
        [(voxswap.target, model, "load_failed")]
    # a healthy server under load, with one good and one refused swap, raises nothing else
    assert pending_or_firing == {"VoxswapSwapFailed"}

