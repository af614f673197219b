#!/usr/bin/env bash
# Debian packages the test suite drives for real: nginx, Prometheus (promtool), Chromium,
# espeak-ng and sox for speech fixtures, ffmpeg for format fixtures, PostgreSQL for the shared job
# queue. Installs only what is missing.
set -euo pipefail
want=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || want+=(nginx)
command -v prometheus >/dev/null 2>&1 || want+=(prometheus)
command -v chromium >/dev/null 2>&1 || want+=(chromium)
command -v espeak-ng >/dev/null 2>&1 || want+=(espeak-ng)
command -v sox >/dev/null 2>&1 || want+=(sox)
command -v ffmpeg >/dev/null 2>&1 || want+=(ffmpeg)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || want+=(postgresql)
. "$(dirname "$0")/debian-packages.sh"
install_missing ${want[@]+"${want[@]}"} || exit 0
# Debian starts services it installs; the tests start their own on loopback ports.
for svc in nginx prometheus; do
  if command -v systemctl >/dev/null 2>&1; then systemctl stop "$svc" >/dev/null 2>&1 || true; fi
  pkill -x "$svc" >/dev/null 2>&1 || true
done
# the cluster Debian creates and starts: stopped (its binaries are all the tests use)
if command -v pg_ctlcluster >/dev/null 2>&1; then
  if command -v systemctl >/dev/null 2>&1; then systemctl stop postgresql >/dev/null 2>&1 || true; fi
  for conf in /etc/postgresql/*/*/postgresql.conf; do
    [ -e "$conf" ] || continue
    ver=$(basename "$(dirname "$(dirname "$conf")")"); name=$(basename "$(dirname "$conf")")
    pg_ctlcluster "$ver" "$name" stop >/dev/null 2>&1 || true
  done
fi
