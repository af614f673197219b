"""Run Debian's nginx with the repository's deploy/nginx.conf, pointed at loopback instances."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from testkit.harness import wait_until
from testkit.processes import free_port

NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/bin/nginx")


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in NGINX_CANDIDATES if os.path.exists(p)), None)


def render_config(template: Path, upstream_ports: list[int], listen_port: int, workdir: Path) -> str:
    """The operator's config with only what a sandbox needs changed: ports, pid, logs, temp paths."""
    text = template.read_text()
    servers = "".join(f"        server 127.0.0.1:{p} max_fails=3 fail_timeout=5s;\n" for p in upstream_ports)
    # every upstream block lists the same instances: the pool, and the one batch jobs stick to
    text, n = re.subn(r"(upstream voxswap\w* \{\n(?:\s*(?:hash|#).*\n)*)(?:\s*server .*\n)+",
                      lambda m: m.group(1) + servers, text)
    if n != 2:
        raise ValueError("deploy/nginx.conf should have the 'voxswap' and 'voxswap_jobs' upstream blocks")
    text = text.replace("listen 8080;", f"listen 127.0.0.1:{listen_port};")
    temp = "\n".join(f"    {d}_temp_path {workdir}/{d};" for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    text = text.replace("http {\n", f"http {{\n    access_log {workdir}/access.log;\n{temp}\n", 1)
    header = f"pid {workdir}/nginx.pid;\nerror_log {workdir}/error.log info;\n"
    if os.geteuid() == 0:
        header += "user root;\n"  # workers must write the sandbox's temp paths
    return header + text


@contextmanager
def run_nginx(template: Path, upstream_ports: list[int], workdir: Path) -> Iterator[str]:
    binary = nginx_binary()
    if binary is None:
        raise FileNotFoundError("nginx is not installed (scripts/install-system-deps.sh installs it)")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(render_config(template, upstream_ports, port, workdir))
    check = subprocess.run([binary, "-t", "-p", str(workdir), "-c", str(conf)], capture_output=True, text=True)
    if check.returncode != 0:
        raise RuntimeError(f"nginx -t failed: {check.stderr}")
    proc = subprocess.Popen([binary, "-p", str(workdir), "-c", str(conf), "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{url}/health/live", timeout=2).status_code == 200, timeout_s=20,
                   message="nginx to accept")
        yield url
    finally:
        proc.send_signal(signal.SIGQUIT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
