"""Real Prometheus and voxswap processes, and the queries the repository's dashboard and alerts run.

The observability tests check the shipped assets (deploy/prometheus/, grafana/) against a real
Prometheus scraping a real server, so a renamed metric or a query Prometheus cannot parse fails
here rather than on an operator's empty dashboard.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERT_RULES = PROMETHEUS_DIR / "alerts.yml"
ALERT_TESTS = PROMETHEUS_DIR / "alerts_test.yml"
DASHBOARD = REPO / "grafana" / "dashboards" / "voxswap.json"
GRAFANA_PROVISIONING = REPO / "grafana" / "provisioning"

# scripts/install-system-deps.sh installs Debian's `prometheus` package, which ships both.
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")

# $name, ${name} and ${name:format}: the forms Grafana expands in a query.
GRAFANA_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")
LABEL_VALUES = re.compile(r"^label_values\((?P<selector>.+),\s*(?P<label>\w+)\)$")


@dataclass(frozen=True)
class Query:
    """One PromQL expression from the assets, named by where an operator would find it."""

    source: str  # e.g. "panel 'Requests by status' A", "alert VoxswapSwapFailed"
    expr: str
    panel: str | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def all_panels(dashboard: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def panel_queries(dashboard: Mapping[str, Any]) -> list[Query]:
    return [Query(f"panel {panel['title']!r} {target['refId']}", target["expr"], panel["title"])
            for panel in all_panels(dashboard) for target in panel.get("targets", []) if target.get("expr")]


def annotation_queries(dashboard: Mapping[str, Any]) -> list[Query]:
    return [Query(f"annotation {a['name']!r}", a["expr"])
            for a in dashboard.get("annotations", {}).get("list", []) if a.get("expr")]


def variable_queries(dashboard: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """(variable, label, PromQL) for each ``label_values(selector, label)`` query variable."""
    found = []
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        match = LABEL_VALUES.match(query.strip())
        assert match, f"variable {var['name']}: only label_values(selector, label) is checked, got {query!r}"
        label = match["label"]
        found.append((var["name"], label, f"count by ({label}) ({match['selector']})"))
    return found


def alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERT_RULES.read_text())
    return [rule for group in data["groups"] for rule in group["rules"] if "alert" in rule]


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """Expand Grafana variables as Grafana would before sending the query; unknown ones raise."""

    def replace(match: re.Match[str]) -> str:
        name = match[1] or match[2]
        if name not in values:
            raise KeyError(f"no test value for Grafana variable ${name} in {expr!r}")
        return values[name]

    return GRAFANA_VARIABLE.sub(replace, expr)


def exported_names(exposition: str) -> set[str]:
    """Every sample name an exposition can carry, even for families with no samples yet."""
    from prometheus_client.parser import text_string_to_metric_families

    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_sum", "_count"))
    return names


def scrape_config(target: str, listen: str, interval: str = "1s") -> dict[str, Any]:
    """The repository's prometheus.yml pointed at one test target, with fast scrapes and rules."""
    config: dict[str, Any] = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"].update(scrape_interval=interval, evaluation_interval=interval, scrape_timeout=interval)
    config["rule_files"] = [str(ALERT_RULES)]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs["voxswap"]["static_configs"] = [{"targets": [target]}]
    if "prometheus" in jobs:
        jobs["prometheus"]["static_configs"] = [{"targets": [listen]}]
    return config


@contextmanager
def running(cmd: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None,
            cwd: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """A child process, logging to ``log_path``; stopped (TERM, then KILL) on the way out."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                env={**os.environ, **(env or {})}, start_new_session=True)
        try:
            yield proc
        finally:
            stop(proc)


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 15.0) -> None:
    """TERM for a graceful stop; if that hangs, KILL the child's whole session (gunicorn's workers)."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # start_new_session made it a group leader
        proc.wait(timeout=timeout_s)


def log_tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class QueryError(Exception):
    pass


class PrometheusAPI:
    """The parts of Prometheus' HTTP API the tests use; errors become :class:`QueryError`."""

    def __init__(self, base_url: str):
        self.base_url = base_url
        self.client = httpx.Client(base_url=base_url, timeout=10)

    def close(self) -> None:
        self.client.close()

    def _get(self, path: str, **params: Any) -> Any:
        response = self.client.get(path, params=params)
        try:
            body = response.json()
        except ValueError as exc:
            raise QueryError(f"HTTP {response.status_code}: {response.text[:200]}") from exc
        if body.get("status") != "success":
            raise QueryError(f"{body.get('errorType')}: {body.get('error')}")
        if body.get("warnings"):
            raise QueryError(f"warnings: {body['warnings']}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        data = self._get("/api/v1/query", query=expr)
        result: list[dict[str, Any]] = data["result"] if data["resultType"] in ("vector", "matrix") \
            else [{"metric": {}, "value": data["result"]}]
        return result

    def query_range(self, expr: str, start: float, end: float, step: str = "1s") -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._get("/api/v1/query_range", query=expr, start=start, end=end,
                                                 step=step)["result"]
        return result

    def rules(self) -> list[dict[str, Any]]:
        return [rule for group in self._get("/api/v1/rules")["groups"] for rule in group["rules"]]

    def alerts(self) -> list[dict[str, Any]]:
        alerts: list[dict[str, Any]] = self._get("/api/v1/alerts")["alerts"]
        return alerts

    def ready(self) -> bool:
        return self.client.get("/-/ready").status_code == 200


def has_finite_value(result: list[dict[str, Any]]) -> bool:
    values = [series["value"][1] for series in result if "value" in series]
    values += [v for series in result for _, v in series.get("values", [])]
    return any(math.isfinite(float(v)) for v in values)
