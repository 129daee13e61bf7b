#!/usr/bin/env bash
# Install everything, compile the tiny model for the host, run one image + prompt through
# the compiled artifact (checked against PyTorch) and print the generated tokens.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/install.sh"
BL="$VENV/bin/bluelower"
OUT="${1:-$ROOT/build/tiny-host}"
IMG="$ROOT/build/demo-image.npy"
mkdir -p "$ROOT/build"
"$VENV/bin/python" - "$IMG" <<'PY'
import sys, numpy as np
h, w = 480, 640  # a synthetic non-square photo: gradients + a bright square
y, x = np.mgrid[0:h, 0:w]
img = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], -1).astype(np.uint8)
img[100:200, 300:420] = 255
np.save(sys.argv[1], img)
PY
"$BL" compile --model tiny --soc host -o "$OUT"
"$BL" run "$OUT" --image "$IMG" --prompt-ids 1,15,27,300,42 --max-new-tokens 16 --check
