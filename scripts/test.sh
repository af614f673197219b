#!/usr/bin/env bash
# Install everything the tests need on a fresh machine, then run them. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-system-deps.sh
[ -x .venv/bin/python ] || python3 -m venv .venv
# one resolver run: funasr-onnx pins numpy<=1.26.4 and a later separate install could lift it
.venv/bin/pip install -q --disable-pip-version-check -e ".[test]"
exec .venv/bin/pytest "$@"
