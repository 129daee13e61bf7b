#!/usr/bin/env bash
# Install everything, then run the test suite.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/install.sh"
cd "$ROOT"
export TVM_NUM_THREADS="${TVM_NUM_THREADS:-2}"
exec "$VENV/bin/python" -m pytest -q "$@"
