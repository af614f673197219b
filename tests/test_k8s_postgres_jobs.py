"""deploy/k8s/overlays/postgres-jobs: the Kustomize component that moves a cluster's jobs to PostgreSQL.

Enabled over the base exactly as its comment tells operators to, rendered by kubectl's own kustomize,
and checked against Kubernetes' schemas: the URL comes from a Secret, every pod signs webhooks with
one shared secret, and the Service no longer pins clients to a pod.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
KUBECTL = shutil.which("kubectl")


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed")
def test_the_postgres_jobs_component_renders_valid_manifests_with_a_secret_url(tmp_path: Path) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    base = tmp_path / "k8s"
    shutil.copytree(REPO / "deploy" / "k8s", base)
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [k8s]\ncomponents: [k8s/overlays/postgres-jobs]\n")
    out = subprocess.run([str(KUBECTL), "kustomize", str(tmp_path)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    docs: list[dict[str, Any]] = [d for d in yaml.safe_load_all(out.stdout) if d]
    version = str(kubernetes_validate.latest_version())
    for doc in docs:
        if doc["kind"] != "ServiceMonitor":  # a CRD: no schema ships with kubernetes-validate
            kubernetes_validate.validate(doc, version, strict=True)
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    env = {e["name"]: e for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["VOXSWAP_JOBS_URL"]["valueFrom"]["secretKeyRef"] == {"name": "voxswap-jobs-db", "key": "url"}
    assert "secretKeyRef" in env["VOXSWAP_WEBHOOK_SECRET"]["valueFrom"]
    assert all("postgresql://" not in str(e) for e in env.values())  # no URL, and no password, in the manifests
    [service] = [d for d in docs if d["kind"] == "Service"]
    assert service["spec"]["sessionAffinity"] == "None"
