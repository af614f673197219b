#!/usr/bin/env bash
# Rolling upgrade of voxswap instances behind a load balancer, one at a time, with automatic rollback.
#
#   ./deploy.sh --instances http://10.0.0.1:7860,http://10.0.0.2:7860 --version v2 \
#               [--model NAME] [--model-dir DIR] [--token T] [--watch-seconds S] [--timeout S] [--dry-run]
#               [--canary PERCENT [--canary-seconds S] [--canary-min-requests N]]
#
# --canary PERCENT first runs a canary on the first instance: that share of its clients answered by
# the new version, judged beside the live one for --canary-seconds; only a promotion lets the rolling
# upgrade go on (a failed or inconclusive canary stops the deploy with nothing changed).
#
# --model NAME deploys a version of that named model (/admin/models/NAME/...; the upload creates the
# model where it is missing) and leaves the others alone; without it, the default model, through the
# /admin/model/... routes that servers of every release answer.
#
# For each instance: upload the version if its registry lacks it (tar.gz of DIR, checksums verified
# on arrival), update it with a post-swap watch, wait until every worker serves it and it is ready,
# send a smoke transcription through it, and wait for the watch's verdict. On any failure, every
# instance already upgraded goes back to the version it had when the deploy started, and the exit
# code is 1. Rerunning with the same version does nothing to instances already on it.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${VOXSWAP_PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$here/.venv/bin/python" ]; then python="$here/.venv/bin/python"; else python="python3"; fi
fi
cd "$here"
exec "$python" -m server.tools.deploy "$@"
