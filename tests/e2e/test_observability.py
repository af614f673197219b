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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient

from server.metrics import SWAP_OUTCOMES, SWAP_PHASES
from server.storage.registry import Registry
from testkit.harness import LoadGenerator, wait_until
from testkit.prometheus import (
    ALERT_RULES,
    ALERT_TESTS,
    DASHBOARD,
    GRAFANA_PROVISIONING,
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


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], input=stdin, capture_output=True, text=True, timeout=60)


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
    """/metrics after a transcription and a swap, so most labelled families have samples."""
    url, _ = live_server
    with httpx.Client(base_url=url, timeout=60) as client:
        r = client.post("/api/transcribe", files={"file": ("clip.wav", speech_wav, "audio/wav")})
        assert r.status_code == 200, r.text
        r = client.post("/admin/model/update", json={"version": "b"}, headers=AUTH)
        assert r.status_code == 200, r.text
        return client.get("/metrics").text


@pytest.mark.e2e
@needs_promtool
def test_the_servers_metrics_pass_promtool_lint(live_server: tuple[str, FastAPI], speech_wav: bytes) -> None:
    result = promtool("check", "metrics", stdin=_exercised_metrics(live_server, speech_wav))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_metric_the_dashboard_and_alerts_name_is_one_the_server_exports(
        live_server: tuple[str, FastAPI], speech_wav: bytes) -> None:
    exported = exported_names(_exercised_metrics(live_server, speech_wav))
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
    assert variables["instance"]["multi"] and variables["instance"]["includeAll"]
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


def test_grafana_provisioning_points_at_the_dashboard_and_a_prometheus() -> None:
    datasources = yaml.safe_load((GRAFANA_PROVISIONING / "datasources" / "prometheus.yml").read_text())
    assert [d["type"] for d in datasources["datasources"]] == ["prometheus"]
    providers = yaml.safe_load((GRAFANA_PROVISIONING / "dashboards" / "voxswap.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]


def test_a_fresh_server_exports_every_swap_outcome_phase_and_rejection_reason(client: TestClient) -> None:
    text = client.get("/metrics").text
    for outcome in SWAP_OUTCOMES:
        assert f'voxswap_swaps_total{{outcome="{outcome}"}}' in text
    for phase in SWAP_PHASES:
        assert f'voxswap_swap_phase_duration_seconds_count{{phase="{phase}"}}' in text
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
    env = {"VOXSWAP_INTRA_OP_THREADS": "1", "VOXSWAP_SHUTDOWN_DELAY_S": "0"}
    with running(cmd, log, env=env) as proc:
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            assert proc.poll() is None, f"voxswap exited:\n{log_tail(log)}"
            return httpx.get(f"{url}/health", timeout=2).status_code == 200

        wait_until(healthy, timeout_s=60, interval_s=0.1, message="voxswap to serve")
        yield Voxswap(url, f"127.0.0.1:{port}", workers)


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
    # what Grafana would send with this instance selected and a 1 s scrape interval
    values = {"job": "voxswap", "instance": voxswap.target, "__rate_interval": "5s", "__interval": "1s",
              "__range": "5m"}
    with LoadGenerator(voxswap.url, speech_wav, concurrency=2, pause_s=0.02) as load:
        wait_until(lambda: api.query('rate(voxswap_requests_total{status="200", version="a"}[5s]) > 0'),
                   timeout_s=30, interval_s=0.2, message="Prometheus to see traffic on version a")
        swap = httpx.post(f"{voxswap.url}/admin/model/update", json={"version": "b"}, headers=AUTH, timeout=60)
        assert swap.status_code == 200 and swap.json()["version"] == "b", swap.text
        refused = httpx.post(f"{voxswap.url}/admin/model/update", json={"version": "broken"}, headers=AUTH,
                             timeout=60)
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"]["report"]["outcome"] == "load_failed"
        on_b = f'count(voxswap_model_active{{version="b"}} == 1) == {voxswap.workers}'  # every worker
        wait_until(lambda: api.query(on_b)
                   and api.query('rate(voxswap_inference_duration_seconds_count{version="b"}[5s]) > 0')
                   and api.query('voxswap_swaps_total{outcome="load_failed"}'),
                   timeout_s=30, interval_s=0.2, message="Prometheus to see version b serve and the refusal")
        # the refused swap fires its alert (the first failure creates its series, so this also
        # proves the rule sees a counter's first sample)
        firing = wait_until(lambda: _firing(api, "VoxswapSwapFailed"), timeout_s=30, interval_s=0.2,
                            message="VoxswapSwapFailed to fire")

        errors: list[str] = []
        empty: list[str] = []
        finite_panels: set[str | None] = set()
        by_panel: dict[str | None, list[dict[str, Any]]] = {}
        for query in panel_queries(dashboard):
            result, error = _run(api, query, values)
            by_panel.setdefault(query.panel, []).extend(result)
            if error:
                errors.append(error)
            elif not result and query.panel not in MAY_BE_EMPTY:
                empty.append(query.source)
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

    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert not errors, "queries Prometheus refused:\n" + "\n".join(errors)
    assert not empty, f"queries with no data after traffic and swaps: {empty}"
    assert not not_finite, f"panels with no finite value: {not_finite}"
    # every worker loaded a at start and swapped to b; a staged version is built by each worker,
    # so one or more of them refused broken
    swaps = {s["metric"]["outcome"]: float(s["value"][1]) for s in by_panel["Swaps in the time range"]
             if float(s["value"][1]) > 0}
    assert swaps.keys() == {"success", "load_failed"}, swaps
    assert swaps["success"] == 2 * voxswap.workers and 1 <= swaps["load_failed"] <= voxswap.workers, swaps
    assert {r["name"] for r in rules} == {rule["alert"] for rule in alert_rules()}
    unhealthy = [(r["name"], r.get("lastError")) for r in rules if r["health"] == "err"]
    assert not unhealthy, unhealthy
    assert [(a["labels"]["instance"], a["labels"]["outcome"]) for a in firing] == \
        [(voxswap.target, "load_failed")]
    # a healthy server under load, with one good and one refused swap, raises nothing else
    assert pending_or_firing == {"VoxswapSwapFailed"}

