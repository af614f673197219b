# voxswap in a container. Build with ./scripts/build-image.sh [TAG] (docker or podman; it also makes a
# Debian base where no registry is reachable), or by hand:
#
#   docker build -t voxswap:latest .
#   docker run -d -p 7860:7860 -v voxswap-registry:/registry -v voxswap-data:/data \
#       -e VOXSWAP_ADMIN_TOKEN=... --stop-timeout 45 voxswap:latest
#
# The image holds no model: on an empty /registry the demo model seeds itself (as on a bare install);
# mount a registry volume with your versions for real speech recognition. Every setting comes from
# VOXSWAP_* variables (server/settings.py); the command passes no flag that would override them.
# `docker stop` sends SIGTERM to voxswap itself (PID 1, exec form): readiness turns 503, it serves on
# for VOXSWAP_SHUTDOWN_DELAY_S, drains for up to VOXSWAP_DRAIN_TIMEOUT_S and exits 0, so give it a
# stop timeout longer than both (docker's default is 10 s).

# The official slim Python image; ./scripts/build-image.sh passes a debootstrapped Debian base
# (python3 and python3-venv) instead where no container registry is reachable.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore PYTHONDONTWRITEBYTECODE=1
# pip with what the build was given as secrets: the host's CA bundle and its index settings (never a
# layer of the image; see scripts/build-image.sh)
RUN python3 -m venv /opt/venv \
 && printf '%s\n' '#!/bin/sh' 'set -a' \
        'if [ -s /run/secrets/pip_env ]; then . /run/secrets/pip_env; fi' \
        'if [ -s /run/secrets/pip_cert ]; then PIP_CERT=/run/secrets/pip_cert; fi' \
        'set +a' 'exec /opt/venv/bin/pip "$@"' >/usr/local/bin/pip-build \
 && chmod 755 /usr/local/bin/pip-build
WORKDIR /src
# The dependencies in one resolver run, as scripts/test.sh installs them (funasr-onnx pins
# numpy<=1.26.4), in a layer of their own: a change to server/ or README.md rebuilds only the next one.
COPY pyproject.toml ./
RUN --mount=type=secret,id=pip_cert --mount=type=secret,id=pip_env \
    mkdir -p server && touch server/__init__.py README.md \
 && pip-build install . \
 && pip-build uninstall -y voxswap
COPY README.md ./
COPY server ./server
RUN --mount=type=secret,id=pip_cert --mount=type=secret,id=pip_env \
    pip-build install --no-deps . \
 && /opt/venv/bin/voxswap --help >/dev/null

FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="voxswap" \
      org.opencontainers.image.description="SenseVoice ONNX speech recognition server with blue/green model versions"
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/voxswap \
        --shell /usr/sbin/nologin voxswap \
 && mkdir -p /registry /data \
 && chown 10001:10001 /registry /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    NUMBA_CACHE_DIR=/tmp/numba-cache \
    VOXSWAP_HOST=0.0.0.0 \
    VOXSWAP_PORT=7860 \
    VOXSWAP_REGISTRY=/registry \
    VOXSWAP_DATA_DIR=/data
USER 10001:10001
WORKDIR /home/voxswap
VOLUME ["/registry", "/data"]
EXPOSE 7860
STOPSIGNAL SIGTERM
# liveness only: a process that is draining or not ready yet is still alive (readiness is for the
# load balancer: /health/ready)
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python3", "-c", "import os, urllib.request as u; h = os.environ.get('VOXSWAP_HOST') or '127.0.0.1'; h = '127.0.0.1' if h in ('0.0.0.0', '::') else h; h = '[%s]' % h if ':' in h else h; u.build_opener(u.ProxyHandler({})).open('http://%s:%s/health/live' % (h, os.environ.get('VOXSWAP_PORT', '7860')), timeout=4)"]
ENTRYPOINT ["voxswap"]
CMD ["serve"]
