#!/usr/bin/env bash
# Installs everything bluelower needs into ./.venv (idempotent). Sourced by scripts/demo.sh
# and scripts/test.sh. System packages (cross compiler, qemu) only when running as root.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${BLUELOWER_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  need=()
  # clang: the libFuzzer target of the native readers (tests/test_fuzz.py; skipped without it)
  for pkg in g++ g++-aarch64-linux-gnu qemu-user cmake clang; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
  done
  if [ "${#need[@]}" -gt 0 ]; then
    # another apt/dpkg (unattended-upgrades, a parallel job) may hold the lock: wait, bounded
    source "$ROOT/scripts/wait-for-apt.sh"
    bl_wait_for_apt
    APT=(apt-get -o "DPkg::Lock::Timeout=${BLUELOWER_APT_LOCK_WAIT:-600}")
    echo "[install] apt-get install ${need[*]}" >&2
    "${APT[@]}" update -qq >/dev/null
    bl_wait_for_apt
    DEBIAN_FRONTEND=noninteractive "${APT[@]}" install -y -qq "${need[@]}" >/dev/null
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[install] creating $VENV" >&2
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
"$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 1)" 2>/dev/null \
  || "${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e "$ROOT[test]" 2>&1 | grep -v "^WARNING: Location" >&2 || true
"$VENV/bin/python" -c "import bluelower, tvm, torch, onnx, onnxsim" \
  || { echo "[install] failed: bluelower or a dependency does not import" >&2; exit 1; }
echo "[install] ready: $VENV" >&2
