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
. "$(dirname "$0")/debian-packages.sh"
install_missing ${want[@]+"${want[@]}"} || exit 0
