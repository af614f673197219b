#!/usr/bin/env bash
# Debian packages the container tests (pytest -m container, run by .ci/run) and scripts/build-image.sh
# need: podman with runc (crun fails on hybrid cgroups) unless a docker daemon answers, debootstrap to
# make a Debian base where no container registry is reachable, uidmap, slirp4netns and fuse-overlayfs
# for rootless podman, and docker-compose, whose `config` validates deploy/compose.yaml offline.
# Installs only what is missing.
set -euo pipefail
wanted=(docker-compose)
if ! docker info >/dev/null 2>&1; then
  wanted+=(podman runc debootstrap uidmap slirp4netns fuse-overlayfs)
fi
want=()
for pkg in "${wanted[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || want+=("$pkg")
done
if [ ${#want[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "missing packages: ${want[*]} (run as root on Debian, or install them yourself)" >&2
  exit 0
fi
echo "installing Debian packages: ${want[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${want[@]}" >/dev/null
