"""The deployment files agree with Kubernetes' schemas, the image, the settings and each other.

Offline and fast (no cluster, no container engine): part of the default suite.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any

import kubernetes_validate
import pytest
import yaml

from server.settings import Settings
from server.tools.serving import gunicorn_options
from tests.container.engine import ROOT

K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATION = K8S / "kustomization.yaml"
COMPOSE = ROOT / "deploy" / "compose.yaml"
NGINX_CONF = ROOT / "deploy" / "nginx.conf"
PROMETHEUS = ROOT / "deploy" / "prometheus"
SETTING_NAMES = {f"VOXSWAP_{name.upper()}" for name in Settings.model_fields}


def k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    return [(path.name, doc) for path in sorted(K8S.glob("*.yaml")) if path != KUSTOMIZATION
            for doc in yaml.safe_load_all(path.read_text()) if doc]


def one(kind: str) -> dict[str, Any]:
    [doc] = [doc for _, doc in k8s_documents() if doc["kind"] == kind]
    return doc


def container_spec() -> dict[str, Any]:
    [container] = one("Deployment")["spec"]["template"]["spec"]["containers"]
    spec: dict[str, Any] = container
    return spec


def manifest_env() -> dict[str, str]:
    return {e["name"]: e["value"] for e in container_spec()["env"] if "value" in e}


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the runtime stage, continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    pairs = [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]
    last_from = max(i for i, (op, _) in enumerate(pairs) if op == "FROM")
    return [pairs[0], *pairs[last_from:]]  # the global ARG, then the runtime stage


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for op, args in dockerfile_instructions():
        if op == "ENV":
            env.update(item.partition("=")[::2] for item in args.split())
    return env


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings a process with exactly these VOXSWAP_* variables would run with."""
    for name in SETTING_NAMES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Settings()


# -- Kubernetes ---------------------------------------------------------------------------------------


def test_every_manifest_passes_strict_schema_validation() -> None:
    version = str(kubernetes_validate.latest_version())
    checked = []
    for _, doc in k8s_documents():
        if doc["kind"] == "ServiceMonitor":
            continue  # a CRD: no schema ships with kubernetes-validate (the next test checks it)
        kubernetes_validate.validate(doc, version, strict=True)
        checked.append(doc["kind"])
    assert sorted(checked) == ["Deployment", "PersistentVolumeClaim", "Service"]


def test_the_service_monitor_without_a_bundled_schema_scrapes_the_services_port() -> None:
    monitor, service = one("ServiceMonitor"), one("Service")
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):  # when one ships, validate it above instead
        kubernetes_validate.validate(monitor, str(kubernetes_validate.latest_version()), strict=True)
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1" and set(monitor) == {"apiVersion", "kind", "metadata",
                                                                                     "spec"}
    assert set(monitor["spec"]) <= {"selector", "endpoints", "namespaceSelector", "jobLabel"}
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    ports = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout", "scheme"}
        assert endpoint["port"] in ports and endpoint["path"] == "/metrics"


def test_the_kustomization_applies_every_manifest_and_names_the_deployments_image() -> None:
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted({name for name, _ in k8s_documents()})
    image_name = container_spec()["image"].rsplit(":", 1)[0]
    assert [i["name"] for i in kustomization["images"]] == [image_name]


def test_termination_grace_covers_prestop_the_shutdown_delay_and_the_drain(monkeypatch: pytest.MonkeyPatch) -> None:
    pod = one("Deployment")["spec"]["template"]["spec"]
    container = container_spec()
    settings = settings_from(manifest_env(), monkeypatch)
    grace = pod["terminationGracePeriodSeconds"]
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert grace >= pre_stop + settings.shutdown_delay_s + settings.drain_timeout_s
    if settings.workers > 1:  # gunicorn's master waits its own graceful timeout for the workers
        assert grace >= pre_stop + gunicorn_options(settings)["graceful_timeout"]
    # a load balancer that follows readiness sees the 503 before the process stops accepting
    readiness = container["readinessProbe"]
    assert readiness["httpGet"]["path"] == "/health/ready"
    assert readiness["periodSeconds"] * readiness["failureThreshold"] <= settings.shutdown_delay_s
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"


def test_the_defaults_alone_also_fit_in_the_grace_period(monkeypatch: pytest.MonkeyPatch) -> None:
    """Someone who deletes the drain variables from the manifest gets the settings' defaults."""
    pod = one("Deployment")["spec"]["template"]["spec"]
    settings = settings_from({"VOXSWAP_WORKERS": manifest_env().get("VOXSWAP_WORKERS", "1")}, monkeypatch)
    pre_stop = container_spec()["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + gunicorn_options(settings)["graceful_timeout"]


def test_the_deployment_runs_the_image_as_its_user_with_every_setting_from_env() -> None:
    container = container_spec()
    env = manifest_env()
    assert "command" not in container and "args" not in container  # the image runs `voxswap serve`, no flags
    assert {e["name"] for e in container["env"]} <= SETTING_NAMES
    assert [p["containerPort"] for p in container["ports"]] == [int(env.get("VOXSWAP_PORT", "7860"))]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {env["VOXSWAP_REGISTRY"], env["VOXSWAP_DATA_DIR"]} <= mounts
    pod_security = one("Deployment")["spec"]["template"]["spec"]["securityContext"]
    user = dict(dockerfile_instructions())["USER"].split(":")[0]
    assert pod_security["runAsNonRoot"] is True and str(pod_security["runAsUser"]) == user


# -- the Dockerfile -----------------------------------------------------------------------------------


def test_the_dockerfile_builds_on_the_official_slim_python_and_takes_every_setting_from_env() -> None:
    instructions = dockerfile_instructions()
    ops = dict(instructions)
    base = ops["ARG"].removeprefix("BASE_IMAGE=")
    assert base.startswith("python:3.11") and "slim" in base
    env = dockerfile_env()
    assert {name for name in env if name.startswith("VOXSWAP_")} <= SETTING_NAMES
    assert ops["ENTRYPOINT"] == '["voxswap"]' and ops["CMD"] == '["serve"]'  # exec form, no flags
    assert ops["EXPOSE"] == env["VOXSWAP_PORT"] == "7860"
    volumes = set(re.findall(r'"([^"]+)"', ops["VOLUME"]))
    assert volumes == {env["VOXSWAP_REGISTRY"], env["VOXSWAP_DATA_DIR"]}
    assert "/health/live" in ops["HEALTHCHECK"] and ops["STOPSIGNAL"] == "SIGTERM"
    assert int(ops["USER"].split(":")[0]) > 0


# -- compose ------------------------------------------------------------------------------------------


def compose_instances() -> dict[str, dict[str, Any]]:
    services: dict[str, dict[str, Any]] = yaml.safe_load(COMPOSE.read_text())["services"]
    return {name: s for name, s in services.items() if "VOXSWAP_PORT" in s.get("environment", {})}


def test_the_compose_instances_are_the_ones_nginx_and_prometheus_know(monkeypatch: pytest.MonkeyPatch) -> None:
    instances = compose_instances()
    ports = sorted(int(s["environment"]["VOXSWAP_PORT"]) for s in instances.values())
    assert len(ports) >= 2
    upstreams = re.findall(r"upstream (\w+) \{(.*?)\}", NGINX_CONF.read_text(), re.S)
    assert len(upstreams) == 2
    for _, block in upstreams:
        assert sorted(int(p) for p in re.findall(r"server 127\.0\.0\.1:(\d+)", block)) == ports
    scrape = yaml.safe_load((PROMETHEUS / "compose.yml").read_text())
    [job] = [j for j in scrape["scrape_configs"] if j["job_name"] == "voxswap"]
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert sorted(int(t.rsplit(":", 1)[1]) for t in targets) == ports
    volumes: list[str] = []
    for service in instances.values():
        assert service["network_mode"] == "host" and set(service["environment"]) <= SETTING_NAMES
        volumes += [v.split(":")[0] for v in service["volumes"]]
        settings = settings_from({k: str(v) for k, v in service["environment"].items()
                                  if not str(v).startswith("${")}, monkeypatch)
        grace = int(service["stop_grace_period"].removesuffix("s"))
        assert grace >= settings.shutdown_delay_s + settings.drain_timeout_s
    assert len(set(volumes)) == len(volumes) == 2 * len(instances)  # each its own registry and jobs


def test_the_compose_prometheus_config_is_the_shipped_one_with_the_stacks_targets() -> None:
    shipped = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    stack = yaml.safe_load((PROMETHEUS / "compose.yml").read_text())
    assert stack["global"] == shipped["global"] and stack["rule_files"] == shipped["rule_files"]
    assert [j["job_name"] for j in stack["scrape_configs"]] == [j["job_name"] for j in shipped["scrape_configs"]]
    compose = yaml.safe_load(COMPOSE.read_text())["services"]
    assert "./prometheus:/etc/prometheus/voxswap:ro" in compose["prometheus"]["volumes"]
    assert "--config.file=/etc/prometheus/voxswap/compose.yml" in compose["prometheus"]["command"]
    for volume in compose["grafana"]["volumes"]:
        source = volume.split(":")[0]
        assert not source.startswith(".") or (COMPOSE.parent / source).is_dir(), volume
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (scripts/install-system-deps.sh installs it)")
    check = subprocess.run([promtool, "check", "config", str(PROMETHEUS / "compose.yml")], capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_scripts_are_executable() -> None:
    for name in ("build-image.sh", "install-container-deps.sh"):
        assert (ROOT / "scripts" / name).stat().st_mode & 0o111, name
